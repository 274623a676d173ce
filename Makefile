# Two commands do everything on a fresh clone:
#   make demo   - converts a SpikingJelly model and prints what it keeps for backward
#   make test   - runs the test suite
# Each creates .venv and installs what it needs (torch and torchvision pinned to the builds that
# lie on this machine's disk; the SNN frameworks with --no-deps so they cannot replace torch).

PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.revpass-installed

.PHONY: venv demo test bench-nodes bench-convert bench-memory bench-budget bench-train train-digits coverage clean

$(STAMP): pyproject.toml Makefile
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q --no-deps spikingjelly==2.0.0 norse==1.1.0
	$(PIP) install -q snntorch==1.0.0 numpy scipy tqdm loguru packaging h5py nir nirtorch
	$(PIP) install -q networkx onnx onnxruntime onnxscript scikit-learn pytest pytest-xdist hypothesis
	$(PIP) install -q --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VPY) examples/demo.py

test: $(STAMP)
	$(VPY) -m pytest tests -n auto --maxprocesses 4 --dist worksteal

bench-nodes: $(STAMP)
	$(VPY) tools/bench_nodes.py

bench-convert: $(STAMP)
	$(VPY) tools/bench_convert.py

coverage: $(STAMP)
	$(VPY) tools/coverage.py --planner

bench-train: $(STAMP)
	$(VPY) tools/bench_train.py

bench-memory: $(STAMP)
	$(PIP) install -q matplotlib
	$(VPY) tools/bench_memory.py

bench-budget: $(STAMP)
	$(PIP) install -q matplotlib
	$(VPY) tools/bench_budget.py

train-digits: $(STAMP)
	$(VPY) tools/accuracy_digits.py

clean:
	rm -rf $(VENV) bench_out
