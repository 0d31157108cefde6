# The two quick-start commands (see README.md); both set themselves up.
.PHONY: demo test format bench

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh

format:
	bash scripts/format.sh

bench:
	bash scripts/setup.sh && .venv/bin/python -m attnpool.bench
