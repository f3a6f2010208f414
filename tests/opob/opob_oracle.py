"""Test models and the exact oracle for OPOB: one backward per sample.

The oracle is written independently of the library: per-sample gradients by
``torch.autograd.grad`` of each ``l_i`` separately, baselines by plain Python
loops over scopes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------- reference baseline


def ref_quantile(vals: list[float], ws: list[float], q: float) -> float:
    order = sorted(range(len(vals)), key=lambda j: vals[j])
    tot = sum(ws)
    cum = 0.0
    for j in order:
        cum += ws[j]
        if cum >= q * tot:
            return vals[j]
    return vals[order[-1]]


def ref_coefficients(
    n: list[float],
    r: list[float],
    scopes: list[int],
    agg: str = "mean",
    norm_by_std: bool = False,
    winsor_q: float = 0.1,
) -> tuple[list[float], list[float]]:
    """(baselines, coefficients) per sample, by loops over scopes."""
    base = [0.0] * len(r)
    coef = [0.0] * len(r)
    for s in sorted(set(scopes)):
        idx = [i for i in range(len(r)) if scopes[i] == s]
        ns = [n[i] for i in idx]
        rs = [r[i] for i in idx]
        ws = ns if sum(ns) > 0 else [1.0] * len(ns)
        if agg == "mean":
            b = sum(w * x for w, x in zip(ws, rs)) / sum(ws)
        elif agg == "median":
            b = ref_quantile(rs, ws, 0.5)
        else:
            lo, hi = ref_quantile(rs, ws, winsor_q), ref_quantile(rs, ws, 1 - winsor_q)
            b = sum(w * min(max(x, lo), hi) for w, x in zip(ws, rs)) / sum(ws)
        k = 1.0
        if norm_by_std:
            m = sum(rs) / len(rs)
            sd = math.sqrt(sum((x - m) ** 2 for x in rs) / len(rs))
            k = 0.0 if max(rs) == min(rs) else 1.0 / sd
        for i in idx:
            base[i] = b
            coef[i] = (r[i] - b) * k
    return base, coef


def oracle(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    rewards: Tensor,
    scopes: list[int],
    agg: str = "mean",
    norm_by_std: bool = False,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor]]:
    """(sq_norms, baselines, coefficients, expected grads by name): one backward per sample."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    loss = loss_fn(model)
    per: list[list[Tensor]] = []
    for i in range(loss.shape[0]):
        gi = torch.autograd.grad(
            loss[i], [p for _, p in params], retain_graph=True, allow_unused=True
        )
        per.append([torch.zeros_like(p) if g is None else g for g, (_, p) in zip(gi, params)])
    n = [float(sum((g.double() ** 2).sum() for g in gs)) for gs in per]
    base, coef = ref_coefficients(n, rewards.double().tolist(), scopes, agg, norm_by_std)
    grads = {}
    for j, (name, _p) in enumerate(params):
        grads[name] = sum(c * per[i][j].double() for i, c in enumerate(coef))
    dt = torch.float64
    return (
        torch.tensor(n, dtype=dt),
        torch.tensor(base, dtype=dt),
        torch.tensor(coef, dtype=dt),
        grads,
    )


def rel_err(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def assert_one_call_matches_oracle(
    model: nn.Module,
    loss_fn: Callable[[nn.Module], Tensor],
    rewards: Tensor,
    groups: list[int] | None = None,
    tol: float = 1e-10,
    **opob_kwargs: object,
) -> None:
    """One ``OPOB.backward`` call on a fresh ``.grad`` equals the oracle (norms and gradient)."""
    from vcpo_optim.opob import OPOB

    scopes = [0] * rewards.shape[0] if groups is None else groups
    ref_n, _, _, ref_g = oracle(model, loss_fn, rewards, scopes)
    model.zero_grad(set_to_none=True)
    with OPOB(model, **opob_kwargs) as opob:  # type: ignore[arg-type]
        res = opob.backward(
            loss_fn(model), rewards, None if groups is None else torch.tensor(groups)
        )
    assert rel_err(res.sq_norms, ref_n) < tol
    for n, p in model.named_parameters():
        assert rel_err(p.grad, ref_g[n]) < tol, n


# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: type[nn.Module]) -> None:
        super().__init__()
        self.heads = heads
        self.n1 = norm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.n2 = norm(d)
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d, bias=False)

    def forward(self, x: Tensor, pad_mask: Tensor, mask: Tensor | None = None) -> Tensor:
        b, t, d = x.shape
        h = self.n1(x)
        q, k, v = self.qkv(h).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if mask is None:
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            mask = causal & pad_mask[:, None, None, :]
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class TinyLM(nn.Module):
    """Causal transformer with tied input/output embeddings, padding_idx=0, LayerNorm + RMSNorm."""

    def __init__(
        self, vocab: int = 23, d: int = 16, heads: int = 2, layers: int = 2, max_t: int = 16
    ) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d, padding_idx=0)
        self.pos = nn.Embedding(max_t, d)
        self.blocks = nn.ModuleList(
            [Block(d, heads, nn.LayerNorm if i % 2 == 0 else nn.RMSNorm) for i in range(layers)]
        )
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(
        self, ids: Tensor, expand_pos: bool = True, position_ids: Tensor | None = None
    ) -> Tensor:
        """``position_ids`` (``[1, N]``, restarting at 0 at each segment): a packed row, with
        block-diagonal causal attention (a segment starts wherever the position does not grow
        by one, as in transformers' packed-sequence detection)."""
        b, t = ids.shape
        mask = None
        if position_ids is None:
            pos = torch.arange(t, device=ids.device).unsqueeze(0)
            if expand_pos:
                pos = pos.expand(b, t)
        else:
            pos = position_ids
            first = torch.ones_like(pos[:, :1], dtype=torch.bool)
            seg = torch.cat([first, pos[:, 1:] - pos[:, :-1] != 1], 1).cumsum(1)  # [1, N]
            causal = torch.ones(t, t, dtype=torch.bool, device=ids.device).tril()
            mask = (causal & (seg[:, :, None] == seg[:, None, :]))[:, None]  # [1, 1, N, N]
        x = self.tok(ids) + self.pos(pos)
        pad_mask = ids != 0
        pad_mask[:, 0] = True
        for blk in self.blocks:
            x = blk(x, pad_mask, mask)
        return self.head(self.norm(x))


