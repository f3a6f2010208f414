"""Shared test settings.

On the 2-core CI machine PyTorch's default of two intra-op threads makes the
small tensor ops of these tests several times slower than one thread, so the
whole suite runs single-threaded and deterministic.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)
