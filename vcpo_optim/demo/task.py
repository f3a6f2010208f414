"""The verifiable synthetic task: map a digit string to a transformed digit string.

A prompt is ``prompt_len`` digits drawn uniformly from ``{0, ..., vocab-1}``; the
unique correct response has ``response_len`` digits and depends on the kind:

* ``"reverse"``: the prompt reversed (``response_len == prompt_len``).
* ``"sort"``: the prompt sorted ascending (``response_len == prompt_len``).
* ``"cumsum"``: running sums modulo ``vocab`` (``response_len == prompt_len``):
  ``y_t = (x_1 + ... + x_t) mod vocab``.

The reward is binary exact match (1 if every response digit is right, else 0), as
in the paper's verifiable-reward tasks. Because the correct answer is unique, the
expected accuracy of one temperature-1 sample is ``pi(y* | x)``, which the demo
computes exactly on a held-out prompt set (no sampling noise in the accuracy curve).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

TASK_KINDS = ("reverse", "sort", "cumsum")


@dataclass(frozen=True)
class Task:
    """Task definition.

    Attributes:
        kind: ``"reverse"``, ``"sort"`` or ``"cumsum"``.
        vocab: number of digit symbols.
        prompt_len: prompt length (the response has the same length).
    """

    kind: str = "reverse"
    vocab: int = 10
    prompt_len: int = 12

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"unknown task kind {self.kind!r}; expected one of {TASK_KINDS}")
        if self.vocab < 2 or self.prompt_len < 1:
            raise ValueError("vocab must be >= 2 and prompt_len >= 1")

    @property
    def response_len(self) -> int:
        return self.prompt_len

    def sample_prompts(self, n: int, gen: torch.Generator) -> Tensor:
        """``[n, prompt_len]`` long tensor of uniform random digits."""
        return torch.randint(0, self.vocab, (n, self.prompt_len), generator=gen)

    def targets(self, prompts: Tensor) -> Tensor:
        """The unique correct response for each prompt, ``[n, response_len]``."""
        if self.kind == "reverse":
            return prompts.flip(1)
        if self.kind == "sort":
            return prompts.sort(dim=1).values
        return prompts.cumsum(dim=1) % self.vocab

    def reward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Binary exact-match reward, ``[n]`` float (1.0 or 0.0)."""
        return (responses == self.targets(prompts)).all(dim=1).to(torch.get_default_dtype())
