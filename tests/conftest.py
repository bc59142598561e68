"""Both tiers: this Python's ``bin`` first on PATH, as in an activated virtualenv and as the local stack gives its
services (``cluster.stack.LocalStack._env``).

DeepSpeed JIT-builds its CPU shared-memory op with whichever ``ninja`` comes first on PATH, into one folder per
user. The stack's Ray workers found the virtualenv's (pip's ninja 1.13), tests run as ``.venv/bin/python -m
pytest`` the system's (1.11); the two versions do not read each other's build log, so each rebuilt the op the
other had just built: about 30 s of compiling in each tier of every ``make test``.
"""

import os

from cluster.procs import path_with_this_python

os.environ["PATH"] = path_with_this_python(os.environ.get("PATH", ""))
