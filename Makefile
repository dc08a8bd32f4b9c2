# The README's two commands. Both create or reuse the virtual environment at .venv.
#   make demo   the whole COOPT story on Fashion-MNIST (installs the data set if missing)
#   make test   the test suite (CPU; Triton kernels under TRITON_INTERPRET=1)
VENV   := .venv
PY     := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup data demo test bench paper paper-quick

setup: $(VENV)/.installed

# Reinstalled when pyproject.toml changes. torch/torchvision are pinned to the builds on disk.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dali,test]'
	touch $@

data:
	test -f $(FMNIST) || ($(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist)

demo: setup data
	$(VENV)/bin/coopt-fast demo --out runs/demo

test: setup data
	$(PY) -m pytest -q

bench: setup data
	$(PY) bench/bench_uniformity.py
	$(PY) bench/bench_align.py

# Does COOPT pay off? (bench/paper.py; README "Does it pay off?"). Jobs are cached in runs/paper*.
paper-quick: setup data
	$(PY) bench/paper.py --quick

paper: setup data
	$(PY) bench/paper.py
