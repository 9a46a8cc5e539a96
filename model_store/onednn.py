"""Matrix products on oneDNN (CPU, float32) for training, generation and scoring.

torch's float32 `F.linear` and `@` on a CPU call MKL, which on this project's machines
(AMD EPYC, torch 2.13) runs a large product at ~218 GFLOP/s and the small per-step products
of a recurrent layer slower still; oneDNN, which torch ships with, runs the same float32
products 2-2.5x faster (2048^3: 37 against 79 ms; 32 x 256 x 768: 38 against 75 us; 64 x 256
x 2,582: 200 against 460 us). So on a CPU in float32 the model's products go through here:

* `linear(x, weight, bias, packed=None)`: x W^T + b on oneDNN; with a gradient wanted, through
  `Linear`, whose backward is on oneDNN too. Anything else (a GPU, autocast's bfloat16, which
  torch already runs on oneDNN, other dtypes) goes to `F.linear`.
* `PackedLinear`: a weight kept in oneDNN's blocked layout, for the many products of one
  weight in a row (the steps of a recurrent layer without a gradient, a served model;
  training's float32 recurrence runs its steps' products in kernels.c). A weight changed since it
  was packed (its tensor version moved) is packed again before use. With a packed weight a
  row's result is bit for bit the same at every batch size (MKL's differ between one row and
  several), which is what lets a request served in a batch get exactly what it gets alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def _product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias; `weight` (out, in) plain or packed."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def applies(*tensors: torch.Tensor) -> bool:
    """Whether oneDNN runs a product of these: float32 on a CPU, outside autocast."""
    return (ENABLED and not torch.is_autocast_enabled("cpu")
            and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors))


class Linear(torch.autograd.Function):
    """x W^T + b with its backward on oneDNN: dX = dY W, dW = dY^T X (computed as (X^T dY)^T,
    which oneDNN runs faster than with the transposed dY as its input), db = sum of dY."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _product(x, weight, bias)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = _product(dy2, weight.t(), None).view(x.shape) if ctx.needs_input_grad[0] else None
        dw = weight_grad(dy2, x.reshape(-1, x.shape[-1])) if ctx.needs_input_grad[1] else None
        db = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def weight_grad(dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """dY^T X summed over the rows of dy (rows, out) and x (rows, in): a linear layer's weight gradient."""
    if not applies(x, dy):
        return dy.t() @ x
    return _product(x.t(), dy.t(), None).t().contiguous()


class PackedLinear:
    """x @ weight.T + bias with `weight` in oneDNN's layout; x (..., in_features), float32, CPU, no gradient."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 64):
        self.weight, self.bias, self.rows = weight, bias, rows
        self.pack()

    def pack(self) -> None:
        self.version = version(self.weight)
        with torch.no_grad():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach().contiguous(), batch_size=self.rows)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if version(self.weight) != self.version:
            self.pack()
        return _product(x, self.packed, self.bias)


def fixed(weight: torch.Tensor, bias: torch.Tensor | None):
    """A function x -> x W^T + b for many products with one weight and no gradient (a recurrent
    layer's steps): `PackedLinear` where oneDNN applies, else `F.linear`."""
    if applies(weight):
        return PackedLinear(weight, bias)
    return lambda x: F.linear(x, weight, bias)


def version(t: torch.Tensor) -> int | None:
    """The tensor's in-place-change counter (None for an inference tensor, which has none)."""
    return None if t.is_inference() else t._version


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
           packed: PackedLinear | None = None) -> torch.Tensor:
    """x W^T + b: on oneDNN where it applies (`packed` where no gradient is wanted), else `F.linear`."""
    if not applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return Linear.apply(x, weight, bias)
    return packed(x) if packed is not None else _product(x, weight, bias)


ENABLED = available()  # tests switch it off to compare with F.linear
