# The two commands: `make run` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

RUN_DIR ?= runs/demo

.PHONY: run serve test test-fast lint bench bench-search bench-edge bench-fanout bench-fanout-stack bench-sysmetrics bench-make-run install clean dashboards stack stack-down pictures

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned to the builds this machine's pip serves from disk.
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline once, as a Prefect flow on a temporary local server (offline).
run: $(STAMP)
	$(VENV)/bin/stylepipe-flow run --config $(CONFIG)

# The scheduled deployment, against the Prefect server at PREFECT_API_URL (see README).
serve: $(STAMP)
	@test -n "$$PREFECT_API_URL" || { echo "set PREFECT_API_URL (start a server: .venv/bin/prefect server start)"; exit 2; }
	$(VENV)/bin/stylepipe-flow serve --config $(CONFIG)

# Two pytest-xdist workers, each taking whole test files (a file's fixtures are built once),
# each test process with one torch thread: the suite in about two thirds of the time on two
# cores. The files go out longest first (tests/conftest.py's order; xdist's own puts the files
# with the most tests first, which left the longest file for last). TEST_WORKERS=0 runs it in
# this one process.
TEST_WORKERS ?= 2
TEST_ARGS := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

test: $(STAMP)
	$(PY) -m pytest -q -ra $(TEST_ARGS)

# The inner loop: everything but the end-to-end tests marked slow (make test runs those too).
test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow" $(TEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check stylepipe flows tests bench
	$(VENV)/bin/ruff format --check stylepipe flows tests bench

bench: $(STAMP)
	$(PY) -m bench.run

# The search and its certificate, before (no range test, no constraints, every candidate
# replayed) against now, on the demo: 2 cases x 5 seeds x 12 trials.
bench-search: $(STAMP)
	$(PY) -m bench.search_bench

# The stability edge against runs trained as trials train, trials that broke, and the answer's
# quality over seeds against plain Optuna's, on the demo: counts. Each
# part's results are kept in runs/bench-edge/results.json: run it again to go on after a stop.
bench-edge: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m bench.edge_calibration --out runs/bench-edge/results.json

# Fan-out: wall-clock steps of a scheduled run with 1, 2, 4, 8 workers at coco256's shape (a
# critical-path model, seconds to run).
bench-fanout: $(STAMP)
	$(PY) -m bench.fanout

# Fan-out on the stack: the demo (12 trials) on `stylepipe stack` with 1 and then 2 workers, one
# torch thread each; the search's and the certificate's wall times side by side.
bench-fanout-stack: $(STAMP)
	$(PY) -m bench.fanout_stack

# What MLflow's system metrics cost the final run's training: none, every 10 s, every 1 s, alternating.
bench-sysmetrics: $(STAMP)
	$(PY) -m bench.system_metrics_bench

# `make run`'s wall time at BASE (a git revision) and at this checkout, alternating, side by side.
BASE ?= HEAD
bench-make-run: $(STAMP)
	$(PY) -m bench.make_run_bench --base $(BASE)

# optuna-dashboard on :8080 and the MLflow UI on :5000, loopback only; Ctrl-C stops both.
dashboards: $(STAMP)
	@echo "optuna-dashboard: http://127.0.0.1:8080   MLflow UI: http://127.0.0.1:5000"
	$(VENV)/bin/optuna-dashboard sqlite:///$(RUN_DIR)/optuna.db --host 127.0.0.1 --port 8080 & \
	trap 'kill $$!' EXIT INT TERM; \
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(RUN_DIR)/mlflow.db --host 127.0.0.1 --port 5000

# The README's pictures, copied from the last `make run` (run it first), so that they show
# what the code does today: the stability map and content | style | result.
pictures:
	@latest=$$(ls -t $(RUN_DIR)/final/*/triptych.png 2>/dev/null | head -1); \
	test -n "$$latest" || { echo "no triptych under $(RUN_DIR)/final: run make run first"; exit 2; }; \
	cp $(RUN_DIR)/stability_map.png stylepipe/assets/demo_stability_map.png && \
	cp "$$latest" stylepipe/assets/demo_triptych.png && echo "copied $$latest and the stability map"

# The production shape on loopback: PostgreSQL databases, MLflow server (proxied artifacts),
# Prefect server, a process work pool and its worker, optuna-dashboard (see README).
STACK_DIR ?= runs/stack
stack: $(STAMP)
	$(VENV)/bin/stylepipe stack up --folder $(STACK_DIR)

stack-down: $(STAMP)
	$(VENV)/bin/stylepipe stack down --folder $(STACK_DIR)

clean:
	rm -rf runs .pytest_cache
