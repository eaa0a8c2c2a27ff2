# Two commands do all the set-up on a fresh machine:
#   make run    - set up, then run the main job on the built-in default (the demo sweep)
#   make test   - set up, then run the test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first and pinned so pip never swaps in another build. On a CPU-only
# machine with the local wheel cache this is the CPU build; on a GPU machine PyPI's default
# (CUDA) build of the same version. Override with `make TORCH_SPEC=torch==X.Y setup`.
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup run test lint bench clean browser

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

run: setup
	$(VENV)/bin/lora-sweep run

# Debian's headless Chromium for the report's browser test (tests/test_report_browser.py drives it with
# Playwright; no browser download). Installed only when missing.
CHROMIUM ?= /usr/bin/chromium

browser:
	@test -x $(CHROMIUM) || { DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }

test: setup browser
	$(VENV)/bin/ruff check lora_core sweeps dashboards tests bench
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check lora_core sweeps dashboards tests bench

bench: setup
	$(PY) bench/layer.py --out bench/results/layer-latest.json
	$(PY) bench/default_trial.py --out bench/results/default-trial-latest.json
	$(PY) bench/sweep_overhead.py --out bench/results/sweep-overhead-latest.json

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
