# The two commands of the README. Both set everything up first (idempotent).
.PHONY: setup quickstart test unit
setup:
	scripts/setup.sh

quickstart: setup
	.venv/bin/anneal run deploy/examples/pipeline.yaml --duration 20 --traffic 2

test: setup
	scripts/test.sh

unit: setup
	.venv/bin/python -m pytest tests/unit -q
