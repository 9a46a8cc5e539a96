"""The recurrent cells of the `scratch` implementation, written out step by step.

Each cell has its forward equations (the tutorial's, in torch's gate order) and their
derivatives. `Recurrence` runs one layer over all time steps with them and
backpropagates through time by hand: per step only the gate arithmetic and one matmul
for the previous state's gradient, and the recurrent weight's gradient as one large
matmul over all steps at the end. That is the same arithmetic autograd would do, without
a graph of a dozen small nodes per step, and it is most of why training is fast on a CPU.
A test checks every gradient against autograd through torch.nn.RNN/GRU/LSTM. On a CPU in
float32 each step's arithmetic (these cells and their derivatives) runs fused in C instead
(kernels.py), and in training so do the steps' products, all steps of a layer in one call; the
functions here stay the reference and what runs everywhere else.

Names: `xg` = X_t W_x* + b_i* and `hg` = H_{t-1} W_h* + b_h*, the gate blocks side by
side; a cell returns the new H, the new C (LSTM only) and what its backward needs.
"""

from __future__ import annotations

import torch

from model_store import kernels
from model_store.onednn import fixed, linear, weight_grad


def rnn_cell(xg, hg, H, C):
    H = torch.tanh(xg + hg)  # H_t = tanh(X_t W_xh + H_{t-1} W_hh + b_h)
    return H, None, (H,)


def rnn_cell_backward(dH, dC, H_prev, C_prev, saved):
    (H,) = saved
    d_pre = dH * (1 - H * H)
    return d_pre, d_pre, None, None


def gru_cell(xg, hg, H, C):
    # torch's (and cuDNN's) GRU: the reset gate multiplies H W_hh + b_hn, not H (see model.py)
    n = H.shape[1]
    RZ = torch.sigmoid(xg[:, :2 * n] + hg[:, :2 * n])  # reset and update gates, side by side
    R, Z = RZ[:, :n], RZ[:, n:]
    h_h = hg[:, 2 * n:]
    H_tilde = torch.tanh(torch.addcmul(xg[:, 2 * n:], R, h_h))  # candidate state: tanh(x_h + R * h_h)
    H_new = torch.lerp(H_tilde, H, Z)  # Z * H + (1 - Z) * H_tilde
    return H_new, None, (R, Z, H_tilde, h_h)


def gru_cell_backward(dH, dC, H_prev, C_prev, saved):
    R, Z, H_tilde, h_h = saved
    d_h = dH * (1 - Z) * (1 - H_tilde * H_tilde)  # through H_tilde's tanh
    d_r = d_h * h_h * R * (1 - R)
    d_z = dH * (H_prev - H_tilde) * Z * (1 - Z)
    return torch.cat((d_r, d_z, d_h), 1), torch.cat((d_r, d_z, d_h * R), 1), dH * Z, None


def lstm_cell(xg, hg, H, C):
    n = H.shape[1]
    pre = xg + hg  # gate blocks in torch's order: input, forget, candidate, output
    IF = torch.sigmoid(pre[:, :2 * n])
    I, F_ = IF[:, :n], IF[:, n:]  # input and forget gates  # noqa: E741
    C_tilde = torch.tanh(pre[:, 2 * n:3 * n])  # candidate memory
    O = torch.sigmoid(pre[:, 3 * n:])  # output gate  # noqa: E741
    C = torch.addcmul(F_ * C, I, C_tilde)  # F * C + I * C_tilde
    tanh_C = torch.tanh(C)
    return O * tanh_C, C, (I, F_, C_tilde, O, tanh_C)


def lstm_cell_backward(dH, dC, H_prev, C_prev, saved):
    I, F_, C_tilde, O, tanh_C = saved  # noqa: E741
    dC = dC + dH * O * (1 - tanh_C * tanh_C)
    d_i = dC * C_tilde * I * (1 - I)
    d_f = dC * C_prev * F_ * (1 - F_)
    d_c = dC * I * (1 - C_tilde * C_tilde)
    d_o = dH * tanh_C * O * (1 - O)
    d_pre = torch.cat((d_i, d_f, d_c, d_o), 1)
    return d_pre, d_pre, None, dC * F_


CELLS = {"rnn": (rnn_cell, rnn_cell_backward), "gru": (gru_cell, gru_cell_backward),
         "lstm": (lstm_cell, lstm_cell_backward)}


