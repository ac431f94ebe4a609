# The two commands: `make run` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: run test lint bench install clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the builds this machine's pip serves from disk.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/stylepipe prepare skimage runs/demo/prepared --config $(CONFIG)
	$(VENV)/bin/stylepipe train --config $(CONFIG) --set data.content=runs/demo/prepared

test: $(STAMP)
	$(PY) -m pytest -q -ra

lint: $(STAMP)
	$(VENV)/bin/ruff check stylepipe flows tests bench
	$(VENV)/bin/ruff format --check stylepipe flows tests bench

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf runs .pytest_cache
