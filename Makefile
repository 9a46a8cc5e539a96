# Set-up and everyday commands. `make run` and `make test` create or reuse .venv and
# install the pinned dependencies first.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORPUS ?= ../shared/data/jaychou_lyrics.txt
PREFIX ?= 分开

.PHONY: install run test lint format bench-train models clean lock

# Dependencies come from the lock file (exact versions with hashes, `make lock`), torch first (its
# CPU build, which the lock leaves out: CPU and CUDA builds differ by index); then the project itself,
# whose install builds the C kernels (setup.py): a change to them reinstalls.
$(STAMP): pyproject.toml requirements-dev.txt setup.py model_store/kernels.c model_store/kernels_module.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements-dev.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lyrics serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(PY) -m pytest
	# the service again on the torch fallback, end to end: what a machine without the kernels runs
	LYRICS_KERNELS=0 $(PY) -m pytest -q tests/app

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .

bench-train: $(STAMP)
	$(PY) bench/train_speed.py --corpus $(CORPUS) --ppl-seeds 5

# Re-resolve the lock files from pyproject.toml's ranges (the lowest versions they allow: the ones
# tested): requirements-serve.txt for the image, requirements-dev.txt for everything else. torch is
# resolved as its CPU build, found at TORCH_LINKS (/opt/wheels on the project's build machines).
TORCH_LINKS ?= https://download.pytorch.org/whl/cpu/torch/
lock: $(STAMP)
	printf 'torch==2.13.0+cpu\n' > $(VENV)/torch-cpu.txt
	for extra in serve dev; do \
		$(VENV)/bin/uv pip compile pyproject.toml --extra $$extra --resolution lowest-direct --generate-hashes \
			--python-version 3.11 --find-links $(TORCH_LINKS) --override $(VENV)/torch-cpu.txt \
			--no-emit-package torch --quiet -o requirements-$$extra.txt || exit 1; \
	done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
