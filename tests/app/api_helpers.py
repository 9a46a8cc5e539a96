"""Small helpers shared by the service tests (parsing SSE, reading metrics, checking the error shape)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families


def parse_sse(text: str) -> list[tuple[str, str]]:
    """(event name, data) pairs of a server-sent-events body; unnamed events are 'message'."""
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name, data = "message", []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
        events.append((name, "\n".join(data)))
    return events


def stream_parts(text: str) -> tuple[dict[int, str], dict, list[tuple[str, str]]]:
    """Text per choice index from the chunk events, the final event's body, and all events."""
    events = parse_sse(text)
    chunks: dict[int, str] = {}
    final = None
    for name, data in events:
        if name == "message" and data != "[DONE]":
            chunk = json.loads(data)
            chunks[chunk["index"]] = chunks.get(chunk["index"], "") + chunk["text"]
        elif name == "final":
            final = json.loads(data)
    return chunks, final, events


def metric(text: str, name: str, **labels) -> float:
    """The value of one sample in a Prometheus text exposition (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def assert_error(response, status: int, type: str | None = None) -> dict:
    """The one error shape: {"error": {"type", "message", "details"?}}; returns the inner object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) <= {"type", "message", "details"} and {"type", "message"} <= set(error)
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text
    if type is not None:
        assert error["type"] == type, error
    return error


def start_server(command: list[str], env: dict[str, str], log_path, cwd=None) -> subprocess.Popen:
    """Start a server process with its output in `log_path`."""
    log = open(log_path, "wb")  # closed by stop_server
    process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT)
    process.log_file = log
    return process


def wait_ready(base_url: str, process: subprocess.Popen, log_path, timeout: float = 90.0) -> None:
    """Poll /readyz until it answers 200; fail with the server's log if it exits or takes too long."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}:\n{read_tail(log_path)}")
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"server not ready after {timeout} s:\n{read_tail(log_path)}")


def stop_server(process: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL if it does not."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    process.log_file.close()
    return process.returncode


def read_tail(path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")[-chars:]
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


LYRICS = str(Path(sys.executable).parent / "lyrics")


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without LYRICS_* settings (but LYRICS_KERNELS: a run of the suite with
    the kernels off runs its servers so), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LYRICS_") or k == "LYRICS_KERNELS"}
    return {**env, **extra}


@contextmanager
def serving(model_dir, log_path, **env: str):
    """`lyrics serve` on `model_dir` at a free loopback port, ready: yields (base_url, process)."""
    port = free_port()
    process = start_server([LYRICS, "serve", "--host", "127.0.0.1", "--port", str(port), "--model-dir",
                            str(model_dir), "--device", "cpu"], clean_env(**env), log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process, log_path)
        yield base_url, process
    finally:
        stop_server(process)
