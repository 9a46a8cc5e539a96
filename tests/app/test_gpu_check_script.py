"""scripts/gpu_check.py: exits 2 without CUDA, and its service comparison runs (here CPU against CPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_exits_2_without_cuda():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert '"no CUDA device"' in result.stdout


def test_app_comparison_runs_and_passes_on_equal_devices(model_dir):
    summary, failures = load_script().check_app(model_dir, device="cpu", reference="cpu")
    assert failures == []
    assert set(summary) == {"gru", "rnn"}
    assert all(s["device"] == "cpu" and s["greedy_equal"] and s["sampled_equal"] and s["perplexity_max_rel_diff"] == 0
               for s in summary.values())


def test_app_comparison_reports_a_failure(model_dir):
    summary, failures = load_script().check_app(model_dir / "missing", device="cpu")
    assert failures and "error" in summary


def test_engine_comparison_runs_and_passes_on_the_cpu(model_dir):
    summary, failures = load_script().check_engine(model_dir / "gru.safetensors", device="cpu")
    assert failures == []
    assert summary["requests"] == 24 and summary["greedy_unequal"] == summary["sampled_unequal"] == 0
    assert summary["chars_per_s_c64_cpu"] > 0


def test_mixture_comparison_runs_and_passes_on_the_cpu(model_dir):
    summary, failures = load_script().check_mixture(model_dir / "gru.safetensors", device="cpu")
    assert failures == [] and summary["max_abs_log_prob_diff_vs_cpu"] == 0


def test_parting_finds_where_two_texts_part_and_the_gap_there(checkpoints):
    ck = checkpoints["gru"]
    text = ck.vocab.idx_to_char
    common, gap = load_script().parting(ck, text[0] + text[1] + text[2], text[0] + text[1] + text[3])
    assert common == text[0] + text[1] and gap >= 0
    assert load_script().parting(ck, text[0], text[0])[0] == text[0]
