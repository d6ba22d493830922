# `make demo` and `make test` set up .venv on first use; later calls reuse it (the stamp file
# is only rebuilt when setup.cfg, pyproject.toml or this Makefile change).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffopt-installed

.PHONY: setup demo test lint clean bench-setup bench docs

setup: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# the matched pair: torchvision from the registry does not import beside other torch builds
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[test]'
	# torchmeta's metadata pins torch<1.10: install it last, without resolving its dependencies
	# (diffopt's own requirements above bring its runtime ones)
	$(PY) -m pip install --quiet --no-deps torchmeta==1.8.0
	touch $(STAMP)

demo: setup
	$(VENV)/bin/diffopt compare --dataset sinusoid --algorithms maml,fomaml,reptile --shots 5,10

test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto

# the benchmark peers (learn2learn, torchopt): optional, never needed by demo or test
bench-setup: setup
	benchmarks/install_peers.sh $(PY)

bench: bench-setup
	$(PY) benchmarks/peers.py all --write BENCHMARKS.md

docs: setup
	$(PY) -c "from diffopt.config import write_option_reference; write_option_reference()"

lint: setup
	$(VENV)/bin/ruff check diffopt examples benchmarks tests

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
