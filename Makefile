# Two entry points (README): `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed

.PHONY: demo test unit integration gpu lint format clean down lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: they lie on local disk; other versions download GBs.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	# Every package at the version the suite last passed with (constraints.txt, `make lock`): a clean clone
	# installs what CI tested, not whatever was released since.
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tessera demo

# The two tiers side by side: the integration tier leaves the CPUs idle about a quarter of its time (its services,
# Ray's processes starting), which the unit tier fills (a clean clone on 2 cores: 25-28 min, against 30-35 one after
# the other). Each tier's output is printed whole when it ends; each keeps its own target to run alone.
test: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target unit integration

unit: $(STAMP)
	$(PY) -m pytest -q --durations=8 tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q -x --durations=12 tests/integration

# CUDA only (bf16, NCCL, DALI's mixed decoding); skipped on a machine without a GPU, so not part of `test`.
gpu: $(STAMP)
	$(PY) -m pytest -q -rs tests/gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format . && $(VENV)/bin/ruff check --fix .

down: $(STAMP)
	$(VENV)/bin/tessera down

# After changing pyproject.toml's dependencies (or to take newer releases): rebuild .venv, pass `make test`, then
# record what it holds.
lock:
	{ echo "# pip constraints: the versions \`make test\` passed with; \`make lock\` rewrites this file from .venv."; \
	  $(PY) -m pip freeze --exclude-editable; } > constraints.txt

clean:
	rm -rf $(VENV) .tessera
