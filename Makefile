# `make demo` trains the default CIFAR-10 recipe; `make test` runs the test suite.
# Both create .venv and install the project (with its pinned torch) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test bench data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,sweep]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/minitrain run recipes/cifar10_quick.py

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/overhead.py