def lm_batch(b: int = 5, t: int = 9, vocab: int = 23, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lens[:, None]
    ids = ids.masked_fill(~mask, 0)  # right padding with padding_idx
    return ids, mask


def lm_loss(ids: Tensor, mask: Tensor) -> Callable[[nn.Module], Tensor]:
    """Per-sample masked negative log-likelihood of the next token (padding excluded)."""

    def fn(model: nn.Module) -> Tensor:
        logits = model(ids)
        logp = torch.log_softmax(
            logits[:, :-1].to(torch.float64 if logits.dtype == torch.float64 else torch.float32), -1
        )
        tgt = ids[:, 1:]
        lp = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        return -(lp * mask[:, 1:].to(lp.dtype)).sum(-1)

    return fn


class MLP(nn.Module):
    def __init__(self, k: int = 7, h: int = 11, m: int = 3) -> None:
        super().__init__()
        self.l1 = nn.Linear(k, h)
        self.l2 = nn.Linear(h, h)
        self.l3 = nn.Linear(h, m)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv1d(
            8, 6, 4, stride=2, dilation=2, groups=2, padding_mode="reflect", padding=2
        )
        self.c3 = nn.Conv1d(6, 4, 3, padding="same", bias=False)
        self.out = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn(self.c1(x)))
        h = torch.tanh(self.c3(torch.relu(self.c2(h))))
        return self.out(h.mean(-1))


class Conv2dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.gn = nn.GroupNorm(3, 6)
        self.c2 = nn.Conv2d(6, 4, (2, 3), stride=(1, 2), groups=2)
        self.out = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.gn(self.c1(x)))
        return self.out(torch.relu(self.c2(h)).mean((-1, -2)))


def proj_loss(x: Tensor, seed: int = 1) -> Callable[[nn.Module], Tensor]:
    """``l_i = sum(out_i * P_i)`` with a fixed random projection: a generic per-sample loss."""

    def fn(model: nn.Module) -> Tensor:
        out = model(x)
        g = torch.Generator().manual_seed(seed)
        proj = torch.randn(out.shape, generator=g, dtype=out.dtype)
        return (out * proj).reshape(out.shape[0], -1).sum(1) + 0.1 * (out**2).reshape(
            out.shape[0], -1
        ).sum(1)

    return fn


# ----------------------------------------------------------------------------- materialised per-sample gradients
# (clipping and the noise scale, issue 11)


def per_sample_grads(model: nn.Module, loss_fn: Callable[[nn.Module], Tensor]) -> Tensor:
    """``[B, P]`` float64: row i is grad l_i over the trainable parameters (one backward each)."""
    params = [p for p in model.parameters() if p.requires_grad]
    loss = loss_fn(model)
    rows = []
    for i in range(loss.shape[0]):
        gs = torch.autograd.grad(loss[i], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat(
                [
                    (torch.zeros_like(p) if g is None else g).double().reshape(-1)
                    for g, p in zip(gs, params)
                ]
            )
        )
    return torch.stack(rows)


def flat_grad(model: nn.Module) -> Tensor:
    return torch.cat([p.grad.double().reshape(-1) for p in model.parameters() if p.requires_grad])


def clipped_contributions(g: Tensor, coef: Tensor, c: float | None) -> tuple[Tensor, Tensor | None]:
    """x_i = c_i g_i, each clipped to norm <= c explicitly (Opacus style), and the factors."""
    x = coef.double()[:, None] * g
    size = x.norm(dim=1)
    f = torch.where(size > c, c / size, torch.ones_like(size)) if c is not None else None
    return (x if f is None else x * f[:, None]), f


def bound_between(sizes: Tensor, k: int) -> float:
    """A clip bound halfway between the k-th and (k+1)-th smallest size (no sample at the edge)."""
    v = sizes.sort().values
    return float((v[k - 1] + v[k]) / 2)


def direct_noise(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """B_simple from materialised contributions x ([B, P], float64), McCandlish's unbiased pair."""
    b = x.shape[0]
    s = (x * x).sum()
    p = x.sum(0).square().sum()
    trace = (b * s - p) / (b * (b - 1))
    grad_sq = (p - s) / (b * (b - 1))
    return trace / grad_sq, trace, grad_sq
