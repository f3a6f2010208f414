"""The verl tests run only in verl's own environment (`make test-verl`, venv .venv-verl).

There, VCPO_VERL_TESTS=1 turns a missing verl into an error instead of a skip.
Elsewhere (`make test`) the test module skips itself, saying why.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

HAS_VERL = importlib.util.find_spec("verl") is not None
if not HAS_VERL and os.environ.get("VCPO_VERL_TESTS") == "1":
    raise RuntimeError("VCPO_VERL_TESTS=1 but verl is not importable: run `make test-verl`")

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for _verl_setup
if HAS_VERL:
    import _verl_setup  # noqa: F401  (installs the CPU platform before verl picks one)
