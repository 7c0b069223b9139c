# Set-up happens on first use: `make run` trains, `make test` runs the tests.
VENV ?= .venv
ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup run test docs

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)

run: setup
	$(VENV)/bin/posttrain grpo $(ARGS)

test: setup
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

docs: setup
	$(VENV)/bin/python -m posttrain.config.reference > docs/config.md
