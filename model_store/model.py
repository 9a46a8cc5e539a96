"""The character language model: input step, recurrent cell stack, dense output layer.

One weight layout, two implementations:

* `scratch` runs the recurrence one time step at a time with the cell equations written
  out in cells.py (the tutorial's formulas, readable line by line), and backpropagates
  through time with their derivatives written out too.
* `fused` hands the same tensors to torch.nn.RNN/GRU/LSTM (cuDNN on a GPU, ATen's
  C++ loop on a CPU).

On a CPU in float32 the matrix products of `scratch` run on oneDNN (onednn.py). A model
loaded for serving is `pack()`ed: its generation and scoring then run `scratch` on packed
weights whatever its impl, which is faster and makes a row's result independent of its batch.

The weights are named and shaped as torch.nn.RNN/GRU/LSTM names them
(`rnn.weight_ih_l0` is W_xh transposed, gate blocks stacked in torch's order), so a
checkpoint loads into either implementation.

Input step. With `embed_size == 0` the input is the tutorial's one-hot vector and
`X_t @ W_xh` is computed as a row lookup into W_xh: the same product without building a
vocabulary-wide one-hot matrix. torch.nn's fused modules cannot take a looked-up
product, only the one-hot itself, so one-hot models run on `scratch`. With
`embed_size > 0` a learned embedding of that width feeds the first layer and both
implementations apply.

GRU note: torch (and cuDNN) apply the reset gate after the hidden product,
`R * (H @ W_hh + b_hn)`, where the tutorial writes `(R * H) @ W_hh`. One weight layout
for both implementations means one formula, so `scratch` uses torch's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from model_store import kernels, onednn
from model_store.cells import recurrence
from model_store.kernels import GATES

IMPLS = ("scratch", "fused")

# float32 means float32 on every device. torch's matrix products already default to it, but its
# cuDNN RNNs default to TensorFloat-32 (a 10-bit mantissa): on an H100 that moved the bundled
# models' /perplexity by 1e-4 against the CPU and their logits by 1e-3. The legacy flag is the
# one set here: setting the newer per-operator one makes reading this flag raise.
torch.backends.cudnn.allow_tf32 = False

# A model's recurrent state, the one type every module passes around: H (rnn, gru) or (H, C) (lstm),
# each (layers, batch, hidden); a mixture's adds the text its cache reads, (1, batch, window).
State = torch.Tensor | tuple[torch.Tensor, ...]


def state_parts(state: State) -> tuple[torch.Tensor, ...]:
    """The state's tensors, one or several."""
    return state if isinstance(state, tuple) else (state,)


def split_state(state: State) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A recurrent model's (H, C): C for an LSTM, else None."""
    return (state[0], state[1]) if isinstance(state, tuple) else (state, None)


def dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Training-time inverted dropout, as F.dropout: each element zeroed with probability p, the rest
    scaled by 1 / (1 - p). The mask is drawn with uniform_ rather than F.dropout's bernoulli_, which
    on a CPU costs ~4x as much and took 14% of a default-recipe batch (docs/benchmarks.md)."""
    keep = torch.empty_like(x).uniform_().ge_(p).mul_(1 / (1 - p))
    return x * keep


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model's architecture; stored in each checkpoint."""

    cell: str
    vocab_size: int
    hidden_size: int = 256
    num_layers: int = 1
    embed_size: int = 0  # 0: one-hot input, as the tutorial; > 0: a learned embedding
    dropout: float = 0.0  # on the embedding, between stacked layers and before the dense layer
    weight_drop: float = 0.0  # DropConnect on the recurrent weights W_hh while training (AWD-LSTM)
    tie_weights: bool = False  # the dense layer reuses the embedding matrix (needs embed_size == hidden_size)

    def __post_init__(self):
        if self.cell not in GATES:
            raise ValueError(f"cell must be one of {sorted(GATES)}, not {self.cell!r}")
        for name in ("vocab_size", "hidden_size", "num_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, not {getattr(self, name)!r}")
        if not isinstance(self.embed_size, int) or self.embed_size < 0:
            raise ValueError(f"embed_size must be 0 (one-hot) or positive, not {self.embed_size!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout!r}")
        if not 0.0 <= self.weight_drop < 1.0:
            raise ValueError(f"weight_drop must be in [0, 1), not {self.weight_drop!r}")
        if self.tie_weights and self.embed_size != self.hidden_size:
            raise ValueError(f"tie_weights needs embed_size == hidden_size, not {self.embed_size} and {self.hidden_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class CharLM(nn.Module):
    """Character-level language model. `forward(inputs, state)` maps (batch, steps) indices
    to (batch, steps, vocab) logits and the new state."""

    def __init__(self, config: ModelConfig, impl: str = "auto"):
        super().__init__()
        self.config = config
        input_size = config.embed_size or config.vocab_size
        self.embedding = nn.Embedding(config.vocab_size, config.embed_size) if config.embed_size else None
        rnn_class = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[config.cell]
        self.rnn = rnn_class(input_size, config.hidden_size, config.num_layers,
                             dropout=config.dropout if config.num_layers > 1 else 0.0, batch_first=True)
        self.dense = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            if self.embedding is None:
                raise ValueError("tie_weights needs an embedding (embed_size equal to hidden_size)")
            # as an output layer, nn.Embedding's N(0, 1) rows would start with huge logits
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            self.dense.weight = self.embedding.weight
        self.impl = impl
        self.packed: dict[str, onednn.PackedLinear] = {}  # see pack()
        self.input_table: InputTable | None = None  # see pack()
        self.step_layers: list[tuple] = []  # see pack() and _generation_step()

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, impl: str) -> None:
        if impl == "auto":
            impl = "fused" if self.config.embed_size else "scratch"
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS} or 'auto', not {impl!r}")
        if impl == "fused" and not self.config.embed_size:
            raise ValueError("impl 'fused' needs an embedding (embed_size > 0): torch.nn's fused "
                             "RNNs would multiply a vocabulary-wide one-hot; use impl 'scratch'")
        self._impl = impl

    def weight_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a checkpoint stores: the state dict less a tied dense weight, which is
        the embedding's own tensor (safetensors refuses to store one tensor twice)."""
        state = self.state_dict()
        if self.config.tie_weights:
            del state["dense.weight"]
        return state

    def pack(self) -> bool:
        """Keep copies of the weight matrices in oneDNN's layout for generation and scoring
        (model_store/onednn.py): the matrix products of a step without a gradient then run 2-3x
        faster on a CPU, and an inference step takes the `scratch` path, which uses them.
        Training is unaffected. False where oneDNN is not available (or not a CPU). Also builds
        the fused cell kernels (kernels.py) now, so that a first request does not wait for that."""
        if not onednn.available() or self.dense.weight.device.type != "cpu":
            return False
        names = ["dense"] + [f"rnn.weight_{kind}_l{layer}" for layer in range(self.config.num_layers)
                             for kind in ("ih", "hh") if layer or kind == "hh" or self.embedding is not None]
        params = dict(self.named_parameters(remove_duplicate=False))
        for name in names:
            weight = params[name + ".weight"] if name == "dense" else params[name]
            bias = params["dense.bias"] if name == "dense" else params[name.replace("weight", "bias")]
            self.packed[name] = onednn.PackedLinear(weight, bias)
        self.input_table = InputTable(self)
        if kernels.applies(self.dense.weight):  # each layer's packed input (above the first) and W_hh products
            self.step_layers = [(self.packed.get(f"rnn.weight_ih_l{layer}") if layer else None,
                                 self.packed[f"rnn.weight_hh_l{layer}"]) for layer in range(self.config.num_layers)]
        return True

    @property
    def is_packed(self) -> bool:
        return bool(self.packed)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def init_state(self, batch_size: int, device=None) -> State:
        device = device or self.dense.weight.device
        c = self.config
        zeros = torch.zeros(c.num_layers, batch_size, c.hidden_size, device=device)
        return (zeros, zeros.clone()) if c.cell == "lstm" else zeros

    def forward(self, inputs: torch.Tensor, state: State | None = None,
                last_only: bool = False) -> tuple[torch.Tensor, State]:
        """With `last_only`, the logits of the last step alone, (batch, 1, vocab): what a prefill
        needs, without the output layer's work for every other position."""
        if state is None:
            state = self.init_state(inputs.shape[0], inputs.device)
        if (inputs.shape[1] == 1 or last_only) and inputs.shape[1] and self.fast_step(inputs.device):
            # a generation step, or a prefill: the one-step path position by position (the same
            # arithmetic in fewer torch calls), the output layer at the last position only
            columns = inputs.t().contiguous()
            for ids in columns[:-1]:
                state = self._advance(ids, state)
            logits, state = self._generation_step(columns[-1], state)
            return logits[:, None], state
        # DropConnect needs the per-step path, which takes W_hh as an argument; so do packed weights
        packed_step = self.packed and not torch.is_grad_enabled() and inputs.device.type == "cpu"
        if self.impl == "fused" and not (self.training and self.config.weight_drop) and not packed_step:
            assert self.embedding is not None  # ModelConfig: fused needs an embedding
            hiddens, state = self.rnn(self.drop(self.embedding(inputs)), state)
        else:
            hiddens, state = self._scratch(inputs, state)
        if last_only:
            hiddens = hiddens[:, -1:].contiguous()
        return self.linear("dense", self.drop(hiddens), self.dense.weight, self.dense.bias), state

    def step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """One generation step: ids (batch,) -> next-character logits (batch, vocab) and the new
        state; `forward` on one position, called directly on the packed CPU path (it runs once
        per character, so nn.Module's call machinery is worth skipping)."""
        if self.fast_step(ids.device):
            return self._generation_step(ids, state)
        logits, state = self(ids[:, None], state)
        return logits[:, -1], state

    def fast_step(self, device: torch.device) -> bool:
        """Whether a one-position call takes `_generation_step`: packed with the kernels built, on a
        CPU, in eval mode, without a gradient."""
        return (bool(self.step_layers) and not self.training and not torch.is_grad_enabled()
                and device.type == "cpu" and kernels.ENABLED)

    def linear(self, name: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x W^T + b. A (batch, steps, features) x laid out time-major in memory (the recurrence's
        output) is multiplied in that layout and the result handed back as the same kind of view:
        oneDNN then reads and writes contiguous rows, and the gradients come back contiguous."""
        if x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous():
            return onednn.linear(x.transpose(0, 1), weight, bias, self.packed.get(name)).transpose(0, 1)
        return onednn.linear(x, weight, bias, self.packed.get(name))

    def drop(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.config.dropout) if self.training and self.config.dropout else x

    def input_gates(self, inputs: torch.Tensor) -> torch.Tensor:
        """X_t @ W_xh + b_ih of the first layer for every step: (batch, steps, gates * hidden), laid
        out time-major in memory (what the recurrence reads).

        One-hot input: a lookup of W_xh's rows, which are the columns of `weight_ih_l0` (stored
        transposed): in one C pass where the kernels apply (kernels.OneHotGates), else by torch.
        Gathering columns of the contiguous weight, not rows of its transpose, makes torch's lookup
        and its gradient about 2x faster."""
        w_ih, b_ih = self.rnn.weight_ih_l0, self.rnn.bias_ih_l0
        if self.input_table is not None and not torch.is_grad_enabled() and not self.training:
            return self.input_table.lookup(inputs)
        if self.embedding is None:
            gates = kernels.onehot_gates(w_ih, b_ih, inputs)
            if gates is not None:
                return gates.transpose(0, 1)
            batch, steps = inputs.shape
            columns = w_ih.index_select(1, inputs.t().reshape(-1))  # (gates * hidden, steps * batch)
            return (columns.t().view(steps, batch, w_ih.shape[0]) + b_ih).transpose(0, 1)
        # embedded time-major, so that the product comes out in the recurrence's layout (no copy)
        embedded = self.drop(self.embedding(inputs.t()))
        return self.linear("rnn.weight_ih_l0", embedded, w_ih, b_ih).transpose(0, 1)

    def _scratch(self, inputs: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        cell = self.config.cell
        h_all, c_all = split_state(state)
        layer_input = inputs  # each layer's output becomes the next one's input
        h_out: list[torch.Tensor] = []
        c_out: list[torch.Tensor] = []
        for layer in range(self.config.num_layers):
            w_hh = getattr(self.rnn, f"weight_hh_l{layer}")
            b_hh = getattr(self.rnn, f"bias_hh_l{layer}")
            if self.training and self.config.weight_drop:
                w_hh = dropout(w_hh, self.config.weight_drop)
            if layer == 0:
                xg = self.input_gates(inputs)
            else:
                xg = self.linear(f"rnn.weight_ih_l{layer}", self.drop(layer_input),
                                 getattr(self.rnn, f"weight_ih_l{layer}"), getattr(self.rnn, f"bias_ih_l{layer}"))
            h0, c0 = h_all[layer], (c_all[layer] if c_all is not None else None)
            # gate arithmetic in the state's dtype: under bfloat16 autocast a layer's input product is
            # bfloat16 while the state stays float32 (and torch's lerp refuses to mix them)
            xg = xg.transpose(0, 1).contiguous().to(h0.dtype)
            hs, c_last = recurrence(cell, xg, h0, c0, w_hh, b_hh,
                                    self.packed.get(f"rnn.weight_hh_l{layer}"))
            layer_input = hs.transpose(0, 1)
            h_out.append(hs[-1])
            if c_last is not None:
                c_out.append(c_last)
        new_state = (torch.stack(h_out), torch.stack(c_out)) if cell == "lstm" else torch.stack(h_out)
        return layer_input, new_state

    def _generation_step(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        """`_advance`, then the next-character logits from the last layer's new H."""
        state = self._advance(ids, state)
        return self.packed["dense"](split_state(state)[0][-1]), state

    def _advance(self, ids: torch.Tensor, state: State) -> State:
        """One step of a packed model without a gradient, on a CPU: `_scratch`'s arithmetic (the
        input table, the packed products, the fused cells) with as few torch calls as it takes, for
        generation, which makes one such call per character (a prefill's positions before the last
        need no logits). Each torch call lets go of the GIL and waits to get it back, and a server's
        event loop holds it while it handles requests."""
        cell, layers = self.config.cell, self.config.num_layers
        h_all, c_all = split_state(state)
        h_all = h_all.contiguous()
        c_all = c_all.contiguous() if c_all is not None else None
        h_new = torch.empty_like(h_all)
        c_new = torch.empty_like(c_all) if c_all is not None else None
        assert self.input_table is not None  # packed: fast_step() holds
        x: torch.Tensor = self.input_table.current()
        index: torch.Tensor | None = ids.contiguous()
        for layer, (input_product, hidden_product) in enumerate(self.step_layers):
            if layers == 1:  # no per-layer views: one torch call fewer each
                h, c, h_out, c_out = h_all, c_all, h_new, c_new
            else:
                h, h_out = h_all[layer], h_new[layer]
                c = c_all[layer] if c_all is not None else None
                c_out = c_new[layer] if c_new is not None else None
            if layer:
                x, index = input_product(h_new[layer - 1]), None
            kernels.step(cell, x, index, hidden_product(h), h, c, h_out, c_out)
        return (h_new, c_new) if c_new is not None else h_new


