# Quick start: `make demo` and `make test`. Both create .venv and install on first use.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test lint install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# On a machine without CUDA pin the CPU build first; otherwise keep the installed torch (>=2.11).
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q "torch==2.13.0"; fi
	$(PY) -m pip install -q -e ".[triton,server,demo,dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/valora demo

# Two workers, a test file each at a time (a module's server or Ray cluster stays on one worker): a third less wall
# time on a 2-core box, where many tests wait on servers and subprocesses.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -n 2 --dist loadfile --durations=25 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check valora tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
