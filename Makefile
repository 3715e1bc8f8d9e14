.PHONY: install dev test lint format bench

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
