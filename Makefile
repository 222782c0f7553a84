# The README's commands: `make run` and `make test` (plus `make check`, `make bench`, `make soak`,
# `make soak-cluster`, `make lint`).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test test-deploy check lint format bench bench-s3 soak soak-cluster clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "pullthrough needs Python 3.11 or newer (PYTHON=$(PYTHON))"; exit 1; }
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: install python3-venv"; exit 1; }

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	touch $@

$(VENV)/.test-deps: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-dev.txt
	touch $@ $(VENV)/.run-deps

run: $(VENV)/.run-deps
	@scripts/ensure-debs redis-server=redis-server
	scripts/run

test: $(VENV)/.test-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry skopeo=skopeo \
		promtool=prometheus chromium=chromium htpasswd=apache2-utils ctr=containerd \
		podman=podman dockerd=docker.io docker-compose=docker-compose \
		swift-proxy-server=swift-proxy swift-object-server=swift-object \
		swift-container-server=swift-container swift-account-server=swift-account \
		swift-ring-builder=swift memcached=memcached nginx=nginx
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 4 --dist loadfile --ignore=tests/deploy

# What an operator deploys, for real: the image built from deploy/Dockerfile on base images
# made here (debootstrap), the compose stack run with docker-compose and pulled through.
test-deploy: $(VENV)/.test-deps
	@scripts/ensure-debs dockerd=docker.io docker-compose=docker-compose debootstrap=debootstrap \
		skopeo=skopeo docker-registry=docker-registry redis-server=redis-server
	$(BIN)/python -m pytest -q -s tests/deploy  # -s: the image size is printed

# The edit-test loop: lint, types and the tests not marked slow (about a minute).
check: $(VENV)/.test-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry skopeo=skopeo \
		promtool=prometheus htpasswd=apache2-utils docker-compose=docker-compose
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 3 --dist loadfile -m "not slow" --ignore=tests/deploy

lint: $(VENV)/.test-deps
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(VENV)/.test-deps
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(VENV)/.bench-deps: requirements-bench.txt $(VENV)/.test-deps
	$(BIN)/pip install -q --disable-pip-version-check -r requirements-bench.txt
	touch $@

bench: $(VENV)/.bench-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry skopeo=skopeo \
		wrk=wrk ab=apache2-utils nginx=nginx curl=curl
	$(BIN)/python -m bench
	$(MAKE) --no-print-directory bench-s3

# pullthrough on S3 (a local Swift), two nodes: its own section of docs/benchmarks.md.
bench-s3: $(VENV)/.bench-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry curl=curl \
		swift-proxy-server=swift-proxy swift-object-server=swift-object \
		swift-container-server=swift-container swift-account-server=swift-account \
		swift-ring-builder=swift memcached=memcached
	$(BIN)/python -m bench.s3

soak: $(VENV)/.test-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry
	$(BIN)/python -m bench.soak
	# The state-machine models of the fill and of parallel ranges, longer than in make test.
	PULLTHROUGH_MODEL_EXAMPLES=300 $(BIN)/python -m pytest -q -W ignore \
		tests/test_fill_model.py::test_the_fill_protocol_keeps_its_invariants \
		tests/test_ranges_model.py::test_a_parallel_fills_storage_keeps_its_invariants
	# The hostile-upstream fuzzer, longer than make test's seeded run, with a seed of its own.
	PULLTHROUGH_FUZZ_EXAMPLES=3000 PULLTHROUGH_FUZZ_SEED=$$RANDOM \
		$(BIN)/python -m pytest -q -W ignore tests/test_fuzz_upstream.py

# Three nodes on one bucket (Swift) behind nginx, Redis with Sentinels, faults on a schedule
# (bench/soak_cluster.py): 150 clients for 10 minutes; its section of docs/reliability.md.
soak-cluster: $(VENV)/.test-deps
	@scripts/ensure-debs redis-server=redis-server docker-registry=docker-registry nginx=nginx \
		swift-proxy-server=swift-proxy swift-object-server=swift-object \
		swift-container-server=swift-container swift-account-server=swift-account \
		swift-ring-builder=swift memcached=memcached
	$(BIN)/python -m bench.soak_cluster

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
