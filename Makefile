# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

DEMO_RUNS := runs/demo
PRETRAIN := $(PY) -m launch.torchrun --standalone --nproc-per-node 2 -m launch.pretrain --config configs/demo_cpu.yaml

.PHONY: venv lint test test-slow test-fast test-unit demo bench bench-gpu demo-data bench-data clean

# The stamp is rebuilt when the dependency list changes.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch pulls several GB of CUDA packages.
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# ruff: lint and format, as configured in pyproject.toml; `ruff format .` fixes the layout.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything but the `slow` end-to-end runs, which CI adds with `make test-slow`.
test: lint
	$(PY) -m pytest -q -m 'not slow' --durations=15

# The slowest end-to-end runs: the fault injections past the first, real Slurm, the study,
# Megatron-LM's own training loop, variants of scenarios `make test` covers once.
test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -m slow --durations=15

test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not e2e'

# One process only: no gloo groups, no runs of the entry point.
test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -m 'not e2e and not distributed'

# The demo corpus: Python's own sources, docs and licences, plus a redundant domain.
demo-data: $(VENV)/.installed
	$(PY) -m data_prep.demo --out data/demo

# The main job on the embedded default: a uniform baseline and linupper reweighting,
# two CPU processes each, then the per-domain comparison and runs/demo/report.png.
demo: demo-data
	$(PRETRAIN) --run-dir $(DEMO_RUNS)/uniform --set reweight.strategy=uniform
	$(PRETRAIN) --run-dir $(DEMO_RUNS)/linupper --set reweight.strategy=linupper
	$(PY) -m launch.tools.report $(DEMO_RUNS)/uniform $(DEMO_RUNS)/linupper --out $(DEMO_RUNS)/report.png

# Training throughput: uniform vs linupper steps interleaved, the demo model on 2 CPU processes.
bench: demo-data
	$(PY) -m launch.torchrun --standalone --nproc-per-node 2 -m launch.tools.bench --config configs/demo_cpu.yaml --pairs 30

# The GPU check, under 8 minutes on one GPU: speed, MFU, memory against the dry run's estimate,
# the reweighting's overhead, bf16 losses against fp32 ones. With the machine's own Python, which has
# torch with CUDA (and the project's wheels, see the README): no venv.
bench-gpu:
	$(PYTHON) -m launch.tools.bench_gpu

# Preprocessing throughput: data_prep against raw SentencePiece and a Megatron-LM-style pipeline.
bench-data: $(VENV)/.installed
	$(PY) -m data_prep.bench

clean:
	rm -rf $(VENV) runs data/demo
