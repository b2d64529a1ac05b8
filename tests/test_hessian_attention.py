"""Hessian products through scaled-dot-product attention (nn.TransformerEncoderLayer).

PyTorch's fused CPU attention kernel has no double backward and no forward-mode AD; flatlab
forms products on the MATH kernel and restores the caller's kernel choice afterwards. The
reference is central finite differences of the gradient (float64), not torch.func's
``jacrev(jacrev(...))``, which is about 2% off on attention in torch 2.13.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from flatlab.hessian import HessianOperator

CE = nn.CrossEntropyLoss()
PATHS = {"forward": {"backend": "forward", "cache": False},
         "double_backward": {"backend": "double_backward", "cache": False},
         "cached": {"backend": "double_backward", "cache": True}}


class Encoder(nn.Module):
    """Embedding, one TransformerEncoderLayer (GELU: smooth, so differences converge) and a
    linear head on the mean over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                                  activation="gelu")
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


def central_differences(model: nn.Module, batches, loss_fn, block: torch.Tensor, *,
                        forward=None, step: float = 1e-5) -> torch.Tensor:
    """Fourth-order central differences of the gradient for every column ``v`` of ``block``,
    ``(8 [g(w + h v) - g(w - h v)] - [g(w + 2h v) - g(w - 2h v)]) / 12h`` (error O(h^4)), with
    ``g`` the gradient of the dataset-average loss (eval mode, plain autograd, the model's own
    attention kernel) over all parameters; the model is restored exactly afterwards."""
    forward = forward or (lambda m, x: m(x))
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]

    def gradient_at(vector: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            pieces = torch.split(vector, [p.numel() for p in params])
            for p, s, piece in zip(params, saved, pieces, strict=True):
                p.copy_(s + piece.reshape(p.shape).to(p.dtype))
        total, count = 0, 0
        for x, y, *_ in batches:
            loss = loss_fn(forward(model, x), y)
            grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)
            total = total + torch.cat([g.reshape(-1) for g in grads]) * len(y)
            count += len(y)
        return total / count

    def difference(v: torch.Tensor, h: float) -> torch.Tensor:
        return gradient_at(h * v) - gradient_at(-h * v)

    training = model.training
    model.eval()
    try:
        columns = [(8 * difference(v, step) - difference(v, 2 * step)) / (12 * step)
                   for v in block.T]
    finally:
        model.train(training)
        with torch.no_grad():
            for p, s in zip(params, saved, strict=True):
                p.copy_(s)
    return torch.stack(columns, dim=1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def encoder_case(dtype: torch.dtype):
    torch.manual_seed(0)
    model = Encoder().to(dtype)  # float32 initialisation either way
    x, y = torch.randn(10, 5, 3).to(dtype), torch.randint(0, 3, (10,))
    return model, [(x[:6], y[:6]), (x[6:], y[6:])]


# measured (torch 2.13 CPU, step 1e-5): float64 4.9e-12, float32 1.04e-7 (its rounding)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-10), (torch.float32, 5e-7)])
@pytest.mark.parametrize("path", PATHS)
def test_encoder_layer_products_match_central_differences(path, dtype, tolerance):
    model, batches = encoder_case(dtype)
    op = HessianOperator(model, CE, batches, **PATHS[path])
    block = torch.randn(op.size, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = central_differences(*encoder_case(torch.float64), CE, block)
    assert rel_err(op.matvec(block.to(dtype)).double(), reference) < tolerance
    assert rel_err(op.matvec(block[:, 0].to(dtype)).double(), reference[:, 0]) < tolerance


def test_the_callers_attention_kernels_are_restored():
    model, batches = encoder_case(torch.float64)
    seen = []
    model.encoder.register_forward_hook(
        lambda *_: seen.append((torch.backends.cuda.flash_sdp_enabled(),
                                torch.backends.cuda.math_sdp_enabled())))
    op = HessianOperator(model, CE, batches)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        op.matvec(torch.ones(op.size, dtype=torch.float64))
        assert torch.backends.cuda.flash_sdp_enabled()
        assert not torch.backends.cuda.math_sdp_enabled()
    assert seen and set(seen) == {(False, True)}  # products ran on the MATH kernel only


class FusedAttention(nn.Module):
    """Calls the fused CPU kernel directly, so no kernel choice can avoid it."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.proj(x).unsqueeze(1)  # (n, heads=1, L, 4)
        out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q)[0]
        return out.squeeze(1).mean(1)


def test_an_operation_without_a_second_derivative_fails_with_one_line():
    torch.manual_seed(0)
    model = FusedAttention()
    x, y = torch.randn(6, 5, 4), torch.randint(0, 4, (6,))
    op = HessianOperator(model, CE, (x, y))
    with pytest.raises(NotImplementedError, match=r"torch has none for \S*flash_attention\S*: "
                       r"use a twice-differentiable .*attn_implementation='eager'") as err:
        op.matvec(torch.ones(op.size))
    assert "\n" not in str(err.value)
