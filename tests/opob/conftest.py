"""Single-threaded, deterministic torch for the OPOB tests."""

from __future__ import annotations

import torch

torch.set_num_threads(1)
