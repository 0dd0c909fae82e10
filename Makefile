# emloop developer entry points. Every target is safe to run again: venvs are built once
# (stamp files) and rebuilt only when what they install changes.

PYTHON ?= python3
VENV ?= .venv
LS_VENV ?= .ls-venv
TORCH_VERSION ?= 2.13.0
LS_VERSION ?= 1.23.2
# Per-test timeout covers fixture setup: the first Label Studio start of a fresh checkout
# builds a migrated template (~1-2 min on 2 busy cores).
PYTEST_FLAGS ?= -q -ra --timeout=300 --durations=10
PYTEST_ARGS ?=
DEMO_ARGS ?=
SIM_ARGS ?=

VENV_STAMP := $(VENV)/.emloop-installed
LS_STAMP := $(LS_VENV)/.label-studio-$(LS_VERSION)-installed

.PHONY: all venv ls-venv demo test lint bench simulate click-weights clean distclean help

all: venv ls-venv

help:
	@echo "make venv      - $(VENV): torch==$(TORCH_VERSION) (CPU wheel), then emloop[dev] (editable)"
	@echo "make ls-venv   - $(LS_VENV): label-studio==$(LS_VERSION), kept apart from emloop's deps"
	@echo "make demo      - Label Studio + ML backend + synthetic images (DEMO_ARGS='--help')"
	@echo "make test      - pytest (PYTEST_ARGS='-k name' / PYTEST_FLAGS to change flags)"
	@echo "make lint      - ruff check"
	@echo "make bench     - run every benchmarks/bench_*.py"
	@echo "make simulate  - active-learning simulation on ../shared/data/vnc, then its report (SIM_ARGS='--out=DIR --seeds 5'; options: scripts/simulate.py --help)"
	@echo "make click-weights - retrain the shipped click-to-mask weights on synthetic EM (~35 min on 2 cores)"
	@echo "make clean     - remove caches, demo state and build outputs (keeps the venvs)"
	@echo "make distclean - clean, and remove the venvs"

venv: $(VENV_STAMP)

# torch first: pip takes the local CPU wheel for an exact pin, while a range pulled in by
# emloop's own requirements could fetch a multi-GB CUDA build.
$(VENV_STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; v == (3, 11) or print(f"WARNING: {sys.executable} is Python {v[0]}.{v[1]}; the CPU torch wheel on these machines is for 3.11")'
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install 'torch==$(TORCH_VERSION)'
	$(VENV)/bin/python -m pip install -e '.[dev]'
	@touch $@

ls-venv: $(LS_STAMP)

$(LS_STAMP):
	@test -x $(LS_VENV)/bin/python || $(PYTHON) -m venv $(LS_VENV)
	$(LS_VENV)/bin/python -m pip install 'label-studio==$(LS_VERSION)'
	@rm -f $(LS_VENV)/.label-studio-*-installed
	@touch $@

demo: venv ls-venv
	$(VENV)/bin/python -m devtools.demo $(DEMO_ARGS)

test: venv ls-venv
	$(VENV)/bin/python -m pytest $(PYTEST_FLAGS) $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

click-weights: venv
	$(VENV)/bin/python scripts/train_clicks.py --threads 2

simulate: venv
	$(VENV)/bin/python scripts/simulate.py $(SIM_ARGS)
	$(VENV)/bin/python scripts/simulate.py --report $(filter --out=% --readme=%,$(SIM_ARGS))

bench: venv
	@set -e; found=0; for f in benchmarks/bench_*.py; do \
		[ -e "$$f" ] || continue; found=1; m=$$(basename "$$f" .py); \
		echo "==> benchmarks.$$m"; $(VENV)/bin/python -m "benchmarks.$$m"; \
	done; [ $$found = 1 ] || echo "no benchmarks/bench_*.py"

clean:
	rm -rf .run .cache .pytest_cache .ruff_cache build dist *.egg-info
	find . -path ./$(VENV) -prune -o -path ./$(LS_VENV) -prune -o -name __pycache__ -type d -print0 \
		| xargs -0 rm -rf

distclean: clean
	rm -rf $(VENV) $(LS_VENV)
