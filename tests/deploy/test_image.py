"""The Dockerfile built and run for real, with podman: the container becomes healthy, answers
/generate and /perplexity, runs as non-root on a read-only root filesystem, and on SIGTERM finishes
the request in flight before it exits 0.

It takes minutes (a Debian base image made with debootstrap, the image built offline from a
wheelhouse), so `make test` skips it and `.ci/run` runs it after: LYRICS_IMAGE_TEST=1 turns it on,
and then a missing podman, runc or debootstrap is a failure, not a skip. As on the project's build
machines: root, podman with the runc runtime and no default ulimits (containers.conf, written here),
only Debian's mirror reachable from inside a build, so the Python packages come from a wheelhouse
downloaded outside it (the lock file's, checked by hash; torch's CPU build; the build backend).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BASE = "localhost/lyrics-base:bookworm"
IMAGE = "localhost/lyrics:test"
MIRROR = "http://deb.debian.org/debian"

pytestmark = pytest.mark.skipif(os.environ.get("LYRICS_IMAGE_TEST") != "1",
                                reason="builds and runs the image (minutes): .ci/run sets LYRICS_IMAGE_TEST=1")


def run(*command: str, timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def pip(*args: str) -> None:
    run(sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args)


@pytest.fixture(scope="module")
def podman(tmp_path_factory):
    """podman with runc and no default ulimits, through a containers.conf of this test's own."""
    for tool in ("podman", "runc", "debootstrap"):
        assert shutil.which(tool), f"{tool} is missing (.ci/run installs it: apt-get install podman runc debootstrap)"
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n[engine]\nruntime = "runc"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)
    return "podman"


@pytest.fixture(scope="module")
def image(podman, tmp_path_factory):
    """The image, built from the repository as `docker build` would, offline: BASE_IMAGE a Debian
    bookworm made with debootstrap (kept between runs), Python packages from a wheelhouse."""
    work = tmp_path_factory.mktemp("image")
    if subprocess.run([podman, "image", "exists", BASE]).returncode != 0:
        rootfs = work / "rootfs"
        run("debootstrap", "--variant=minbase", "--include=python3,python3-venv", "bookworm", str(rootfs), MIRROR)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(podman, "import", "-", BASE, stdin=tar.stdout)
        tar.wait()
    wheels = work / "wheels"
    pip("download", "--require-hashes", "-r", str(ROOT / "requirements-serve.txt"), "-d", str(wheels))
    backend = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    # the Makefile's torch (pip finds its CPU build on these machines' disk) and the build backend
    torch = next(word for line in (ROOT / "Makefile").read_text().splitlines() for word in line.split()
                 if word.startswith("torch=="))
    pip("download", "--no-deps", "-d", str(wheels), torch, *backend)
    assert any(w.name.startswith("torch-") and "+cpu" in w.name for w in wheels.iterdir()), "no CPU build of torch"
    run(podman, "build", "--format", "docker", "-v", f"{wheels}:/wheels:ro", "--build-arg", f"BASE_IMAGE={BASE}",
        "--build-arg", "PIP_FIND_LINKS=/wheels", "--build-arg", "PIP_NO_INDEX=1", "--build-arg", "TORCH_INDEX=",
        "-t", IMAGE, str(ROOT), timeout=1800)
    return IMAGE


@pytest.fixture
def container(podman, image):
    """The image running as `docker run -d --read-only -p PORT:8000` would: yields (name, base URL)."""
    port = free_port()
    name = f"lyrics-test-{port}"
    run(podman, "run", "-d", "--read-only", "--name", name, "-p", f"127.0.0.1:{port}:8000", image)
    try:
        yield name, f"http://127.0.0.1:{port}"
    finally:
        subprocess.run([podman, "rm", "-f", "-t", "0", name], capture_output=True, timeout=120)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(podman: str, name: str, timeout: float = 120) -> None:
    """Until the image's own HEALTHCHECK passes (podman runs it on request)."""
    deadline = time.monotonic() + timeout
    while subprocess.run([podman, "healthcheck", "run", name], capture_output=True).returncode != 0:
        state = run(podman, "inspect", name, "--format", "{{.State.Status}}").stdout.strip()
        assert state == "running", f"the container is {state}:\n" + run(podman, "logs", name).stderr[-3000:]
        assert time.monotonic() < deadline, "not healthy in time:\n" + run(podman, "logs", name).stderr[-3000:]
        time.sleep(1)


def test_the_image_serves_as_non_root_on_a_read_only_root_and_drains_on_sigterm(podman, container):
    name, url = container
    wait_healthy(podman, name)
    answer = httpx.post(f"{url}/generate", json={"prefix": "分开", "max_chars": 30, "temperature": 0}, timeout=60)
    assert answer.status_code == 200 and answer.json()["text"].startswith("分开")
    assert len(answer.json()["generated"]) == 30
    scored = httpx.post(f"{url}/perplexity", json={"text": "分开的爱 我不要"}, timeout=60)
    assert scored.status_code == 200 and scored.json()["perplexity"] > 1
    metrics = httpx.get(f"{url}/metrics", timeout=30).text
    assert 'lyrics_kernels_info{build="none"}' not in metrics and "lyrics_kernels_info{build=" in metrics

    assert run(podman, "exec", name, "id", "-u").stdout.strip() != "0"
    assert run(podman, "inspect", name, "--format", "{{.HostConfig.ReadonlyRootfs}}").stdout.strip() == "true"
    assert subprocess.run([podman, "exec", name, "touch", "/opt/lyrics/written"], capture_output=True).returncode != 0

    # SIGTERM while a long stream is in flight: it runs to its end, then the container exits 0
    events, started = [], threading.Event()

    def stream() -> None:
        body = {"prefix": "分开", "max_chars": 1500, "stream": True}
        with httpx.stream("POST", f"{url}/generate", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    started.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert started.wait(60), "the stream never started"
    run(podman, "stop", "-t", "60", name)  # SIGTERM, then SIGKILL after 60 s
    reader.join(120)
    assert events[-1] == "[DONE]", events[-3:]
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["generated_chars"] == 1500
    assert run(podman, "inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip() == "0"
