r"""``TokenLogProbs`` (:mod:`vcpo_optim.lm_head`): per-sample gradients of a memory-lean LM head.

The head computes ``log p_t = log softmax(z''_t)[y_t]`` from hidden states
``h_t`` and a ``[V, d]`` weight ``W`` (``z_t = h_t W^T + b``, then scale,
soft-cap, temperature). With ``g_t`` the gradient of the loss w.r.t. ``log p_t``
(and ``k_t`` w.r.t. the entropy ``H_t``, if returned), the gradient w.r.t. the
linear logits is

.. math::

    u_t = \alpha_t e_{y_t} - r_t, \qquad
    r_t = \big(g_t p_t + k_t\, p_t \odot (\log p_t + H_t)\big) \odot \delta_t,

with ``delta_t = dz''/dz`` (``scale / tau``, times ``1 - tanh^2`` when
soft-capped) and ``alpha_t = g_t delta_t[y_t]``; the per-sample gradient of
``W`` is the :class:`~vcpo_optim.opob.rules.base.Softmax` factor
``G_i = sum_t u_t^T h_t`` and of the bias ``sum_t u_t`` (a dense ``[B, V]``
factor: it costs ``B V`` memory). ``u_t`` is never stored: every use
recomputes it in vocabulary blocks from ``h``, ``y``, the saved per-token
log-sum-exp and ``g`` (one ``h W^T`` per use).

**Ghost norm** (per sample, tokens ``t, s``)::

    ||G_i||^2 = sum_{t,s} (h_t . h_s) (u_t . u_s)
    u_t . u_s = alpha_t alpha_s [y_t = y_s] - alpha_t r_s[y_t] - alpha_s r_t[y_s] + r_t . r_s

``h_t . h_s`` and ``r_s[y_t]`` (the logits of token ``s`` at the ids
``y_t``: a gather of ``T`` rows of ``W``, ``T^2 d``) are cheap; only
``(R R^T)_{ts} = sum_v r_t[v] r_s[v]`` needs the vocabulary, accumulated
block by block, so memory is one ``[b, T, V_c]`` block and ``[b, T, T]``.
Cost ``B T V d`` (recompute) ``+ B T^2 V``. A second use of the same weight
enters by the cross term ``<F_i, G_i>``:

* :class:`Rows` (the tied input embedding, ids ``x_s``, gradients ``e_s``):
  ``sum_{s,t} u_t[x_s] (h_t . e_s)`` -- logits gathered at the input ids;
* :class:`Outer` (an ``nn.Linear`` sharing the weight, inputs ``a_s``, output
  gradients ``q_s``): ``sum_{s,t} (a_s . h_t)(alpha_t q_s[y_t] - q_s . r_t)``,
  ``q_s . r_t`` accumulated over vocabulary blocks;
* another :class:`Softmax` (the head called twice): the formula above with
  the two calls' tokens.

A :class:`Dense` use (the vmap fallback) has no ghost form: then, and when
``T > d`` makes it cheaper, the engine uses the **vocabulary-blocked direct**
path instead: ``G_i[v0:v1] = U_i[:, v0:v1]^T H_i`` plus every other factor's
rows ``v0:v1``, one ``[b, V_c, d]`` block at a time (cost ``2 B T V d``).
``[B, V, d]`` is never formed.

**Precision.** Under autocast the module rounds the linear logits and their
gradient ``u`` to the compute dtype (as the plain path does); the factor
rounds the same quantities the same way and then works in float32
(``alpha_t`` is split so that ``alpha_t e_y - round(r_t)`` is the rounded
``u_t``), so OPOB's norms and gradient match a per-sample loop through the
same module up to the final rounding of the module's bfloat16 matmuls.

Refused: a weight that is a ``DTensor`` (FSDP2 / tensor parallel): the
recomputation needs the full weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vcpo_optim.lm_head import HeadSpec, TokenLogProbs, linear_logits, softmax_rows, transform

from .base import Dense, Factor, Outer, Rows, Softmax, register_rule

__all__ = [
    "GHOST_MAX_PAIRS",
    "elems",
    "ghost_pair_cost",
    "pair_dot",
    "token_logprobs_rule",
    "vchunk_cost",
    "vchunk_sq_norms",
    "write",
    "write_cost",
]

#: Per-sample token pairs (``T1 * T2``) above which the ghost path is not used (memory ``[b, T1, T2]``).
GHOST_MAX_PAIRS = 1 << 24
#: Same meaning as :data:`vcpo_optim.opob.engine.KAPPA` (one memory-bound pass per element).
_KAPPA = 12.0
#: Elementwise work per logit of a recomputed block (exp, products, rounding) in multiply-adds.
_PER_LOGIT = 2 * _KAPPA


# ----------------------------------------------------------------------------- the rule


@register_rule(TokenLogProbs, verify=False, token_local="padded")  # written for its forward
def token_logprobs_rule(
    module: nn.Module, inputs: tuple[object, ...], grad_output: Tensor
) -> dict[str, Factor]:
    if len(inputs) != 5 or not isinstance(inputs[3], HeadSpec):
        raise ValueError(
            "OPOB: the record of a TokenLogProbs call is incomplete (expected what "
            "TokenLogProbs.opob_inputs returns); OPOB's tape must save it"
        )
    h, y, lse, spec, ent = inputs
    assert isinstance(h, Tensor) and isinstance(y, Tensor) and isinstance(lse, Tensor)
    assert isinstance(spec, HeadSpec)
    w, bias = module.weight, module.bias
    if type(w).__name__ == "DTensor" or type(h).__name__ == "DTensor":
        raise ValueError(
            "OPOB: TokenLogProbs with a sharded (DTensor) head weight (FSDP2 / tensor parallel) "
            "is not supported: its per-sample rule recomputes logits from the full weight"
        )
    b, d = h.shape[0], h.shape[-1]
    acc = spec.acc_dtype
    go = grad_output.to(acc)
    if spec.entropy:
        g, k = go[..., 0], go[..., 1]
    else:
        g, k = go, None
    g = g.reshape(b, -1)
    t = g.shape[1]
    h = h.reshape(b, t, d)
    y = y.reshape(b, t)
    lse = lse.reshape(b, t)
    ent = None if not isinstance(ent, Tensor) else ent.reshape(b, t)
    if k is not None:
        k = k.reshape(b, t)
        if not bool(k.any()):
            k = None
    # keep only the positions with a gradient (prompt and padding positions contribute 0)
    active = g != 0 if k is None else (g != 0) | (k != 0)
    cnt = active.sum(dim=1)
    ta = int(cnt.max()) if b else 0
    if ta < t:
        order = torch.argsort((~active).to(torch.int8), dim=1, stable=True)[:, :ta]
        valid = torch.arange(ta, device=h.device).unsqueeze(0) < cnt.unsqueeze(1)
        h = h.gather(1, order.unsqueeze(-1).expand(-1, -1, d)) * valid.unsqueeze(-1).to(h.dtype)
        y = torch.where(valid, y.gather(1, order), 0)
        lse = lse.gather(1, order)
        ent = None if ent is None else ent.gather(1, order)
        g = g.gather(1, order) * valid
        k = None if k is None else k.gather(1, order) * valid
    f = Softmax(h, y, lse, ent, g, k, w.detach(), None if bias is None else bias.detach(), spec)
    out: dict[str, Factor] = {}
    if w.requires_grad:
        out["weight"] = f
    if bias is not None and bias.requires_grad:
        out["bias"] = Dense(_bias_per_sample(f))
    return out


# ----------------------------------------------------------------------------- shared pieces


@dataclass
class _Prep:
    """One Softmax factor restricted to samples ``lo:hi``, with what every path needs."""

    hc: Tensor  # [b, T, d] compute dtype
    ha: Tensor  # [b, T, d] the same values in the accumulation dtype
    y: Tensor
    lse: Tensor
    ent: Tensor | None
    g: Tensor
    k: Tensor | None
    alpha: Tensor  # [b, T]: u_t = alpha_t e_{y_t} - round(r_t)


def _prep(f: Softmax, lo: int, hi: int) -> _Prep:
    spec: HeadSpec = f.spec
    acc, cdt = spec.acc_dtype, spec.compute_dtype
    hc = f.h[lo:hi].to(cdt)
    ha = hc.to(acc)
    y = f.y[lo:hi]
    lse, g = f.lse[lo:hi].to(acc), f.g[lo:hi].to(acc)
    ent = None if f.ent is None else f.ent[lo:hi].to(acc)
    k = None if f.k is None else f.k[lo:hi].to(acc)
    # logit of each token's own target: z_t[y_t]
    zy = (ha * f.weight[y].to(cdt).to(acc)).sum(-1)
    if f.bias is not None:
        zy = zy + f.bias[y].to(cdt).to(acc)
    z2, dz = transform(spec.rnd(zy), spec)
    dzv = dz.unsqueeze(-1) if isinstance(dz, Tensor) else dz
    ry = softmax_rows(z2.unsqueeze(-1), dzv, lse, ent, g, k).squeeze(-1)
    a = g * dz
    alpha = spec.rnd(a - ry) + spec.rnd(ry)
    return _Prep(hc, ha, y, lse, ent, g, k, alpha)


def _r(spec: HeadSpec, z: Tensor, p: _Prep) -> Tensor:
    """``round(r)`` for linear logits ``z`` (``[b, T, n]``) of the rows of ``p``."""
    z2, dz = transform(z, spec)
    return spec.rnd(softmax_rows(z2, dz, p.lse, p.ent, p.g, p.k))


def _gathered(f: Softmax, p: _Prep, ids: Tensor) -> Tensor:
    """Linear logits ``z[b, t, s] = h_t . W[ids[b, s]] (+ bias)``, rounded to the compute dtype."""
    spec: HeadSpec = f.spec
    acc, cdt = spec.acc_dtype, spec.compute_dtype
    z = torch.bmm(p.ha, f.weight[ids].to(cdt).to(acc).transpose(1, 2))
    if f.bias is not None:
        z = z + f.bias[ids].to(cdt).to(acc).unsqueeze(1)
    return spec.rnd(z)


def _r_block(f: Softmax, p: _Prep, wc: Tensor, bc: Tensor | None) -> Tensor:
    """``round(r)`` of every token of ``p`` over one vocabulary block: ``[b, T, V_c]``."""
    b, t, d = p.hc.shape
    z = linear_logits(p.hc.reshape(b * t, d), wc, bc, f.spec).view(b, t, wc.shape[0])
    return _r(f.spec, z, p)


def _u_block(f: Softmax, p: _Prep, v0: int, v1: int, wc: Tensor, bc: Tensor | None) -> Tensor:
    """The (rounded) ``u`` of every token of ``p`` on vocabulary rows ``v0:v1``: ``[b, T, V_c]``."""
    u = _r_block(f, p, wc, bc).neg_()
    inside = (p.y >= v0) & (p.y < v1)
    col = (p.y - v0).clamp(0, v1 - v0 - 1).unsqueeze(-1)
    return u.scatter_add_(-1, col, (p.alpha * inside).unsqueeze(-1))


def _wblock(f: Softmax, v0: int, v1: int) -> tuple[Tensor, Tensor | None]:
    cdt = f.spec.compute_dtype
    return f.weight[v0:v1].to(cdt), None if f.bias is None else f.bias[v0:v1].to(cdt)


def _vc(f: Softmax, per_vocab_row: int) -> int:
    """Vocabulary block for blocks of ``per_vocab_row`` elements per vocabulary row (>= 1 sample)."""
    spec: HeadSpec = f.spec
    vocab = f.weight.shape[0]
    return max(1, min(vocab, spec.vocab_chunk, spec.chunk_size // max(per_vocab_row, 1)))


def _bias_per_sample(f: Softmax) -> Tensor:
    """``sum_t u_t`` per sample, ``[B, V]`` (the bias's per-sample gradient)."""
    spec: HeadSpec = f.spec
    bsz, t = f.g.shape
    vocab = f.weight.shape[0]
    out = torch.zeros(bsz, vocab, dtype=spec.acc_dtype, device=f.g.device)
    vc = _vc(f, t)
    step = max(1, spec.chunk_size // max(t * vc, 1))
    for lo in range(0, bsz, step):
        hi = min(bsz, lo + step)
        p = _prep(f, lo, hi)
        for v0 in range(0, vocab, vc):
            v1 = min(vocab, v0 + vc)
            wc, bc = _wblock(f, v0, v1)
            out[lo:hi, v0:v1] = _u_block(f, p, v0, v1, wc, bc).sum(dim=1)
    return out


# ----------------------------------------------------------------------------- costs


def _recompute(f: Softmax) -> float:
    bsz, t, d = f.h.shape
    vocab = f.weight.shape[0]
    return float(bsz * t * vocab * d) + _PER_LOGIT * bsz * t * vocab


def elems(f: Softmax) -> int:
    """Elements the factor holds (hidden states and per-token vectors)."""
    return f.h.numel() + 5 * f.g.numel()


def ghost_pair_cost(f1: Factor, f2: Factor) -> float:
    """Multiply-adds of ``<F1_i, F2_i>`` for all ``i`` by the ghost path (``inf``: not available)."""
    if not isinstance(f1, Softmax):
        f1, f2 = f2, f1
    assert isinstance(f1, Softmax)
    bsz, t, d = f1.h.shape
    vocab = f1.weight.shape[0]
    if isinstance(f2, Softmax):
        t2 = f2.h.shape[1]
        if t * t2 > GHOST_MAX_PAIRS:
            return math.inf
        rec = _recompute(f1) + (0.0 if f2 is f1 else _recompute(f2))
        return rec + float(bsz * t * t2 * (vocab + 3 * d)) + _KAPPA * 6 * bsz * t * t2
    if isinstance(f2, Rows):
        s = f2.g.shape[1]
        return float(2 * bsz * t * s * d) + _KAPPA * 8 * bsz * t * s
    if isinstance(f2, Outer) and f2.g.shape[2] == 1:
        s = f2.g.shape[1]
        if t * s > GHOST_MAX_PAIRS:
            return math.inf
        return _recompute(f1) + float(bsz * s * t * (vocab + d)) + _KAPPA * 4 * bsz * s * t
    return math.inf


def vchunk_cost(fs: list[Factor], numel: int) -> float:
    """Multiply-adds of the vocabulary-blocked direct norm of one parameter."""
    cost = 0.0
    bsz = fs[0].batch
    for f in fs:
        if isinstance(f, Softmax):
            bsz_, t, d = f.h.shape
            cost += _recompute(f) + float(bsz_ * t * f.weight.shape[0] * d)
        elif isinstance(f, Rows):
            cost += _KAPPA * 2 * f.g.numel()
        elif isinstance(f, Outer):
            b_, s, nb, m = f.g.shape
            cost += float(b_ * s * nb * m * f.a.shape[-1])
        else:
            cost += _KAPPA * f.G.numel()
    return cost + _KAPPA * bsz * numel


def write_cost(f: Softmax) -> float:
    """``sum_i c_i G_i`` from the factor: recompute plus one ``V x d x N`` matmul."""
    bsz, t, d = f.h.shape
    return _recompute(f) + float(bsz * t * f.weight.shape[0] * d)


# ----------------------------------------------------------------------------- norms


def _acc(*fs: Factor, dt: torch.dtype) -> torch.dtype:
    out = dt
    for f in fs:
        if isinstance(f, Softmax):
            out = torch.promote_types(out, f.spec.acc_dtype)
    return out


def pair_dot(f1: Factor, f2: Factor, dt: torch.dtype) -> Tensor:
    """``<F1_i, F2_i>`` for every sample (``[B]``, dtype ``dt``); one of them is a :class:`Softmax`.

    ``f1 is f2`` gives ``||G_i||^2``. Chunked over samples (and vocabulary).
    """
    if not isinstance(f1, Softmax):
        f1, f2 = f2, f1
    assert isinstance(f1, Softmax)
    if isinstance(f2, Dense) or (isinstance(f2, Outer) and f2.g.shape[2] != 1):
        raise ValueError(
            "OPOB: internal: no ghost form for TokenLogProbs' weight shared with a "
            f"{type(f2).__name__} factor"
        )
    bsz, t = f1.g.shape
    t2 = f2.g.shape[1]
    vc = _vc(f1, t + (t2 if isinstance(f2, Softmax | Outer) else 0))
    per = t * vc + 6 * t * t2 + 3 * (t + t2) * f1.h.shape[-1]
    step = max(1, f1.spec.chunk_size // max(per, 1))
    out = torch.empty(bsz, dtype=dt, device=f1.g.device)
    for lo in range(0, bsz, step):
        hi = min(bsz, lo + step)
        out[lo:hi] = _pair_chunk(f1, f2, lo, hi, vc, dt).to(dt)
    return out


def _pair_chunk(f1: Softmax, f2: Factor, lo: int, hi: int, vc: int, dt: torch.dtype) -> Tensor:
    acc = _acc(f1, f2, dt=dt)
    vocab = f1.weight.shape[0]
    p1 = _prep(f1, lo, hi)
    a1 = p1.alpha.to(acc)
    if f2 is f1:
        kk = torch.bmm(p1.ha, p1.ha.transpose(1, 2)).to(acc)
        aa = _r(f1.spec, _gathered(f1, p1, p1.y), p1).to(acc)  # aa[t, s] = r_t[y_s]
        rr = torch.zeros_like(kk)
        for v0 in range(0, vocab, vc):
            v1 = min(vocab, v0 + vc)
            rb = _r_block(f1, p1, *_wblock(f1, v0, v1)).to(acc)
            rr.baddbmm_(rb, rb.transpose(1, 2))
        eq = (p1.y.unsqueeze(2) == p1.y.unsqueeze(1)).to(acc)
        m = a1.unsqueeze(2) * a1.unsqueeze(1) * eq
        m -= a1.unsqueeze(1) * aa + a1.unsqueeze(2) * aa.transpose(1, 2)
        m += rr
        return (kk * m).sum(dim=(1, 2))
    if isinstance(f2, Softmax):
        p2 = _prep(f2, lo, hi)
        a2 = p2.alpha.to(acc)
        kk = torch.bmm(p1.ha.to(acc), p2.ha.to(acc).transpose(1, 2))
        x = _r(f2.spec, _gathered(f2, p2, p1.y), p2).to(acc)  # x[s, t] = r2_s[y1_t]
        yy = _r(f1.spec, _gathered(f1, p1, p2.y), p1).to(acc)  # yy[t, s] = r1_t[y2_s]
        rr = torch.zeros_like(kk)
        for v0 in range(0, vocab, vc):
            v1 = min(vocab, v0 + vc)
            r1 = _r_block(f1, p1, *_wblock(f1, v0, v1)).to(acc)
            r2 = _r_block(f2, p2, *_wblock(f2, v0, v1)).to(acc)
            rr.baddbmm_(r1, r2.transpose(1, 2))
        eq = (p1.y.unsqueeze(2) == p2.y.unsqueeze(1)).to(acc)
        m = a1.unsqueeze(2) * a2.unsqueeze(1) * eq
        m -= a1.unsqueeze(2) * x.transpose(1, 2) + a2.unsqueeze(1) * yy
        m += rr
        return (kk * m).sum(dim=(1, 2))
    if isinstance(f2, Rows):
        idx = f2.idx[lo:hi]
        ge = f2.g[lo:hi].to(acc)
        c = torch.bmm(p1.ha.to(acc), ge.transpose(1, 2))  # [b, T, S]: h_t . e_s
        rx = _r(f1.spec, _gathered(f1, p1, idx), p1).to(acc)  # r_t[x_s]
        ux = a1.unsqueeze(2) * (p1.y.unsqueeze(2) == idx.unsqueeze(1)).to(acc) - rx
        return (c * ux).sum(dim=(1, 2))
    assert isinstance(f2, Outer)
    a = f2.a[lo:hi, :, 0].to(acc)  # [b, S, d]
    q = f2.g[lo:hi, :, 0].to(acc)  # [b, S, V]
    c = torch.bmm(a, p1.ha.to(acc).transpose(1, 2))  # [b, S, T]: a_s . h_t
    qy = q.gather(2, p1.y.unsqueeze(1).expand(-1, q.shape[1], -1))  # q_s[y_t]
    qr = torch.zeros_like(c)
    for v0 in range(0, vocab, vc):
        v1 = min(vocab, v0 + vc)
        rb = _r_block(f1, p1, *_wblock(f1, v0, v1)).to(acc)
        qr.baddbmm_(q[:, :, v0:v1], rb.transpose(1, 2))
    return (c * (a1.unsqueeze(1) * qy - qr)).sum(dim=(1, 2))


def vchunk_sq_norms(fs: list[Factor], batch: int, shape: torch.Size, dt: torch.dtype) -> Tensor:
    """``||sum_f F_i||^2`` for every sample by blocks of vocabulary rows (``[b, V_c, d]`` at a time)."""
    sm = [f for f in fs if isinstance(f, Softmax)]
    f0 = sm[0]
    vocab, d = shape[0], int(math.prod(shape[1:]))
    acc = _acc(*fs, dt=dt)
    tsum = sum(f.h.shape[1] for f in sm)
    vc = _vc(f0, d + tsum)
    step = max(1, f0.spec.chunk_size // max(vc * (d + tsum), 1))
    out = torch.zeros(batch, dtype=dt, device=f0.g.device)
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        b = hi - lo
        preps = {id(f): _prep(f, lo, hi) for f in sm}
        for v0 in range(0, vocab, vc):
            v1 = min(vocab, v0 + vc)
            gc = torch.zeros(b, v1 - v0, d, dtype=acc, device=out.device)
            for f in fs:
                if isinstance(f, Softmax):
                    p = preps[id(f)]
                    u = _u_block(f, p, v0, v1, *_wblock(f, v0, v1)).to(acc)
                    gc.baddbmm_(u.transpose(1, 2), p.ha.to(acc))
                elif isinstance(f, Rows):
                    idx = f.idx[lo:hi]
                    inside = (idx >= v0) & (idx < v1)
                    rows = idx - v0 + torch.arange(b, device=idx.device).unsqueeze(1) * (v1 - v0)
                    gc.view(-1, d).index_add_(0, rows[inside], f.g[lo:hi][inside].to(acc))
                elif isinstance(f, Outer):
                    if f.g.shape[2] != 1:
                        raise ValueError(
                            "OPOB: TokenLogProbs' weight is shared with a grouped (block) "
                            "factor; not supported"
                        )
                    gq = f.g[lo:hi, :, 0, v0:v1].to(acc)
                    gc.baddbmm_(gq.transpose(1, 2), f.a[lo:hi, :, 0].to(acc))
                else:
                    gc += f.G[lo:hi].reshape(b, vocab, d)[:, v0:v1].to(acc)
            out[lo:hi] += torch.linalg.vecdot(gc.reshape(b, -1), gc.reshape(b, -1)).to(dt)
    return out


# ----------------------------------------------------------------------------- gradient


def write(f: Softmax, coeff: Tensor, shape: torch.Size, dt: torch.dtype) -> Tensor:
    """``sum_i coeff_i G_i`` (parameter-shaped, dtype ``dt``) by vocabulary and token blocks."""
    spec: HeadSpec = f.spec
    acc = torch.promote_types(spec.acc_dtype, dt)
    bsz, t, d = f.h.shape
    vocab = f.weight.shape[0]
    n = bsz * t
    out = torch.zeros(vocab, d, dtype=acc, device=f.g.device)
    p = _prep(f, 0, bsz)
    hw = (p.ha.to(acc) * coeff.to(acc).view(-1, 1, 1)).reshape(n, d)
    flat = _Prep(
        p.hc.reshape(1, n, d),
        p.ha.reshape(1, n, d),
        p.y.reshape(1, n),
        p.lse.reshape(1, n),
        None if p.ent is None else p.ent.reshape(1, n),
        p.g.reshape(1, n),
        None if p.k is None else p.k.reshape(1, n),
        p.alpha.reshape(1, n),
    )
    tc, vc = spec.blocks(n, vocab)
    for v0 in range(0, vocab, vc):
        v1 = min(vocab, v0 + vc)
        wc, bc = _wblock(f, v0, v1)
        for t0 in range(0, n, tc):
            t1 = min(n, t0 + tc)
            blk = _Prep(
                flat.hc[:, t0:t1],
                flat.ha[:, t0:t1],
                flat.y[:, t0:t1],
                flat.lse[:, t0:t1],
                None if flat.ent is None else flat.ent[:, t0:t1],
                flat.g[:, t0:t1],
                None if flat.k is None else flat.k[:, t0:t1],
                flat.alpha[:, t0:t1],
            )
            u = _u_block(f, blk, v0, v1, wc, bc)[0].to(acc)
            out[v0:v1].addmm_(u.t(), hw[t0:t1])
    return out.to(dt).reshape(shape)
