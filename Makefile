# medtransfer: `make demo` runs the main job, `make test` runs the test suite. Each sets itself up from nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# CPU build by default; on a GPU machine: make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/medtransfer demo

bench: install
	$(PY) benchmarks/zoo.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info src/*.egg-info
