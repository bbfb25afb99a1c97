# `make demo` trains the default CIFAR-10 recipe; `make test` runs the test suite.
# Both create .venv and install the project (with its pinned torch, and MLflow for the mlflow
# plugin and its tests) on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_RUN := runs/cifar10_quick-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test bench data

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,tracking,sweep]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/minitrain run recipes/cifar10_quick.py --plugin viz --run-dir $(DEMO_RUN)
	@echo "report: $(CURDIR)/$(DEMO_RUN)/report.html"

test: install
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/overhead.py
