# The two commands of the README. Both set everything up first (idempotent).
.PHONY: setup quickstart test unit
setup:
	scripts/setup.sh

quickstart: setup
	.venv/bin/anneal run deploy/examples/distill-sft.yaml

test: setup
	scripts/test.sh

unit: setup
	.venv/bin/python -m pytest tests/unit -q
