"""The fp16 recipe for a user's own training loop, run exactly as the docs show it.

The docs copy ``tests/snippets/fp16_loop.py`` verbatim; this test executes that file. On CPU
it runs under ``torch.autocast("cpu", dtype=torch.float16)`` with ``GradScaler("cpu")``
(both supported by torch >= 2.3; checked with torch 2.13).
"""

from __future__ import annotations

import math
import runpy
from pathlib import Path

import torch

SNIPPET = Path(__file__).parent / "snippets" / "fp16_loop.py"


def test_the_fp16_snippet_trains_with_autocast_and_a_grad_scaler(capsys):
    namespace = runpy.run_path(str(SNIPPET), run_name="__main__")
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 0", "epoch 1", "epoch 2"]
    losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
    assert losses[0] < math.log(3)  # it learns (chance level is ln 3 = 1.10) ...
    assert losses[2] < 0.8 * losses[0]  # ... and keeps learning
    assert namespace["loss"].dtype == torch.float32  # autocast computed the loss in fp32
    assert namespace["scaler"].get_scale() == 2.0**16  # no overflow: never lowered
    model = namespace["model"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the forward pass really ran in half precision
    with torch.autocast(namespace["device"], dtype=torch.float16):
        assert model(torch.zeros(1, 20, device=namespace["device"])).dtype == torch.float16
