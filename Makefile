# Two entry points: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --quiet --constraint constraints.txt
STAMP := $(VENV)/.installed

.PHONY: demo test test-heavy lint bench clean

# flwr and dp-accounting go in without their pins (pyproject.toml's `federated` says why)
$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev,all]'
	$(PIP) --no-deps flwr==1.42.0 dp-accounting==0.6.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m edgeloop.demo

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not heavy"

# the cases `test` leaves to their cheaper siblings (tests/_tiers.py); .ci/run runs them too
test-heavy: $(STAMP)
	$(BIN)/pytest -q -m heavy

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
