# Every target installs what it needs: a pinned uv (bootstrapped with python3's pip when
# the machine has none) builds the locked environment in .venv from uv.lock.

PYTHON ?= python3
UV_VERSION := 0.13.9
SYSTEM_UV := $(shell command -v uv 2>/dev/null)
UV := $(if $(SYSTEM_UV),$(SYSTEM_UV),.tools/bin/uv)
# Never let uv fetch its own interpreter: use the machine's python3.
export UV_PYTHON_DOWNLOADS := never
export UV_PYTHON := $(PYTHON)
# Installed packages get their bytecode at install time: without it, every new Python
# process (the CLI, the tests' child processes, each test worker) compiles SQLAlchemy and
# the rest from source again wherever PYTHONDONTWRITEBYTECODE is set, ~1 s a process.
export UV_COMPILE_BYTECODE := 1
VENV := .venv
DB ?= aisopod-sessions.db

.DEFAULT_GOAL := help
.PHONY: help venv test test-lowest stress lint format run bench clean

help: ## List the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

.tools/bin/uv:
	$(PYTHON) -m venv .tools
	.tools/bin/python -m pip install --quiet "uv==$(UV_VERSION)"

# Two stamps: `.synced` holds what test/lint/run need (the default `dev` group), and
# `.synced-bench` adds the heavy `bench` group (the peer stores) for `make bench` only.
# The dev sync is --inexact: it installs the locked dev versions but removes nothing, so
# after a `make bench` the bench packages stay and are not uninstalled and reinstalled at
# every switch between `make test` and `make bench`. The bench sync is exact (dev + bench),
# so it is also what removes packages that the lock no longer lists; `make clean` resets.
$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --inexact
	@touch $@

$(VENV)/.synced-bench: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked --group dev --group bench
	@touch $@

venv: $(VENV)/.synced ## Create or update the locked environment in .venv

# Our own sources (src/, tests/, benchmarks/) are not installed, so UV_COMPILE_BYTECODE
# does not cover them: where the environment sets PYTHONDONTWRITEBYTECODE, every test
# worker and every Python process a test starts would compile and rewrite them again
# (~2 s a worker). The test targets let Python cache them in __pycache__ (ignored by git).
test test-lowest stress: export PYTHONDONTWRITEBYTECODE :=

# The suite runs on one worker more than the machine has cores (pytest-xdist): its
# tests spend part of their time waiting (for locks, child processes, the server), and
# on this 2-core machine 3 workers took 106-115 s where 2 took 112-127 s. WORKERS=0 runs
# it in one process. The `timing` tests (the event loop's lag, in tests/test_async.py:
# tests/conftest.py) run after the rest, alone, so that the other workers' tests do not
# take the cores they measure; `make test` fails when either run fails.
WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: venv ## Run the whole test suite
	$(VENV)/bin/pytest -n $(WORKERS) --dist worksteal -m "not timing"
	$(VENV)/bin/pytest -m timing tests/test_async.py

# The lower bounds in pyproject.toml, tested: a second environment with every direct
# dependency at the lowest version pyproject.toml allows (SQLAlchemy 2.0.40, SQLModel
# 0.0.50, pydantic 2.11, psycopg 3.2, aiosqlite 0.20, greenlet 3.0, Typer 0.26),
# resolved by uv without touching uv.lock. The viewer's tests run there too, but the dev
# group's google-adk raises FastAPI to 0.133 and uvicorn to 0.34 in it; the `viewer`
# extra's own floors (FastAPI 0.110 with Starlette 0.36, Jinja2 3.1.0, uvicorn 0.29,
# and selenium 4.20 for the tests) pass tests/test_viewer*.py in an environment of
# `-e ".[viewer,postgresql]"` and pytest alone, resolved lowest-direct.
LOWEST := .venv-lowest
$(LOWEST)/.synced: pyproject.toml | $(UV)
	rm -rf $(LOWEST)
	$(UV) venv -q $(LOWEST)
	$(UV) pip install -q --python $(LOWEST) --resolution lowest-direct -e ".[postgresql]" --group dev
	@touch $@

# All but two files and the `slow` tests: test_examples.py (the lowest FastAPI, a dev tool,
# predates the httpx2 its TestClient is given), test_bench.py (the peers are not installed
# here), and the seven `slow` tests (tests/conftest.py: hundreds of MiB of text, 10⁴ rows,
# 200 tasks), which test sizes and load rather than the dependencies' APIs, at seconds each.
# The five tests of the OpenAI Agents SDK's compaction through the adapter's hooks skip
# themselves there, saying so: openai-agents 0.21 has no such hooks (tests/test_openai_agents.py).
test-lowest: $(LOWEST)/.synced ## The suite at the lowest versions pyproject.toml allows
	$(LOWEST)/bin/pytest -n $(WORKERS) --dist worksteal -m "not slow and not timing" --ignore=tests/test_examples.py --ignore=tests/test_bench.py
	$(LOWEST)/bin/pytest -m "timing and not slow" tests/test_async.py

STRESS ?= 10
stress: venv ## The suite with load, crash and property tests 10x larger (STRESS=n to change)
	AISOPOD_STRESS=$(STRESS) $(VENV)/bin/pytest -s

lint: venv ## ruff (lint + format check) and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: venv ## Apply ruff's fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

run: venv ## Record a short conversation in aisopod-sessions.db (DB=FILE for another), then show it
	$(VENV)/bin/python -m aisopod_session.demo $(DB)
	$(VENV)/bin/aisopod-session --db $(DB) status
	$(VENV)/bin/aisopod-session --db $(DB) sessions list --agent-id concierge
	$(VENV)/bin/aisopod-session --db $(DB) sessions show concierge:telegram:bot-main:dm:1001 --last 6

# The PostgreSQL half measures the machine's local server unless told another (a server
# that does not answer is skipped with a loud line); it works in schemas of its own.
bench: export AISOPOD_BENCH_POSTGRES_URL ?= postgresql://postgres@127.0.0.1:5432/test
bench: $(VENV)/.synced-bench ## Benchmark our store against plain sqlite3 and peer stores (SQLite and PostgreSQL)
	$(VENV)/bin/python -m benchmarks.bench

clean: ## Remove the environment, caches and the demo database
	rm -rf $(VENV) $(LOWEST) .tools .pytest_cache .mypy_cache .ruff_cache
	rm -f $(DB) $(DB)-wal $(DB)-shm
