"""Suite-wide settings.

Every test model is tiny: one intra-op thread runs it fastest, and on a busy 2-core machine
torch's spinning OpenMP threads made tiny models up to ~50x slower. Tests that exercise the
thread policy set and restore the count themselves.
"""

import torch

torch.set_num_threads(1)
