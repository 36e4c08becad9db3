# The README's two commands: `make demo` and `make test`. Both set up first.
.PHONY: setup demo test test-unit test-integration test-vm lint bench bench-guest

setup:
	./scripts/setup

demo: setup
	./scripts/demo

lint: setup
	.venv/bin/ruff check cephvol tests $(wildcard bench)

test: setup lint
	.venv/bin/pytest -q

test-unit: setup
	.venv/bin/pytest -q -m "not integration and not vm"

test-integration: setup
	.venv/bin/pytest -q -m integration

test-vm: setup
	.venv/bin/pytest -q -m vm

bench: setup
	.venv/bin/python -m bench

# krbd attach/detach in the qemu test host vs `rbd map` + mount (a few minutes under TCG)
bench-guest: setup
	.venv/bin/python -m bench.guest
