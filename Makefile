# camserve: `make run` serves the built-in model, `make test` runs the suite. `make help` lists all.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install browser run test lint bench bench-http bench-gpu train-shapes docker clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH (or make PY=python3.X)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) ## create .venv and install camserve with the dev extra

run: $(STAMP) ## serve the default model (built-in shapes) on 127.0.0.1:8000
	$(BIN)/camserve serve $(if $(CONFIG),--config $(CONFIG))

browser: ## Debian's chromium + chromedriver for the browser tests (apt-get as root; else they skip)
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "installing chromium and chromium-driver for the browser tests"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver \
	    >/dev/null; } || echo "could not install chromium: the browser tests will be skipped"; \
	else echo "no /usr/bin/chromium and no root apt-get to install it: the browser tests will be skipped"; fi

test: $(STAMP) browser ## run the test suite (browser tests included)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check service tests
	$(BIN)/mypy

bench: $(STAMP) ## engine benchmark: predict vs explain vs pytorch-grad-cam vs captum (resnet50)
	$(BIN)/python -m tests.bench.bench_engine

bench-http: $(STAMP) ## HTTP throughput benchmark: batching on/off, resnet18 vs a per-request baseline
	$(BIN)/python -m tests.bench.bench_http

bench-gpu: $(STAMP) ## both benchmarks on CUDA, where a GPU exists
	$(BIN)/python -m tests.bench.bench_engine --device cuda
	$(BIN)/python -m tests.bench.bench_http --device cuda

train-shapes: $(STAMP) ## retrain the built-in shapes model (deterministic, a few minutes on 2 cores)
	$(BIN)/camserve train-shapes

docker: ## build the CPU and CUDA images
	docker build -f docker/Dockerfile -t camserve:cpu .
	docker build -f docker/Dockerfile.cuda -t camserve:cuda .

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
