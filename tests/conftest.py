"""Suite-wide settings.

Every test model is tiny: one intra-op thread runs it fastest, and on a busy 2-core machine
torch's spinning OpenMP threads made tiny models up to ~50x slower. Tests that exercise the
thread policy set and restore the count themselves.
"""

import torch

torch.set_num_threads(1)

# PyPI's torchvision wheel is CUDA-linked; beside the CPU torch of constraints-cpu.txt its
# extension cannot load and `import torchvision` (pulled in by timm and transformers) fails.
# flatlab applies this workaround before importing a model factory; tests that import
# transformers or timm directly need it too (a no-op where torchvision loads normally).
from flatlab._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()