def recurrence(cell, xg, h0, c0, w_hh, b_hh, packed_hh=None):
    """One layer over all steps (see `Recurrence`): through `Recurrence` when a gradient is wanted,
    else without keeping anything for a backward pass (scoring; a generation step of a model that
    is not packed), with H_{t-1} W_hh from `packed_hh` (onednn.PackedLinear) when given. Every
    step's products stay on oneDNN here, not kernels.c's: with a packed weight a row's result is then
    the same at every batch size."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (xg, h0, c0, w_hh, b_hh)):
        return Recurrence.apply(cell, xg, h0, c0, w_hh, b_hh)
    if packed_hh is not None:
        hidden = packed_hh
    elif len(xg) > 1:  # packing W_hh pays off over many steps, not for one
        hidden = fixed(w_hh, b_hh)
    else:
        def hidden(H):
            return linear(H, w_hh, b_hh)
    if kernels.applies(xg, h0, c0, w_hh):
        hs, cs, _ = kernels.forward(cell, xg.contiguous(), h0.contiguous(),
                                    c0.contiguous() if c0 is not None else None, hidden, keep=False)
        return hs, (cs[-1] if cs is not None else None)
    hs, c_last, _, _ = steps(cell, xg, h0, c0, hidden, keep=False)
    return hs, c_last


def steps(cell, xg, h0, c0, hidden, keep: bool):
    """A layer's steps as torch ops, the reference: every step's H, the last C, and with `keep` what
    the backward needs (the C before each step and each step's saved tensors); hidden(H) = H W_hh^T + b_hh."""
    step = CELLS[cell][0]
    H, C = h0, c0
    hs, cs, saved = [], [], []
    for x_t in xg.unbind(0):
        if keep:
            cs.append(C)
        H, C, s = step(x_t, hidden(H), H, C)
        hs.append(H)
        if keep:
            saved.append(s)
    return torch.stack(hs), C, cs, saved


class Recurrence(torch.autograd.Function):
    """One layer over all steps. xg: (steps, batch, gates * hidden), time-major; h0, c0:
    (batch, hidden) (c0 is None but for the LSTM). Returns every step's H and the last C."""

    @staticmethod
    def forward(ctx, cell, xg, h0, c0, w_hh, b_hh):
        ctx.cell = cell
        ctx.fused = kernels.applies(xg, h0, c0, w_hh)
        ctx.autocast = (xg.device.type, torch.is_autocast_enabled(xg.device.type),
                        torch.get_autocast_dtype(xg.device.type))
        # float32: every step, products included, in one C call; under autocast the products are
        # autocast's (bfloat16) and each step's gate arithmetic one C call (kernels.py)
        ctx.native = ctx.fused and not ctx.autocast[1]
        if ctx.fused:
            h0, c0 = h0.contiguous(), c0.contiguous() if c0 is not None else None
            if ctx.native:
                hs, cs, saved = kernels.recurrence_forward(cell, xg.contiguous(), h0, c0, w_hh, b_hh, keep=True)
            else:
                hs, cs, saved = kernels.forward(cell, xg.contiguous(), h0, c0, fixed(w_hh, b_hh), keep=True)
            ctx.save_for_backward(h0, c0, hs, cs, saved, w_hh)
            return hs, cs[-1] if cs is not None else h0.new_zeros(())
        # H_{t-1} W_hh + b_hh, on oneDNN with W_hh packed once (onednn.py)
        hs, C, ctx.cs, ctx.saved = steps(cell, xg, h0, c0, fixed(w_hh, b_hh), keep=True)
        ctx.save_for_backward(h0, hs, w_hh)
        return hs, C if C is not None else h0.new_zeros(())

    @staticmethod
    def backward(ctx, d_hs, d_c_last):
        if ctx.fused:
            return Recurrence.fused_backward(ctx, d_hs, d_c_last)
        h0, hs, w_hh = ctx.saved_tensors
        backward_step = CELLS[ctx.cell][1]
        device_type, autocast, dtype = ctx.autocast
        h_prev = torch.cat((h0[None], hs[:-1]))
        d_hs = torch.zeros_like(hs) if d_hs is None else d_hs
        dH = torch.zeros_like(h0)
        dC = d_c_last if ctx.cell == "lstm" and d_c_last is not None else (
            torch.zeros_like(h0) if ctx.cell == "lstm" else None)
        dxg, dhg = [None] * len(hs), [None] * len(hs)
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):  # as the forward ran
            through_w_hh = fixed(w_hh.t(), None)  # dhg @ W_hh
            for t in range(len(hs) - 1, -1, -1):
                dH = dH + d_hs[t]
                dxg[t], dhg[t], dH_direct, dC = backward_step(dH, dC, h_prev[t], ctx.cs[t], ctx.saved[t])
                dH = through_w_hh(dhg[t]).to(h0.dtype)  # through H_{t-1} W_hh
                if dH_direct is not None:
                    dH = dH + dH_direct
            dhg = torch.stack(dhg)
            d_w_hh = weight_grad(dhg.flatten(0, 1), h_prev.flatten(0, 1))  # all steps in one matmul
        d_c0 = dC.to(h0.dtype) if dC is not None else None
        return (None, torch.stack(dxg), dH.to(h0.dtype), d_c0, d_w_hh.to(w_hh.dtype),
                dhg.sum((0, 1)).to(w_hh.dtype))

    @staticmethod
    def fused_backward(ctx, d_hs, d_c_last):
        h0, c0, hs, cs, saved, w_hh = ctx.saved_tensors
        device_type, autocast, dtype = ctx.autocast
        d_hs = torch.zeros_like(hs) if d_hs is None else d_hs.float().contiguous()
        with torch.autocast(device_type, dtype=dtype, enabled=autocast):  # as the forward ran
            if ctx.native:
                dxg, dhg, d_h0, d_c0 = kernels.recurrence_backward(ctx.cell, d_hs, d_c_last, h0, c0, hs, cs, saved,
                                                                   w_hh)
            else:
                through_w_hh = fixed(w_hh.t(), None)  # dhg @ W_hh
                dxg, dhg, d_h0, d_c0 = kernels.backward(ctx.cell, d_hs, d_c_last, h0, c0, hs, cs, saved,
                                                        through_w_hh)
            # W_hh's gradient: sum over steps of dhg_t^T H_{t-1}, the steps after the first in one matmul
            d_w_hh = weight_grad(dhg[0], h0).float()
            if len(hs) > 1:
                d_w_hh += weight_grad(dhg[1:].flatten(0, 1), hs[:-1].flatten(0, 1))
        return None, dxg, d_h0, d_c0, d_w_hh, dhg.sum((0, 1))
