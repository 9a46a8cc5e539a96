"""The fused loops of kernels.c: built at install (setup.py), the widest build the CPU runs imported once.

A recurrent layer's step is one matmul and then a dozen element-wise torch ops (twenty in its
backward) on small (batch, hidden) tensors, each paying torch's per-op overhead: at batch 32 and
256 hidden the GRU's gate arithmetic took ~75 us per step forward against ~8 us fused. So on a
CPU, in float32, the `scratch` recurrence (cells.py) runs each step's arithmetic here; in
training, the steps' products too, all steps of a layer in one call (`recurrence_forward`,
`recurrence_backward`). Also here: the one-hot input gates (`OneHotGates`), the training loss
(`CrossEntropy`), and the generation path's step, argmax, seen marks and sampler rounds.

The C file is built when the package is installed (setup.py), with its bindings
(kernels_module.c), into one extension module per vector width; the widest the CPU runs is
imported once, with this module, and logged. Where none was built (no compiler at install, a
platform without OpenMP), with `LYRICS_KERNELS=0`, or for anything but float32 on a CPU, the
cells run as torch ops (cells.py): the same equations, slower. Under bfloat16 autocast the
matmuls run in bfloat16 as autocast has them, and the step arithmetic in float32, as the torch
cells' would.
"""

from __future__ import annotations

import array
import importlib
import logging
import os
from types import ModuleType

import numpy
import torch  # first: the kernels' OpenMP calls resolve to the libgomp torch loads

log = logging.getLogger(__name__)

SAVED_WIDTH = {"rnn": 0, "gru": 4, "lstm": 5}  # columns of `saved` per step, in units of hidden size
CELLS = {"rnn": 0, "gru": 1, "lstm": 2}  # kernels.c's cell numbers
GATES = {"rnn": 1, "gru": 3, "lstm": 4}  # gate blocks side by side in each cell's weights

# the builds setup.py makes, widest first, with the x86-64 level (kernels_module.c, cpu_level) each needs
BUILDS = [("x86_64_v4", 4), ("x86_64_v3", 3), ("baseline", 0)]


def load() -> ModuleType | None:
    """The widest build of the kernels this CPU runs, or None (the reason logged)."""
    if os.environ.get("LYRICS_KERNELS", "1") == "0":
        log.info("fused kernels switched off (LYRICS_KERNELS=0): the cells run as torch ops")
        return None
    try:
        level = importlib.import_module("model_store._kernels_baseline").cpu_level()
    except ImportError as exc:
        log.warning("fused kernels not built (%s): the cells run as torch ops", exc)
        return None
    for name, needed in BUILDS:
        if level >= needed:
            try:
                module = importlib.import_module(f"model_store._kernels_{name}")
            except ImportError:  # not built for this platform
                continue
            log.info("fused kernels: %s build (CPU level x86-64-v%d)", name, level)
            return module
    return None


_library = load()


def library() -> ModuleType | None:
    """The kernels' extension module, or None where none was built or they are switched off."""
    return _library if ENABLED else None


def loaded() -> ModuleType:
    """The kernels' module, for a caller that has checked they apply."""
    module = library()
    if module is None:
        raise RuntimeError("the C kernels are not loaded")
    return module


def build_name() -> str:
    """The build in use (baseline, x86_64_v3, x86_64_v4), or none: what /metrics reports."""
    module = library()
    return module.__name__.rsplit("_kernels_", 1)[1] if module else "none"


def applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels run on these tensors: float32 on a CPU."""
    if not ENABLED or library() is None:
        return False
    for t in tensors:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            return False
    return True


class Steps:
    """Addresses of step t's slices of (steps, batch, width) tensors, for the kernels' pointer arguments."""

    def __init__(self, tensor: torch.Tensor | None):
        self.base = pointer(tensor)
        self.stride = tensor.stride(0) * tensor.element_size() if tensor is not None else 0

    def __getitem__(self, t: int) -> int | None:
        return None if self.base is None else self.base + t * self.stride


def cell_forward(cell: str, rows: int, n: int, x: int | None, hg: int, h: int | None, c: int | None,
                 h_out: int | None, c_out: int | None, saved: int | None) -> None:
    """One step of `cell` on raw addresses (see kernels.c; None: NULL): x, hg -> h_out (and c_out, saved)."""
    lib = loaded()
    if cell == "rnn":
        lib.rnn_forward(rows, n, x, hg, h_out)
    elif cell == "gru":
        lib.gru_forward(rows, n, x, hg, h, h_out, saved)
    else:
        lib.lstm_forward(rows, n, x, hg, c, h_out, c_out, saved)


def layer_outputs(cell: str, xg: torch.Tensor, h0: torch.Tensor, keep: bool):
    """The buffers a layer's forward fills: every step's H, every step's C (LSTM, else None) and
    what the backward needs (one step's worth without `keep`; None for the RNN, whose H is it)."""
    steps, rows, n = xg.shape[0], h0.shape[0], h0.shape[1]
    width = SAVED_WIDTH[cell]
    return (xg.new_empty(steps, rows, n), xg.new_empty(steps, rows, n) if cell == "lstm" else None,
            xg.new_empty(steps if keep else 1, rows, width * n) if width else None)


def backward_buffers(cell: str, d_hs: torch.Tensor, d_c_last: torch.Tensor | None, h0: torch.Tensor):
    """The buffers a layer's backward fills: the gradients of xg and of the products (one tensor but
    for the GRU), and the ping-pong pair passed between steps outside W_hh (GRU: through
    Z * H_{t-1}; LSTM: dC, starting from d_c_last)."""
    dxg = d_hs.new_empty(*d_hs.shape[:2], GATES[cell] * d_hs.shape[2])
    dhg = torch.empty_like(dxg) if cell == "gru" else dxg
    ping, pong = torch.zeros_like(h0), torch.empty_like(h0)
    if cell == "lstm" and d_c_last is not None:
        ping.copy_(d_c_last)
    return dxg, dhg, ping, pong


def pointer(t: torch.Tensor | None) -> int | None:
    """A tensor's address for a kernel's pointer argument (NULL for None)."""
    return t.data_ptr() if t is not None else None


def forward(cell: str, xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, hidden, keep: bool):
    """All steps of one layer: xg (steps, batch, gates * n) contiguous; hidden(H) = H W_hh^T + b_hh.
    Returns every step's H (steps, batch, n), every step's C (LSTM, else None) and, with `keep`,
    what the backward needs (steps, batch, width * n) (else None)."""
    steps, rows, n = xg.shape[0], h0.shape[0], h0.shape[1]
    hs, cs, saved = layer_outputs(cell, xg, h0, keep)
    X, Hs, Cs, S = Steps(xg), Steps(hs), Steps(cs), Steps(saved)
    H, h_ptr, c_ptr = h0, pointer(h0), pointer(c0)
    for t in range(steps):
        hg = hidden(H).float()  # bfloat16 under autocast
        cell_forward(cell, rows, n, X[t], hg.data_ptr(), h_ptr, c_ptr, Hs[t], Cs[t], S[t if keep else 0])
        H, h_ptr, c_ptr = hs[t], Hs[t], Cs[t]
    return hs, cs, (saved if keep else None)


def step(cell: str, x: torch.Tensor, ids: torch.Tensor | None, hg: torch.Tensor, h: torch.Tensor,
         c: torch.Tensor | None, h_out: torch.Tensor, c_out: torch.Tensor | None) -> None:
    """One generation step of one layer, without a gradient, into h_out (and c_out): the input gates
    of row b are x[ids[b]] (the first layer's input table) or, with ids None, x[b] (an upper layer's
    input product); hg = H W_hh^T + b_hh. Every tensor float32 (ids int64), contiguous, CPU."""
    rows, n = h.shape[-2], h.shape[-1]
    bad = loaded().cell_step(CELLS[cell], rows, n, x.data_ptr(), pointer(ids),
                              x.shape[0], hg.data_ptr(), h.data_ptr(), pointer(c),
                              h_out.data_ptr(), pointer(c_out))
    if bad >= 0 and ids is not None:  # only a lookup in the input table can be out of range
        raise IndexError(f"character index {int(ids[bad])} is outside the vocabulary (size {x.shape[0]})")


def mark_seen(seen: torch.Tensor, ids: torch.Tensor) -> None:
    """seen[b, ids[b]] = True for every row b: seen (rows, V) bool, ids (rows,) int64, both on a CPU."""
    if (library() is None or seen.device.type != "cpu" or not seen.is_contiguous() or seen.dtype != torch.bool
            or ids.dtype != torch.int64):
        seen.scatter_(1, ids[:, None], True)
        return
    ids = ids.contiguous()
    bad = loaded().mark_seen(seen.shape[0], seen.shape[1], seen.data_ptr(), ids.data_ptr())
    if bad >= 0:
        raise IndexError(f"character index {int(ids[bad])} is outside the vocabulary (size {seen.shape[1]})")


def history_cache(text: torch.Tensor, window: int, order: int,
                  vocab_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """mixture.HistoryCache.steps in C: for int32 `text` (rows, length) on a CPU, p (rows, steps, V)
    and bucket (rows, steps) of every window text[:, t:t + window]; None where the kernels do not
    apply (the caller computes it as torch ops)."""
    if library() is None or text.device.type != "cpu" or text.dtype != torch.int32:
        return None
    text = text.contiguous()
    rows, length = text.shape
    p = torch.empty(rows, length - window + 1, vocab_size)
    bucket = torch.empty(rows, length - window + 1, dtype=torch.long)
    bad = loaded().history_cache(rows, length, window, order, vocab_size, text.data_ptr(), p.data_ptr(),
                                  bucket.data_ptr())
    if bad == -2:
        raise MemoryError("no memory for the cache's scratch")
    if bad >= 0:
        raise IndexError(f"a character index in row {bad} of the history is outside the vocabulary (size {vocab_size})")
    return p, bucket


def mix_log_probs(logits: torch.Tensor, weights: torch.Tensor, ngram: torch.Tensor | None,
                  cache: torch.Tensor) -> torch.Tensor | None:
    """mixture.MixtureLM's log-probabilities in one C pass per row: logits, ngram and cache (..., V),
    weights (..., 3); None where the kernels do not apply (the caller computes it as torch ops)."""
    if not applies(logits, weights, ngram, cache):
        return None
    shape, V = logits.shape, logits.shape[-1]
    logits, weights, cache = (t.reshape(-1, t.shape[-1]).contiguous() for t in (logits, weights, cache))
    ngram = ngram.reshape(-1, V).contiguous() if ngram is not None else None
    out = torch.empty_like(logits)
    loaded().mix_log_probs(logits.shape[0], V, logits.data_ptr(), weights.data_ptr(), pointer(ngram),
                            cache.data_ptr(), out.data_ptr())
    return out.view(shape)


def ngram_distributions(contexts: torch.Tensor, order: int, vocab_size: int,
                        flat: dict[str, numpy.ndarray]) -> torch.Tensor | None:
    """ngram.KneserNey.distributions in one C call: contexts (rows, width) of ids on a CPU, the tables as
    KneserNey.flat lays them out; (rows, V) float32, or None where the kernels do not apply."""
    if library() is None or contexts.device.type != "cpu":
        return None
    contexts = contexts.to(torch.int32).contiguous()
    out = torch.empty(contexts.shape[0], vocab_size)
    arrays = [flat[name] for name in ("ctx_ids", "ctx_start", "ctx_count", "ctx_first", "entry", "next", "value",
                                       "gamma")]
    if loaded().ngram_distributions(contexts.shape[0], contexts.shape[1], order, vocab_size, contexts.data_ptr(),
                                     *(a.ctypes.data for a in arrays), out.data_ptr()) == -2:
        raise MemoryError("no memory for the n-gram's scratch")
    return out


PANEL = 32  # kernels.c's columns per packed panel


def pack(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A (out, in) weight W packed for kernels.c's products: for X @ W^T (`transposed`: the
    forward's H W_hh^T) or for X @ W (the backward's dG W_hh)."""
    weight = weight.detach().contiguous()
    rows, cols = weight.shape
    N, K, stride_n, stride_k = (rows, cols, cols, 1) if transposed else (cols, rows, 1, cols)
    packed = weight.new_empty(-(-N // PANEL) * K * PANEL)
    loaded().pack_panels(N, K, weight.data_ptr(), stride_n, stride_k, packed.data_ptr())
    return packed


def recurrence_forward(cell: str, xg: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, w_hh: torch.Tensor,
                       b_hh: torch.Tensor | None, keep: bool):
    """`forward` with H_{t-1} W_hh^T + b_hh computed by kernels.c too: all steps in one C call
    (float32, no autocast). Same returns as `forward`."""
    steps, rows, n = xg.shape[0], h0.shape[0], h0.shape[1]
    hs, cs, saved = layer_outputs(cell, xg, h0, keep)
    hg = xg.new_empty(rows, w_hh.shape[0])
    # held here, not built inside the call's arguments: the call only gets their addresses
    packed, bias = pack(w_hh, transposed=True), b_hh.detach().contiguous() if b_hh is not None else None
    loaded().recurrence_forward(CELLS[cell], steps, rows, n, xg.data_ptr(), h0.data_ptr(), pointer(c0),
                                 packed.data_ptr(), pointer(bias), hg.data_ptr(), hs.data_ptr(), pointer(cs),
                                 pointer(saved), int(keep))
    return hs, cs, (saved if keep else None)


def recurrence_backward(cell: str, d_hs: torch.Tensor, d_c_last: torch.Tensor | None, h0: torch.Tensor, c0, hs, cs,
                        saved, w_hh: torch.Tensor):
    """`backward` with each step's dG W_hh computed by kernels.c too: all steps in one C call.
    Same returns as `backward`."""
    steps, rows, n = hs.shape
    dxg, dhg, ping, pong = backward_buffers(cell, d_hs, d_c_last, h0)
    dmm = torch.zeros_like(h0)
    packed = pack(w_hh, transposed=False)  # held here: the call only gets its address
    loaded().recurrence_backward(CELLS[cell], steps, rows, n, d_hs.data_ptr(), h0.data_ptr(), pointer(c0),
                                  hs.data_ptr(), pointer(cs), pointer(saved), packed.data_ptr(), dxg.data_ptr(),
                                  dhg.data_ptr(), dmm.data_ptr(), ping.data_ptr(), pong.data_ptr())
    last = pong if steps % 2 else ping  # the buffers swap roles every step
    d_h0 = dmm + last if cell == "gru" else dmm
    return dxg, dhg, d_h0, (last if cell == "lstm" else None)


def backward(cell: str, d_hs: torch.Tensor, d_c_last: torch.Tensor | None, h0: torch.Tensor, c0, hs, cs, saved,
             through_w_hh):
    """Backpropagation through the steps of `forward`. d_hs (steps, batch, n): the gradient of every
    step's H from above; d_c_last: of the last C (LSTM). through_w_hh(d) = d W_hh. Returns the
    gradients of xg and of the products H_{t-1} W_hh^T (both (steps, batch, gates * n); one tensor
    where they are equal), and of h0 and c0."""
    lib = loaded()
    steps, rows, n = hs.shape
    dxg, dhg, ping, pong = backward_buffers(cell, d_hs, d_c_last, h0)
    D, Hs, Cs, S, DX, DG = Steps(d_hs), Steps(hs), Steps(cs), Steps(saved), Steps(dxg), Steps(dhg)
    dmm = torch.zeros_like(h0)
    for t in range(steps - 1, -1, -1):
        h_prev = Hs[t - 1] if t else h0.data_ptr()
        if cell == "rnn":
            lib.rnn_backward(rows, n, dmm.data_ptr(), D[t], Hs[t], DX[t])
        elif cell == "gru":
            lib.gru_backward(rows, n, dmm.data_ptr(), ping.data_ptr(), D[t], h_prev, S[t], DX[t], DG[t],
                             pong.data_ptr())
        else:
            c_prev = Cs[t - 1] if t else c0.data_ptr()
            lib.lstm_backward(rows, n, dmm.data_ptr(), D[t], ping.data_ptr(), c_prev, S[t], DX[t], pong.data_ptr())
        ping, pong = pong, ping
        dmm = through_w_hh(dhg[t]).float()
    d_h0 = dmm + ping if cell == "gru" else dmm
    d_c0 = ping if cell == "lstm" else None
    return dxg, dhg, d_h0, d_c0


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """The index of each row's largest value (the first on ties) of finite or -inf logits (rows, V):
    the C kernel where it applies, else torch's argmax."""
    if not applies(logits):
        return logits.argmax(dim=1)
    logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.long)
    loaded().argmax_rows(logits.shape[0], logits.shape[1], logits.data_ptr(), out.data_ptr())
    return out


class Sampler:
    """The rounds of sampling.py's rejection sampler for one batch of logits (rows, V), in C: the
    first round computes each row's weights (unnormalised probabilities) and the running sums of
    its blocks of 64, later rounds redraw the rejected rows from them (see kernels.c,
    `sample_rows`). The small per-row arrays and the buffers are Python arrays and numpy, not
    tensors: every torch call lets go of the GIL and waits to get it back (see kernels_module.c), and a
    batch makes these once a step."""

    def __init__(self, logits: torch.Tensor, temperature, top_k, top_p):
        self.logits = logits.contiguous()
        rows, vocab = self.logits.shape
        self.temperature, self.top_k = array.array("f", temperature), array.array("q", top_k)
        self.top_p = array.array("f", top_p)
        self.weights = numpy.empty((rows, vocab), dtype=numpy.float32)  # unnormalised probabilities
        self.cdf = numpy.empty((rows, -(-vocab // 64)), dtype=numpy.float32)
        self.picks = torch.empty(rows, dtype=torch.long)
        self.fresh = True

    def round(self, rows: list[int], uniforms: list[float]) -> list[bool]:
        """Draw for `rows` (batch indices) with one uniform each; whether each draw survived."""
        index, u = array.array("q", rows), array.array("d", uniforms)
        ok = array.array("B", bytes(len(rows)))
        loaded().sample_rows(len(rows), self.logits.shape[1], address(index), self.logits.data_ptr(),
                              address(self.temperature), address(self.top_k), address(self.top_p), address(u),
                              int(self.fresh), self.weights.ctypes.data, self.cdf.ctypes.data,
                              self.picks.data_ptr(), address(ok))
        self.fresh = False
        return [bool(v) for v in ok]


def address(values: array.array) -> int:
    return values.buffer_info()[0]


class CrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy of logits (rows, V) against targets (rows,), label-smoothed by
    `eps`, in one C pass per row (kernels.c). The gradient is computed with the loss, when one
    will be wanted, so the backward only scales it. Returns (loss, mean nll); the nll is for
    reporting and carries no gradient."""

    @staticmethod
    def forward(ctx, logits, targets, eps):
        logits, targets = logits.contiguous(), targets.contiguous()
        rows, vocab = logits.shape
        nll, mean_logp = logits.new_empty(rows), logits.new_empty(rows)
        dlogits = torch.empty_like(logits) if ctx.needs_input_grad[0] else None
        loaded().cross_entropy(rows, vocab, logits.data_ptr(), targets.data_ptr(), eps, rows, nll.data_ptr(),
                                mean_logp.data_ptr(), pointer(dlogits))
        ctx.save_for_backward(dlogits)
        nll = nll.mean()
        loss = (1 - eps) * nll - eps * mean_logp.mean() if eps else nll.clone()
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, d_loss, d_nll):
        (dlogits,) = ctx.saved_tensors
        return dlogits if float(d_loss) == 1.0 else dlogits * d_loss, None, None


class OneHotGates(torch.autograd.Function):
    """X W_ih^T + b_ih for one-hot X: the first layer's input gates at every position, a lookup of
    W_ih's columns (kernels.c, `onehot_gates`). ids (batch, steps) -> (steps, batch, width), laid out
    time-major (what the recurrence reads). Its backward writes W_ih's whole gradient (zero in the
    columns of characters not read) and b_ih's in one pass. torch's index_select, bias addition,
    transposing copy and, backward, scatter-add and sum took ~1.8 ms per GRU batch of 32 x 35
    against ~0.35 ms here."""

    @staticmethod
    def forward(ctx, weight, bias, ids):
        width, vocab = weight.shape
        weight, bias = weight.contiguous(), bias.contiguous() if bias is not None else None
        positions = ids.t().contiguous()  # time-major
        out = weight.new_empty(*positions.shape, width)
        bad = loaded().onehot_gates(positions.numel(), width, vocab, weight.data_ptr(), pointer(bias),
                                     positions.data_ptr(), out.data_ptr())
        if bad >= 0:
            raise IndexError(f"character index {int(positions.view(-1)[bad])} is outside the vocabulary "
                             f"(size {vocab})")
        ctx.save_for_backward(positions)
        ctx.shape, ctx.has_bias = (width, vocab), bias is not None
        return out

    @staticmethod
    def backward(ctx, d_out):
        (positions,) = ctx.saved_tensors
        width, vocab = ctx.shape
        d_out = d_out.contiguous()
        d_weight = d_out.new_empty(width, vocab)
        d_bias = d_out.new_empty(width) if ctx.has_bias else None
        loaded().onehot_gates_backward(positions.numel(), width, vocab, d_out.data_ptr(), positions.data_ptr(),
                                        d_weight.data_ptr(), pointer(d_bias))
        return d_weight, d_bias, None


def onehot_gates(weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor) -> torch.Tensor | None:
    """`OneHotGates` where the kernels apply (float32 weights on a CPU, int64 ids), else None."""
    if ids.dtype != torch.int64 or ids.device.type != "cpu" or not applies(weight, bias):
        return None
    return OneHotGates.apply(weight, bias, ids)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0):
    """(loss, mean nll) of logits (rows, V) against targets (rows,): loss = (1 - eps) * nll - eps *
    the mean log-probability over the vocabulary (label smoothing eps, with the plain nll kept for
    the perplexity). The C kernel where it applies, else torch's log_softmax (in float32)."""
    logits = logits.float()  # bfloat16 logits too: a bfloat16 log-softmax slows convergence visibly
    if applies(logits) and targets.dtype == torch.int64:
        return CrossEntropy.apply(logits, targets, float(label_smoothing))
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1)
    nll = torch.nn.functional.nll_loss(log_probs, targets)
    return ((1 - label_smoothing) * nll - label_smoothing * log_probs.mean() if label_smoothing else nll), nll


ENABLED = _library is not None  # tests switch it off to compare with the torch cells
