# Two entry points (README): `make demo` and `make test`. Each creates or reuses .venv.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tessera-installed

.PHONY: bytecode demo test unit integration integration-training integration-rest gpu lint format clean down lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first and pinned: they lie on local disk; other versions download GBs.
	$(PY) -m pip install -q --no-compile torch==2.14.1 torchvision==0.29.1
	# Every package at the version the suite last passed with (constraints.txt, `make lock`): a clean clone
	# installs what CI tested, not whatever was released since.
	$(PY) -m pip install -q --no-compile -c constraints.txt -e '.[dev]'
	# Their byte code on every core at once: pip compiles on one (the two installs took 146 s on 2 cores, now 118).
	# Python does not write it later where PYTHONDONTWRITEBYTECODE is set, as on these machines. A file of a newer
	# Python's syntax (torch's tests of 3.12) does not compile, under pip either.
	$(PY) -m compileall -q -j 0 -x 'py31[2-9]' $(VENV)/lib
	touch $(STAMP)

# The project's own byte code, written once before the tiers: where PYTHONDONTWRITEBYTECODE is set (these machines)
# every process compiled each module it imported from source, Ray's workers of every run among them.
bytecode: $(STAMP)
	$(PY) -m compileall -q -j 0 training ingest shards cluster tune tests

demo: bytecode
	$(VENV)/bin/tessera demo

# The unit tier and the integration tier's two halves side by side. Much of the integration tier is waiting (its
# services and Ray's processes starting, Ray Train's polls), which the others fill: clean clones on 2 cores took
# 28-33 minutes so, against 31-32 with the tier in one process beside the unit tier. Each half starts its own stack
# (`TESSERA_IT_PORT_SHIFT`: the second's ports). Each's output is printed whole when it ends; each keeps its own
# target to run alone. Beside the integration tier the unit tier's torch takes one thread (`UNIT_THREADS`): with one
# per core, each of its parallel regions waited at OpenMP's barrier for the thread whose core another process held
# (the tier took 24-28 min, 14-16 with one thread; a clean clone's `make test` 29.5-33 min, then 27.4).
test: $(STAMP)
	$(MAKE) --no-print-directory -j3 --output-sync=target unit integration-training integration-rest UNIT_THREADS=1

unit: bytecode
	$(if $(UNIT_THREADS),OMP_NUM_THREADS=$(UNIT_THREADS) )$(PY) -m pytest -q --durations=8 tests/unit

# The half of the integration tier that trains (Ray Train runs, sweeps); the rest ingests, serves and submits jobs
# (test_submit.py there: on a clean clone the training half took 24.3 min and the rest 20.7).
IT_TRAINING := $(addprefix tests/integration/,test_tune.py test_train_resume.py test_detector_loop.py \
	test_train_s3_outage.py test_tracking_outage.py)
IT_REST := $(filter-out $(IT_TRAINING),$(sort $(wildcard tests/integration/test_*.py)))

integration: $(STAMP)
	$(MAKE) --no-print-directory -j2 --output-sync=target integration-training integration-rest

integration-training: bytecode
	TESSERA_IT_PORT_SHIFT=100 $(PY) -m pytest -q -x --durations=8 $(IT_TRAINING)

integration-rest: bytecode
	$(PY) -m pytest -q -x --durations=8 $(IT_REST)

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
