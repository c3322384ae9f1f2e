# camserve: `make run` serves the built-in model, `make test` runs the suite. `make help` lists all.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# KServe's own client needs python-dateutil<3 and protobuf<7, older than .venv's (the dev extra brings the grpc
# extra's protobuf 7): it gets a venv of its own, with camserve's base install and only what its tests import.
KSERVE_VENV := .venv-kserve
KSERVE_STAMP := $(KSERVE_VENV)/.installed
KSERVE ?= kserve>=0.21,<0.22

.DEFAULT_GOAL := help
.PHONY: help install browser run test test-fast test-kserve lint docs bench bench-http bench-stages bench-ray bench-gpu gpu-check \
	gpu-wheels train-shapes train-shapes-detect train-shapes-seg grpc-gen \
	docker clean docker-base docker-wheels docker-wheels-cuda docker-cpu docker-cuda docker-test

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-19s %s\n", $$1, $$2}'

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

# Three workers on two cores: much of the suite waits on server processes, Ray and the browser, so they cut
# its time; worksteal evens out the long tests at the end. On the quiet 2-core machine the suite (1046 tests) took
# 16 min of pytest with three workers, 20 min of CI with the install. TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 3
test: $(STAMP) browser ## run the test suite (browser tests included; TEST_WORKERS=3 processes)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal $(PYTEST_ARGS)

test-fast: $(STAMP) ## the edit-run loop: no browser, servers, Ray, Docker or slow tests
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -m "not slow and not browser and not integration" $(PYTEST_ARGS)

