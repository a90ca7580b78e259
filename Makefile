# The two quick-start commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.o2m-installed

.PHONY: install demo test bench table table-cond table-xarch gpu-check clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned to the pair that installs from local wheels (no multi-GB download)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	O2M=$(BIN)/o2m bash recipes/demo.sh

# pytest exits 5 when it collects no test; make turns any non-zero exit into a failure.
test: $(STAMP)
	$(BIN)/python -m pytest -q

# The comparison table on the embedded default (about 28 minutes on 2 CPU cores, two lanes at once), then its
# class-conditional section (table-cond, about 16 minutes) and its cross-architecture section (table-xarch, about
# 24 minutes):
# writes docs/results.md.
table: $(STAMP)
	O2M=$(BIN)/o2m bash recipes/digits-table.sh
	$(MAKE) table-cond
	$(MAKE) table-xarch

table-cond: $(STAMP)
	O2M=$(BIN)/o2m bash recipes/digits-cond-table.sh

table-xarch: $(STAMP)
	O2M=$(BIN)/o2m bash recipes/digits-xarch-table.sh

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_sampling.py
	$(BIN)/python benchmarks/bench_prune.py
	$(BIN)/python benchmarks/bench_distill.py
	$(BIN)/python benchmarks/bench_dkdm.py

# The CUDA checks and the benchmarks on one GPU (benchmarks/gpu_check.py, a few minutes on an H200): writes
# docs/benchmarks-gpu.md. It installs nothing: the python (PYTHON=... if given, else .venv's if there, else
# python3) needs o2m's requirements and pytest; the repository root goes on PYTHONPATH, so o2m need not be
# installed. GPU_CHECK_ARGS="--device cpu" is a dry run on the CPU (runs/gpu-check-cpu.md). CI never runs it.
ifeq ($(origin PYTHON),command line)
GPU_PYTHON := $(PYTHON)
else
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON))
endif
GPU_CHECK_ARGS ?=

gpu-check:
	PYTHONPATH="$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}" $(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) runs build *.egg-info
