# Two commands: `make run` and `make test`. Everything else is set up by them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint types layers pytest bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/billing serve

lint: $(STAMP)
	$(BIN)/ruff check .

types: $(STAMP)
	$(BIN)/mypy domain projections adapters api infra bench tests

layers: $(STAMP)
	$(BIN)/lint-imports

# Two workers, each with its own embedded Postgres and NATS, a test file on one worker (its
# tests share a service and run in order): the suite fits CI's 10 minutes.
pytest: $(STAMP)
	$(BIN)/pytest -q -n 2 --dist loadfile

test: lint types layers pytest

bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.floor
	$(BIN)/python -m bench.auth
	$(BIN)/python -m bench.invoice_run
	$(BIN)/python -m bench.webhooks
	$(BIN)/python -m bench.ledger_append
	$(BIN)/python -m bench.sealer
	$(BIN)/python -m bench.replay

clean:
	rm -rf $(VENV) .data .pytest_cache .mypy_cache .ruff_cache