$(KSERVE_STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH (or make PY=python3.X)"; exit 1; }
	test -d $(KSERVE_VENV) || $(PY) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(KSERVE_VENV)/bin/pip install --quiet -e . 'pytest>=8.0' 'captum>=0.7' '$(KSERVE)'
	touch $(KSERVE_STAMP)

test-kserve: $(KSERVE_STAMP) ## KServe's own Python client against camserve, in a venv of its own (.venv-kserve)
	$(KSERVE_VENV)/bin/python -m pytest tests/api/test_kserve_client.py $(PYTEST_ARGS)

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check service tests
	$(BIN)/mypy

docs: $(STAMP) ## build the documentation site into site/ (MkDocs Material, offline, --strict)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

bench: $(STAMP) ## engine benchmark: predict vs explain vs pytorch-grad-cam vs captum, ONNX Runtime vs eager (resnet50), detectors and segmenters
	$(BIN)/python -m tests.bench.bench_engine
	$(BIN)/python -m tests.bench.bench_onnx
	$(BIN)/python -m tests.bench.bench_tasks --rounds 3

bench-http: $(STAMP) ## HTTP benchmark: batch policies, batching off, resnet18 vs a baseline and KServe (.venv-kserve) (BENCH_ARGS=--before REF --table)
	$(BIN)/python -m tests.bench.bench_http $(BENCH_ARGS)

bench-stages: $(STAMP) ## where one request's time goes, stage by stage, in-process
	$(BIN)/python -m tests.bench.bench_stages $(BENCH_ARGS)

bench-ray: $(STAMP) ## Ray Serve (one and two replicas) vs a plain server: resnet18 and shapes at concurrency 8
	$(BIN)/python -m tests.bench.bench_ray

bench-gpu: $(STAMP) ## both benchmarks on CUDA, where a GPU exists
	$(BIN)/python -m tests.bench.bench_engine --device cuda
	$(BIN)/python -m tests.bench.bench_http --device cuda

gpu-check: $(STAMP) ## the GPU check on this machine's CUDA device: parity, HTTP, memory cap, CUDA tests (gpu-results/)
	$(BIN)/python -m tests.gpu.gpu_check --out gpu-results all

# Pinned to .venv's versions; Python 3.12 manylinux wheels, as the lent CUDA machines run (tests/gpu/run_device.sh).
GPU_WHEELS := fastapi starlette pydantic pydantic_core annotated-types typing-inspection typing_extensions \
	annotated-doc uvicorn httptools python-multipart fastapi_offline captum torchcam ttach
GPU_PY ?= 3.12
gpu-wheels: $(STAMP) ## the wheels a bare CUDA image lacks, in .whl/ (carried with tests/gpu/run_device.sh)
	rm -rf .whl && mkdir -p .whl
	$(BIN)/pip freeze | grep -iE '^($(shell echo $(GPU_WHEELS) | sed 's/[-_]/[-_]/g; s/ /|/g'))==' > .whl/pins.txt
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --dest .whl --python-version $(GPU_PY) \
		--implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux_2_28_x86_64 --platform any -r .whl/pins.txt
	$(BIN)/pip wheel --quiet --no-deps --wheel-dir .whl "grad-cam==$$($(BIN)/pip freeze | sed -n 's/^grad-cam==//p')"
	@ls .whl/*.whl | wc -l | xargs echo "wheels in .whl:"; du -sh .whl

grpc-gen: $(STAMP) ## regenerate service/api/grpc_gen/*.py from its grpc_predict_v2.proto (grpcio-tools)
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. \
		service/api/grpc_gen/grpc_predict_v2.proto

train-shapes: $(STAMP) ## retrain the built-in shapes model (deterministic, a few minutes on 2 cores)
	$(BIN)/camserve train-shapes

train-shapes-detect: $(STAMP) ## retrain the built-in shapes-detect detector (deterministic, minutes on 2 cores)
	$(BIN)/camserve train-shapes-detect

train-shapes-seg: $(STAMP) ## retrain the built-in shapes-seg segmenter (deterministic, minutes on 2 cores)
	$(BIN)/camserve train-shapes-seg

# Images: Debian bookworm base, Python packages from a host-side wheelhouse (containers here reach no index).
DOCKER ?= docker
BASE_IMAGE ?= debian:bookworm-slim
IMAGE ?= camserve:cpu
IMAGE_CUDA ?= camserve:cuda
TORCH_INDEX_CPU ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= grpc
# The build context is streamed as a tar of what the Dockerfiles copy, so .venv and caches never travel.
DOCKER_CONTEXT = tar -c --exclude=__pycache__ --exclude='*.pyc' pyproject.toml README.md service \
	docker/Dockerfile docker/Dockerfile.cuda docker/pip-install.sh
DOCKER_BUILD = $(DOCKER) build --build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg EXTRAS=$(EXTRAS)

docker-base: ## make the Debian base image available: pull it, else debootstrap it locally (root)
	@$(DOCKER) image inspect $(BASE_IMAGE) >/dev/null 2>&1 || $(DOCKER) pull $(BASE_IMAGE) \
		|| sh docker/base-image.sh $(BASE_IMAGE)

docker-wheels: $(STAMP) ## fill docker/wheelhouse/cpu for the CPU image (pip download; CPU torch where reachable)
	PIP=$(BIN)/pip sh docker/wheelhouse.sh docker/wheelhouse/cpu "$(TORCH_INDEX_CPU)" "$(EXTRAS)"

docker-wheels-cuda: $(STAMP) ## fill docker/wheelhouse/cuda for the CUDA image
	PIP=$(BIN)/pip sh docker/wheelhouse.sh docker/wheelhouse/cuda "" "$(EXTRAS)"

docker-cpu: docker-base docker-wheels ## build the CPU image (camserve:cpu)
	$(DOCKER_CONTEXT) docker/wheelhouse/cpu | $(DOCKER_BUILD) -f docker/Dockerfile -t $(IMAGE) -

docker-cuda: docker-base docker-wheels-cuda ## build the CUDA image (camserve:cuda)
	$(DOCKER_CONTEXT) docker/wheelhouse/cuda | $(DOCKER_BUILD) -f docker/Dockerfile.cuda -t $(IMAGE_CUDA) -

docker: docker-cpu docker-cuda ## build the CPU and CUDA images

docker-test: docker-cpu ## build and run the CPU image, probe it end to end (minutes; not in `make test`)
	$(BIN)/python tests/docker_check.py --image $(IMAGE)

clean: ## remove the virtualenvs and caches
	rm -rf $(VENV) $(KSERVE_VENV) .pytest_cache .mypy_cache .ruff_cache
