"""A tiny autoregressive policy built only from ``nn.Linear`` and ``nn.LayerNorm``.

The policy is an MLP language model over a fixed context: to emit response token
``t`` it sees the whole prompt (one-hot), the previous ``context`` response tokens
(one-hot, with a BOS symbol before the start) and the position ``t`` (one-hot).
One-hot inputs make the first ``nn.Linear`` an embedding table, and keep every
layer one that the OPOB hook has an exact per-sample rule for.

``token_logp`` is the teacher-forced pass used both by the learner (with grad) and
by the sampler to record its behaviour log-probs (without grad), so at lag 0 the
two are bit-for-bit identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vcpo_optim.demo.task import Task


class MLPPolicy(nn.Module):
    """``pi(y_t | x, y_{t-context:t}, t)`` with a ``depth``-layer GELU MLP.

    Args:
        task: the task (fixes vocabulary, prompt and response lengths).
        hidden: hidden width. Default 128.
        context: number of previous response tokens seen. Default 4.
        depth: number of hidden layers (>= 1). Default 2.
    """

    def __init__(self, task: Task, hidden: int = 128, context: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.task = task
        self.context = context
        v, lp, t = task.vocab, task.prompt_len, task.response_len
        self.in_dim = lp * v + context * (v + 1) + t
        layers: list[nn.Module] = [nn.Linear(self.in_dim, hidden), nn.GELU(), nn.LayerNorm(hidden)]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.GELU()]
        layers.append(nn.Linear(hidden, v))
        self.net = nn.Sequential(*layers)

    # ------------------------------------------------------------------ features
    def _prompt_features(self, prompts: Tensor) -> Tensor:
        return F.one_hot(prompts, self.task.vocab).flatten(1).to(torch.get_default_dtype())

    def _context_tokens(self, responses: Tensor) -> Tensor:
        """``[B, T, context]`` previous tokens (BOS = vocab) for every position."""
        b, t = responses.shape
        bos = self.task.vocab
        padded = torch.cat(
            [torch.full((b, self.context), bos, dtype=responses.dtype), responses], dim=1
        )
        return padded.unfold(1, self.context, 1)[:, :t, :]

    def features(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Teacher-forced input features, ``[B, T, in_dim]``."""
        b, t = responses.shape
        dt = torch.get_default_dtype()
        p = self._prompt_features(prompts)[:, None, :].expand(b, t, -1)
        ctx = F.one_hot(self._context_tokens(responses), self.task.vocab + 1).flatten(2).to(dt)
        pos = torch.eye(t, dtype=dt)[None].expand(b, t, t)
        return torch.cat([p, ctx, pos], dim=2)

    # ------------------------------------------------------------------ model
    def forward(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Teacher-forced logits ``[B, T, vocab]``."""
        return self.net(self.features(prompts, responses))

    def token_logp(self, prompts: Tensor, responses: Tensor) -> Tensor:
        """Log-probability of each response token, ``[B, T]``."""
        logits = self(prompts, responses)
        return torch.log_softmax(logits, dim=-1).gather(2, responses[..., None]).squeeze(2)

    @torch.no_grad()
    def sample(self, prompts: Tensor, gen: torch.Generator, temperature: float = 1.0) -> Tensor:
        """Sample responses autoregressively, ``[B, T]`` long."""
        b = prompts.shape[0]
        t_len = self.task.response_len
        dt = torch.get_default_dtype()
        p = self._prompt_features(prompts)
        out = torch.full((b, t_len + self.context), self.task.vocab, dtype=torch.long)
        eye = torch.eye(t_len, dtype=dt)
        for t in range(t_len):
            ctx = F.one_hot(out[:, t : t + self.context], self.task.vocab + 1).flatten(1).to(dt)
            x = torch.cat([p, ctx, eye[t].expand(b, t_len)], dim=1)
            logits = self.net(x) / temperature
            probs = torch.softmax(logits, dim=-1)
            out[:, t + self.context] = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        return out[:, self.context :]

    @torch.no_grad()
    def target_prob(self, prompts: Tensor) -> Tensor:
        """``pi(y* | x)`` per prompt: the expected exact-match accuracy of one sample."""
        y = self.task.targets(prompts)
        return self.token_logp(prompts, y).sum(dim=1).exp()
