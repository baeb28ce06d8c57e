# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv at the repository root and install what they need into it.
PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
REF_DIR := $(VENV)/ref-ofa
REF_PKG := ofa==0.1.0.post202307202001
FMNIST  := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: demo test install dataset reference bench clean

demo: install dataset
	$(VENV)/bin/ofa demo

test: install dataset reference
	$(PY) -m pytest $(PYTEST_ARGS)

install: $(STAMP)

# the client is its own distribution (client/pyproject.toml), which the project depends on: installed first
$(STAMP): pyproject.toml client/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ./client -e '.[dev]'
	@# a venv made before the split: replacing the old project removed the ofa-client script it had installed
	test -x $(VENV)/bin/ofa-client || $(PY) -m pip install --quiet --no-deps --force-reinstall -e ./client
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist, when apt can install it.
dataset:
	@if [ -f $(FMNIST) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist; \
	else echo "note: $(FMNIST) is missing and apt-get is not usable; pass --data-dir"; fi

# The reference implementation (PyPI `ofa`) in a folder of its own: its import name
# clashes with ours, so tests and benchmarks run it in a separate process.
# the reference package and PyYAML (which its efficiency predictors import), in a folder of their own
reference: install
	@test -f $(REF_DIR)/yaml/__init__.py || \
		$(PY) -m pip install --quiet --no-deps --target $(REF_DIR) '$(REF_PKG)' 'pyyaml==6.0.3'

bench: install reference
	cd benchmarks && ../$(PY) train_step.py && ../$(PY) extract.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
