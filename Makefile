.PHONY: install lint typecheck test bench chat

install:
	bash scripts/install.sh

lint:
	ruff check .

typecheck:
	mypy

test:
	python3 -m pytest

bench:
	python3 benchmarks/recall.py
	python3 benchmarks/cost.py

chat:
	mplus chat
