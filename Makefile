.PHONY: install dev test lint format bench lock lock-upgrade

install:
	./install.sh

dev:
	./install.sh --dev

test:
	.venv/bin/python -m pytest

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

format:
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

bench:
	.venv/bin/python benchmarks/ingest_throughput.py
	.venv/bin/python benchmarks/search_latency.py
	.venv/bin/python benchmarks/retrieval_quality.py

# requirements.lock and requirements-dev.lock from pyproject.toml (hash-pinned; ops/lock.sh).
# Existing pins are kept; lock-upgrade moves every pin to the newest allowed release.
lock:
	ops/lock.sh

lock-upgrade:
	ops/lock.sh --upgrade
