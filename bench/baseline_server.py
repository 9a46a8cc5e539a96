"""The per-request baseline that bench/serve_load.py measures the service against.

A plain FastAPI endpoint around the tutorial's `predict_rnn_pytorch` (bench/tutorial_baseline.py)
as the tutorial writes it: the tutorial's `RNNModel` (nn.GRU fed a one-hot built per step, dense
layer), the prefix fed one character per call, one request at a time per thread, no batching.
The tutorial only predicts greedily; for sampled requests the same loop replaces its argmax with
the usual softmax, top-p cut and `torch.multinomial` (the tutorial-style way to sample).

    BENCH_CHECKPOINT=model.safetensors uvicorn --app-dir bench --factory baseline_server:create_app
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # model_store, for reading the checkpoint
from tutorial_baseline import RNNModel, predict_rnn_pytorch  # noqa: E402

from model_store.checkpoint import load_checkpoint  # noqa: E402


class Request(BaseModel):
    prefix: str
    max_chars: int = 50
    temperature: float = 0.0
    top_p: float = 1.0


def tutorial_model(path: str) -> tuple[RNNModel, list[str], dict[str, int]]:
    """The project's one-hot GRU checkpoint loaded into the tutorial's RNNModel: the same tensors
    (a one-hot model's rnn.weight_ih_l0 is (3H, V), exactly nn.GRU(V, H)'s)."""
    ck = load_checkpoint(path, "cpu", impl="scratch")
    c = ck.config
    assert c.cell == "gru" and c.embed_size == 0 and c.num_layers == 1, "the baseline needs a one-hot 1-layer GRU"
    model = RNNModel(nn.GRU(c.vocab_size, c.hidden_size), c.vocab_size)
    model.load_state_dict(ck.model.state_dict())
    model.eval()
    return model, ck.vocab.idx_to_char, ck.vocab.char_to_idx


def predict_sampled(prefix, num_chars, model, vocab_size, device, idx_to_char, char_to_idx, temperature, top_p):
    """predict_rnn_pytorch with the argmax replaced by top-p sampling."""
    state = None
    output = [char_to_idx[prefix[0]]]
    for t in range(num_chars + len(prefix) - 1):
        X = torch.tensor([output[-1]], device=device).view(1, 1)
        (Y, state) = model(X, state)
        if t < len(prefix) - 1:
            output.append(char_to_idx[prefix[t + 1]])
        else:
            probs = torch.softmax(Y[0] / temperature, dim=0)
            sorted_probs, order = probs.sort(descending=True)
            keep = (sorted_probs.cumsum(0) - sorted_probs) < top_p
            output.append(order[torch.multinomial(sorted_probs * keep, 1)].item())
    return "".join([idx_to_char[i] for i in output])


def create_app() -> FastAPI:
    torch.set_num_threads(int(os.environ.get("BENCH_TORCH_THREADS", "0")) or torch.get_num_threads())
    model, idx_to_char, char_to_idx = tutorial_model(os.environ["BENCH_CHECKPOINT"])
    vocab_size = len(idx_to_char)
    app = FastAPI()

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    @app.post("/generate")
    def generate(r: Request) -> dict:  # a plain def: FastAPI runs it on its thread pool
        with torch.no_grad():
            if r.temperature == 0:
                text = predict_rnn_pytorch(r.prefix, r.max_chars, model, vocab_size, "cpu", idx_to_char, char_to_idx)
            else:
                text = predict_sampled(r.prefix, r.max_chars, model, vocab_size, "cpu", idx_to_char, char_to_idx,
                                       r.temperature, r.top_p)
        return {"text": text, "usage": {"generated_chars": len(text) - len(r.prefix)}}

    return app
