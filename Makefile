# Set-up and everyday commands. `make run` and `make test` create or reuse .venv and
# install the pinned dependencies first.

VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CORPUS ?= ../shared/data/jaychou_lyrics.txt
PREFIX ?= 分开

.PHONY: install run test lint format bench-train models clean

# setup.py builds the C kernels at install: a change to them reinstalls
$(STAMP): pyproject.toml setup.py model_store/kernels.c model_store/kernels_module.c
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lyrics serve $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT))

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest
	# the service again on the torch fallback, end to end: what a machine without the kernels runs
	LYRICS_KERNELS=0 $(PY) -m pytest -q tests/app

lint: $(STAMP)
	$(VENV)/bin/ruff check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .

bench-train: $(STAMP)
	$(PY) bench/train_speed.py --corpus $(CORPUS) --ppl-seeds 5

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
