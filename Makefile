# `make demo` trains the default CIFAR-10 recipe; `make test` runs the test suite; `make lint`
# runs the checks CI runs besides the tests (ruff, mypy, the import contracts). Each creates .venv
# and installs the project (with its pinned torch, and MLflow for the mlflow plugin and its tests)
# on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_RUN := runs/cifar10_quick-$(shell date +%Y%m%d-%H%M%S)

.PHONY: install demo test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,tracking,sweep,lint,serve]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/minitrain run recipes/cifar10_quick.py --plugin viz --run-dir $(DEMO_RUN)
	@echo "report: $(CURDIR)/$(DEMO_RUN)/report.html"

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

bench: install
	$(PY) benchmarks/overhead.py