class InputTable:
    """A packed model's first-layer input gates for every vocabulary entry, (vocab, gates * hidden):
    X W_ih^T + b_ih of the one-hot or embedded character, computed once, so that a generation
    step's input is one row lookup instead of a gather, a transpose and a bias addition (or an
    embedding and a product). The same arithmetic row by row, so a lookup equals the computed
    gates. Rebuilt when a weight it was made from changes in place."""

    def __init__(self, model: CharLM):
        self.model = model
        self.sources = [model.rnn.weight_ih_l0, model.rnn.bias_ih_l0]
        if model.embedding is not None:
            self.sources.append(model.embedding.weight)
        self.build()

    def build(self) -> None:
        model, training = self.model, self.model.training
        model.input_table = None  # computed the ordinary way, without dropout
        with torch.no_grad():
            model.eval()
            every = torch.arange(model.config.vocab_size, device=model.dense.weight.device)[:, None]
            self.table = model.input_gates(every)[:, 0].contiguous()
            model.train(training)
        self.versions = [onednn.version(t) for t in self.sources]
        model.input_table = self

    def lookup(self, inputs: torch.Tensor) -> torch.Tensor:
        """(batch, steps, gates * hidden), laid out time-major in memory, like CharLM.input_gates."""
        batch, steps = inputs.shape
        return self.rows(inputs.t().reshape(-1)).view(steps, batch, -1).transpose(0, 1)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), gates * hidden): the table's rows at ids (1-d)."""
        return self.current().index_select(0, ids)

    def current(self) -> torch.Tensor:
        """The table, rebuilt first if a weight it was made from has changed."""
        if [onednn.version(t) for t in self.sources] != self.versions:
            self.build()
        return self.table
