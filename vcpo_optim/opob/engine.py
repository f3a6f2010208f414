"""The norm engine: factored per-sample gradients -> squared norms and weighted sums.

For one trainable parameter ``p`` used ``U`` times in the forward pass (tied
weights, a module called twice) the rules give factors ``F_1..F_U`` and the
per-sample gradient is ``G_i = sum_u F_u,i``. The engine computes

    n_i(p) = ||G_i||^2 = sum_{u, v} <F_u,i, F_v,i>

and, once the coefficients ``c`` are known, ``sum_i c_i G_i``. Three
strategies, chosen per parameter by an operation count for the actual shapes:

* ``ghost``: pairwise inner products without materialising ``G_i``
  (Gram matrices, cost ~ ``B T T' (k + m)``); the weighted sum is written from
  the factors afterwards (one matmul, what autograd's weight gradient costs).
* ``direct``: materialise ``G_i`` in sample chunks for the norm, then write the
  weighted sum from the factors.
* ``acc``: materialise ``G_i`` in sample chunks once, and fold it into
  per-scope accumulators ``A_R = sum_i r_i G_i`` and ``A_S[s] = sum_{i in s} q_i G_i``
  while computing the norm, so the weighted sum costs nothing extra
  (``sum_i c_i G_i = A_R - sum_s b_s A_S[s]``). Holds ``(S + 1)`` parameter-sized
  buffers until the baseline is known, so it is only used when that is no more
  than the memory the factors themselves occupy.

* ``vchunk`` (parameters with a :class:`~vcpo_optim.opob.rules.base.Softmax`
  factor, the lean LM head only): per-sample gradients materialised one block
  of vocabulary rows at a time; the head's ``ghost`` form is in
  :mod:`vcpo_optim.opob.rules.lm_head` too. Such a parameter is never
  materialised as ``[B, V, d]``.

Transient buffers are bounded by chunking over samples.

Packed batches (:mod:`vcpo_optim.opob.packing`): a
:class:`~vcpo_optim.opob.segments.Segmented` factor is read as the ordinary
factor of each chunk of samples (zero-padded to the chunk's longest segment);
the cost model sees the padded layout of the whole batch; the lean head's
functions (which chunk by themselves) get a packed partner factor (a tied
embedding) padded for the whole batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .rules import lm_head as _lmh
from .rules.base import Dense, Factor, Outer, Rows, Softmax
from .segments import Segmented

_MIN_CHUNK_ELEMS = 1 << 22
#: The floor for the two passes of a checkpointed call (:mod:`vcpo_optim.opob.recompute`): there
#: the factors in flight are one layer's, so transient buffers stay within their size.
LEAN_CHUNK_ELEMS = 1 << 16
#: On CPU, per-sample gradient stacks are materialised a few samples at a time so that the
#: stack stays in cache while its norm and its accumulation read it (~1 MB in float32).
_CPU_MATERIALIZE_ELEMS = 1 << 18
#: Cost of one pass over one element of a large, memory-bound buffer (a per-sample gradient
#: stack written by a matmul, read by a reduction) in multiply-adds of a large matmul. Measured on
#: one CPU core: ~50 GMAC/s against 3-6 Gelem/s for DRAM-bound passes. GPUs are at least as
#: memory-bound, so the same constant keeps the choice conservative there.
KAPPA = 12.0


def acc_dtype(p: Tensor) -> torch.dtype:
    """float32 for half/bfloat16/float32 parameters, float64 for float64."""
    return torch.promote_types(p.dtype, torch.float32)


def _shape(f: Factor | Segmented) -> Factor:
    """The factor whose shapes the cost model reads (a packed one: its padded layout)."""
    return f.meta if isinstance(f, Segmented) else f


def _whole(f: Factor | Segmented) -> Factor:
    """The factor of the whole batch (a packed one: padded; for the lean head's functions)."""
    return f.padded(0, f.batch) if isinstance(f, Segmented) else f


def _device(f: Factor | Segmented) -> torch.device:
    """The device of a factor's tensors."""
    if isinstance(f, Segmented):
        f = f.inner
    if isinstance(f, Dense):
        return f.G.device
    return f.g.device


def _pad_elems(f: Factor | Segmented) -> int:
    """Elements per sample that reading a packed factor copies into its padded layout."""
    return f.padded_elems() if isinstance(f, Segmented) else 0


def _elems(f: Factor | Segmented) -> int:
    if isinstance(f, Segmented):
        return _elems(f.inner)
    if isinstance(f, Softmax):
        return _lmh.elems(f)
    if isinstance(f, Outer):
        return f.a.numel() + f.g.numel()
    if isinstance(f, Rows):
        return f.idx.numel() + f.g.numel()
    return f.G.numel()


def _mat_cost(f: Factor | Segmented, numel: int) -> float:
    """Materialise ``[B, *shape]`` from the factor."""
    f = _shape(f)
    if isinstance(f, Softmax):
        return math.inf  # [B, V, d]: never (the head's own strategies block over the vocabulary)
    if isinstance(f, Outer):
        b, t, nb, m = f.g.shape
        return float(b * t * nb * m * f.a.shape[-1]) + KAPPA * b * numel
    if isinstance(f, Rows):
        b, t, d = f.g.shape
        return KAPPA * (2 * b * t * d + b * numel)
    return 0.0


def _write_cost(f: Factor | Segmented, numel: int) -> float:
    """``sum_i c_i F_i`` from the factor (a packed one: from its tokens)."""
    if isinstance(f, Segmented):
        return _write_cost(f.inner, numel)
    if isinstance(f, Softmax):
        return _lmh.write_cost(f)
    if isinstance(f, Outer):
        b, t, nb, m = f.g.shape
        k = f.a.shape[-1]
        return float(b * t * nb * m * k) + KAPPA * b * t * nb * min(k, m)
    if isinstance(f, Rows):
        return KAPPA * 2 * f.g.numel()
    return KAPPA * f.G.numel() / 2


def _pair_cost(f1: Factor | Segmented, f2: Factor | Segmented) -> float:
    """``<F1_i, F2_i>`` for all i without materialising (ghost)."""
    f1, f2 = _shape(f1), _shape(f2)
    if isinstance(f1, Softmax) or isinstance(f2, Softmax):
        return _lmh.ghost_pair_cost(f1, f2)
    if isinstance(f1, Dense) or isinstance(f2, Dense):
        return math.inf
    if isinstance(f1, Outer) and isinstance(f2, Outer):
        b, t1, nb, m = f1.g.shape
        t2 = f2.g.shape[1]
        return float(b * nb * t1 * t2 * (f1.a.shape[-1] + m)) + KAPPA * b * nb * t1 * t2
    if isinstance(f1, Rows) and isinstance(f2, Rows):
        b, t1, d = f1.g.shape
        t2 = f2.g.shape[1]
        return float(b * t1 * t2 * d) + KAPPA * 2 * b * t1 * t2
    r, o = (f1, f2) if isinstance(f1, Rows) else (f2, f1)
    assert isinstance(r, Rows) and isinstance(o, Outer)
    if o.g.shape[2] != 1:
        return math.inf
    b, s, d = r.g.shape
    t = o.g.shape[1]
    return float(b * t * s * d) + KAPPA * 3 * b * t * s


def _c(t: Tensor, dt: torch.dtype) -> Tensor:
    return t if t.dtype == dt else t.to(dt)


def _sl(t: Tensor, lo: int, hi: int) -> Tensor:
    return t if lo == 0 and hi == t.shape[0] else t[lo:hi]


def _materialize(
    f: Factor | Segmented, lo: int, hi: int, shape: torch.Size, dt: torch.dtype
) -> Tensor:
    """Per-sample gradients of samples ``lo:hi``, ``[hi - lo, *shape]``."""
    if isinstance(f, Segmented):
        f, lo, hi = f.padded(lo, hi), 0, hi - lo
    if isinstance(f, Outer):
        a, g = _c(_sl(f.a, lo, hi), dt), _c(_sl(f.g, lo, hi), dt)
        if a.shape[2] == 1:
            out = torch.bmm(g[:, :, 0].transpose(1, 2), a[:, :, 0])
        else:
            out = torch.einsum("btjm,btjk->bjmk", g, a)
        return out.reshape(hi - lo, *shape)
    if isinstance(f, Rows):
        g = _c(_sl(f.g, lo, hi), dt)
        b, d = g.shape[0], g.shape[2]
        idx = _sl(f.idx, lo, hi) + torch.arange(b, device=g.device).unsqueeze(1) * f.num_rows
        out = torch.zeros(b * f.num_rows, d, dtype=dt, device=g.device)
        out.index_add_(0, idx.reshape(-1), g.reshape(-1, d))
        return out.reshape(hi - lo, *shape)
    return _c(_sl(f.G, lo, hi), dt).reshape(hi - lo, *shape)


def _pair_dot(
    f1: Factor | Segmented, f2: Factor | Segmented, lo: int, hi: int, dt: torch.dtype
) -> Tensor:
    """``<F1_i, F2_i>`` for samples ``lo:hi`` without materialising either (ghost)."""
    if isinstance(f1, Segmented) or isinstance(f2, Segmented):
        assert isinstance(f1, Segmented) and isinstance(f2, Segmented)  # a call is packed or not
        f1, f2, lo, hi = f1.padded(lo, hi), f2.padded(lo, hi), 0, hi - lo
    if isinstance(f1, Outer) and isinstance(f2, Outer):
        a1, g1 = _c(_sl(f1.a, lo, hi), dt), _c(_sl(f1.g, lo, hi), dt)
        a2, g2 = _c(_sl(f2.a, lo, hi), dt), _c(_sl(f2.g, lo, hi), dt)
        if a1.shape[1] == 1 and a2.shape[1] == 1 and a1.shape[2] == 1:
            # one token: <g a^T, g' a'^T> = (a . a')(g . g')
            va = torch.linalg.vecdot(a1.flatten(1), a2.flatten(1))
            return va * torch.linalg.vecdot(g1.flatten(1), g2.flatten(1))
        if a1.shape[2] == 1:
            ga = torch.bmm(a1[:, :, 0], a2[:, :, 0].transpose(1, 2))
            gg = torch.bmm(g1[:, :, 0], g2[:, :, 0].transpose(1, 2))
            return (ga * gg).sum(dim=(1, 2))
        ga = torch.einsum("btjk,bsjk->bjts", a1, a2)
        gg = torch.einsum("btjm,bsjm->bjts", g1, g2)
        return (ga * gg).sum(dim=(1, 2, 3))
    if isinstance(f1, Rows) and isinstance(f2, Rows):
        g1, g2 = _c(_sl(f1.g, lo, hi), dt), _c(_sl(f2.g, lo, hi), dt)
        eq = _sl(f1.idx, lo, hi).unsqueeze(2) == _sl(f2.idx, lo, hi).unsqueeze(1)
        gg = torch.bmm(g1, g2.transpose(1, 2))
        return (gg * eq.to(dt)).sum(dim=(1, 2))
    r, o = (f1, f2) if isinstance(f1, Rows) else (f2, f1)
    assert isinstance(r, Rows) and isinstance(o, Outer)
    # Rows (idx [b,S], ge [b,S,d]) vs Outer (h [b,T,d], gl [b,T,V]) on a [V, d] parameter:
    # sum_{t,s} gl[t, idx_s] (h_t . ge_s)
    ge, idx = _c(_sl(r.g, lo, hi), dt), _sl(r.idx, lo, hi)
    h, gl = _c(_sl(o.a, lo, hi)[:, :, 0], dt), _c(_sl(o.g, lo, hi)[:, :, 0], dt)
    gathered = gl.gather(2, idx.unsqueeze(1).expand(-1, gl.shape[1], -1))
    return (gathered * torch.bmm(h, ge.transpose(1, 2))).sum(dim=(1, 2))


def _write(f: Factor | Segmented, coeff: Tensor, shape: torch.Size, dt: torch.dtype) -> Tensor:
    """``sum_i coeff_i F_i`` as a parameter-shaped tensor (packed: ``sum_t c_{seg(t)} F_t``)."""
    if isinstance(f, Segmented):
        f, coeff = f.inner, f.token_coefficients(coeff)
    if isinstance(f, Softmax):
        return _lmh.write(f, coeff, shape, dt)
    if isinstance(f, Outer):
        g, a = _c(f.g, dt), _c(f.a, dt)
        if a.shape[-1] <= g.shape[-1]:
            a = a * coeff.view(-1, 1, 1, 1)
        else:
            g = g * coeff.view(-1, 1, 1, 1)
        b, t, nb, m = g.shape
        if nb == 1:
            out = torch.mm(g.reshape(b * t, m).t(), a.reshape(b * t, -1))
        else:
            out = torch.einsum("btjm,btjk->jmk", g, a)
        return out.reshape(shape)
    if isinstance(f, Rows):
        g = _c(f.g, dt) * coeff.view(-1, 1, 1)
        out = torch.zeros(f.num_rows, g.shape[-1], dtype=dt, device=g.device)
        out.index_add_(0, f.idx.reshape(-1), g.reshape(-1, g.shape[-1]))
        return out.reshape(shape)
    return torch.mv(_c(f.G, dt).reshape(coeff.shape[0], -1).t(), coeff).reshape(shape)


@dataclass
class ParamWork:
    """Everything the engine knows about one trainable parameter in one backward."""

    param: Tensor
    name: str
    factors: list[Factor | Segmented] = field(default_factory=list)
    strategy: str = ""
    acc_r: Tensor | None = None
    acc_s: Tensor | None = None
    min_chunk: int = _MIN_CHUNK_ELEMS  # transient buffers: max(this, the factors' size)

    @property
    def numel(self) -> int:
        return self.param.numel()

    def choose(self, batch: int, n_scopes: int, n_writes: int, accumulate: bool = True) -> str:
        """Pick ``ghost``, ``direct`` or ``acc`` by estimated cost (memory-bounded).

        A parameter with a :class:`Softmax` factor (the lean LM head) is never
        materialised per sample: ``ghost`` or ``vchunk`` (direct, by blocks of
        vocabulary rows; :mod:`vcpo_optim.opob.rules.lm_head`).
        ``accumulate=False`` rules out ``acc``: its accumulators fix the coefficients to
        ``q_i (r_i - b_s)`` before the norms are known, which per-sample clipping breaks.
        """
        numel, fs = self.numel, self.factors
        if any(isinstance(f, Softmax) for f in fs):
            write = n_writes * sum(_write_cost(f, numel) for f in fs)
            pairs = (_pair_cost(fs[u], fs[v]) for u in range(len(fs)) for v in range(u, len(fs)))
            head = {
                "ghost": sum(pairs) + write,
                "vchunk": _lmh.vchunk_cost([_shape(f) for f in fs], numel) + write,
            }
            self.strategy = min(head, key=lambda k: head[k])
            return self.strategy
        mat = sum(_mat_cost(f, numel) for f in fs) + KAPPA * batch * numel * (len(fs) - 1)
        norm = KAPPA * batch * numel
        write = n_writes * sum(_write_cost(f, numel) for f in fs)
        costs = {"direct": mat + norm + write}
        ghost = sum(_pair_cost(fs[u], fs[v]) for u in range(len(fs)) for v in range(u, len(fs)))
        costs["ghost"] = ghost + write
        held = (n_scopes + 1) * numel
        if accumulate and held <= max(sum(_elems(f) for f in fs), 1 << 16):
            costs["acc"] = mat + norm + max(float(held * batch), KAPPA * batch * numel)
        self.strategy = min(costs, key=lambda k: costs[k])
        return self.strategy

    def _chunk(self, per_sample: int, materialize: bool = False) -> int:
        """Samples per chunk: transient buffers stay below max(4M elements, the factors' size)."""
        cap = max(self.min_chunk, sum(_elems(f) for f in self.factors))
        if materialize and self.param.device.type == "cpu":
            cap = _CPU_MATERIALIZE_ELEMS
        return max(1, cap // max(per_sample, 1))

    def sq_norms(
        self,
        batch: int,
        r: Tensor | None = None,
        q: Tensor | None = None,
        sid: Tensor | None = None,
        n_scopes: int = 1,
    ) -> Tensor:
        """``n_i(p)``; with strategy ``acc`` also fills ``A_R = sum r_i G_i``, ``A_S[s] = sum_{i in s} q_i G_i``."""
        p, dt = self.param, acc_dtype(self.param)
        if self.strategy == "vchunk":
            return _lmh.vchunk_sq_norms([_whole(f) for f in self.factors], batch, p.shape, dt)
        if self.strategy == "ghost":
            out = torch.zeros(batch, dtype=dt, device=p.device)
            fs = self.factors
            for u in range(len(fs)):
                for v in range(u, len(fs)):
                    fu, fv = fs[u], fs[v]
                    if isinstance(fu, Softmax) or isinstance(fv, Softmax):
                        d = _lmh.pair_dot(_whole(fu), _whole(fv), dt)
                        out += d if u == v else 2 * d
                        continue
                    su, sv = _shape(fu), _shape(fv)
                    assert not isinstance(su, Dense) and not isinstance(sv, Dense)
                    nb = su.g.shape[2] if isinstance(su, Outer) else 1
                    step = self._chunk(2 * nb * su.g.shape[1] * sv.g.shape[1])
                    pad = _pad_elems(fu) + _pad_elems(fv)
                    if pad:  # packed: one chunk's padded copies stay below the transient bound
                        step = max(1, min(step, _MIN_CHUNK_ELEMS // pad))
                    for lo in range(0, batch, step):
                        hi = min(batch, lo + step)
                        d = _pair_dot(fs[u], fs[v], lo, hi, dt)
                        out[lo:hi] += d if u == v else 2 * d
            return out
        acc = self.strategy == "acc"
        step = self._chunk(self.numel, materialize=True)
        pad = sum(_pad_elems(f) for f in self.factors)
        if pad:  # packed: one chunk's padded copies stay below the engine's transient bound
            step = max(1, min(step, _MIN_CHUNK_ELEMS // pad))
        chunks: list[tuple[int, int, int]] = []  # (lo, hi, scope); with acc, one scope per chunk
        if acc:
            assert r is not None and q is not None and sid is not None
            rr, qq = _c(r, dt), _c(q, dt)
            acc_r = torch.zeros(self.numel, dtype=dt, device=p.device)
            acc_s = torch.zeros(n_scopes, self.numel, dtype=dt, device=p.device)
            ids = sid.tolist()
            lo = 0
            while lo < batch:  # runs of equal scope (prompt groups are usually contiguous)
                hi = lo + 1
                while hi < batch and hi - lo < step and ids[hi] == ids[lo]:
                    hi += 1
                chunks.append((lo, hi, ids[lo]))
                lo = hi
        else:
            chunks = [(lo, min(batch, lo + step), 0) for lo in range(0, batch, step)]
        out = torch.empty(batch, dtype=dt, device=p.device) if len(chunks) > 1 else None
        for lo, hi, sc in chunks:
            g = _materialize(self.factors[0], lo, hi, p.shape, dt)
            for f in self.factors[1:]:
                g = g + _materialize(f, lo, hi, p.shape, dt)
            flat = g.reshape(hi - lo, -1)
            n = torch.linalg.vecdot(flat, flat)
            if out is None:
                out = n
            else:
                out[lo:hi] = n
            if acc:  # two parameter-sized rows per chunk: A_R and A_S[scope]
                acc_r.addmv_(flat.t(), rr[lo:hi])
                acc_s[sc].addmv_(flat.t(), qq[lo:hi])
        if acc:
            self.acc_r = acc_r.view(p.shape)
            self.acc_s = acc_s.view(n_scopes, *p.shape)
            self.factors = []  # no longer needed: free activations early
        assert out is not None
        return out

    def release(self) -> None:
        """Drop the factors (activations, output gradients) and accumulators."""
        self.factors = []
        self.acc_r = self.acc_s = None

    def weighted_sum(self, coeff: Tensor) -> Tensor:
        """``sum_i coeff_i G_i`` written from the factors (strategies ``ghost`` / ``direct``)."""
        dt = acc_dtype(self.param)
        coeff = _c(coeff, dt)
        out = _write(self.factors[0], coeff, self.param.shape, dt)
        for f in self.factors[1:]:
            out += _write(f, coeff, self.param.shape, dt)
        return out


# ----------------------------------------------------------------------------- incremental norms


def pair_dots(
    f1: Factor | Segmented,
    f2: Factor | Segmented,
    batch: int,
    shape: torch.Size,
    dt: torch.dtype,
    floor: int = LEAN_CHUNK_ELEMS,
) -> Tensor:
    """``<F1_i, F2_i>`` for every sample: ghost where it applies, else materialised in chunks."""
    if isinstance(f1, Softmax) or isinstance(f2, Softmax):
        return _lmh.pair_dot(_whole(f1), _whole(f2), dt)
    s1, s2 = _shape(f1), _shape(f2)
    out = torch.empty(batch, dtype=dt, device=_device(f1))
    if math.isfinite(_pair_cost(f1, f2)):
        assert not isinstance(s1, Dense) and not isinstance(s2, Dense)
        nb = s1.g.shape[2] if isinstance(s1, Outer) else 1
        per = 2 * nb * s1.g.shape[1] * s2.g.shape[1] + _pad_elems(f1) + _pad_elems(f2)
        step = max(1, max(floor, _elems(f1) + _elems(f2)) // max(per, 1))
        for lo in range(0, batch, step):
            hi = min(batch, lo + step)
            out[lo:hi] = _pair_dot(f1, f2, lo, hi, dt)
        return out
    numel = math.prod(shape)
    cap = (
        _CPU_MATERIALIZE_ELEMS if out.device.type == "cpu" else max(floor, _elems(f1) + _elems(f2))
    )
    step = max(1, cap // max(numel, 1))
    for lo in range(0, batch, step):
        hi = min(batch, lo + step)
        a = _materialize(f1, lo, hi, shape, dt).reshape(hi - lo, -1)
        b = _materialize(f2, lo, hi, shape, dt).reshape(hi - lo, -1)
        out[lo:hi] = torch.linalg.vecdot(a, b)
    return out


def rows_at(f: Factor, idx: Tensor, shape: torch.Size, dt: torch.dtype) -> Tensor | None:
    """``R[i, s] = F_i[idx[i, s], :]``, ``[B, S, d]``, for a ``[V, d]`` parameter (``None``: not here).

    The cross term of ``F`` with a :class:`Rows` factor on the same indices is
    then ``<F_i, Rows_i> = sum_s <R[i, s], g[i, s]>`` (repeated indices included),
    so ``R`` can stand in for ``F`` until that factor arrives: an LM head's
    ``[B, T, V]`` output gradient becomes ``[B, S, d]`` for its tied embedding.
    """
    if len(shape) != 2 or isinstance(f, Softmax | Segmented):  # kept as they are
        return None
    b = idx.shape[0]
    if isinstance(f, Outer):
        if f.g.shape[2] != 1:
            return None
        a, g = _c(f.a[:, :, 0], dt), _c(f.g[:, :, 0], dt)  # [B, T, d], [B, T, V]
        gathered = g.gather(2, idx.unsqueeze(1).expand(-1, g.shape[1], -1))  # [B, T, S]
        return torch.bmm(gathered.transpose(1, 2), a)
    if isinstance(f, Rows):
        eq = (idx.unsqueeze(2) == f.idx.unsqueeze(1)).to(dt)  # [B, S, T]
        return torch.bmm(eq, _c(f.g, dt))
    G = _c(f.G, dt).reshape(b, *shape)
    return G.gather(1, idx.unsqueeze(-1).expand(-1, -1, shape[1]))


class Running:
    """Per-sample norms of a parameter used several times, formed as its uses arrive.

    ``n_i = sum_u <F_u,i, F_u,i> + 2 sum_{u < v} <F_u,i, F_v,i>``: each arriving
    factor adds its own term and its cross terms with the factors kept so far,
    and is kept only while uses are still to come. Once every use still to come
    is a :class:`Rows` factor whose indices are known (a tied embedding whose
    token ids the tape holds), the kept factors are replaced by their rows at
    those indices (:func:`rows_at`).
    """

    def __init__(self, param: Tensor, name: str, batch: int) -> None:
        self.param = param
        self.name = name
        self.batch = batch
        self.dt = acc_dtype(param)
        self.sq = torch.zeros(batch, dtype=self.dt, device=param.device)
        self.kept: list[Factor] = []
        self.rows: dict[int, tuple[Tensor, Tensor]] = {}  # use still to come -> (indices, R)

    def add(self, key: int, f: Factor, to_come: dict[int, Tensor | None]) -> None:
        """The factor of use ``key``; ``to_come``: the uses still to come -> their Rows indices (or None)."""
        b, shape, dt = self.batch, self.param.shape, self.dt
        w = ParamWork(self.param, self.name, [f], min_chunk=LEAN_CHUNK_ELEMS)
        w.choose(b, 1, 0, accumulate=False)
        n = w.sq_norms(b)
        for k in self.kept:
            n += 2 * pair_dots(k, f, b, shape, dt)
        hit = self.rows.pop(key, None)
        if hit is not None:
            idx, r = hit
            if not (isinstance(f, Rows) and torch.equal(f.idx, idx)):
                raise RuntimeError(f"OPOB: internal: the factor of '{self.name}' changed its rows")
            n += 2 * (r * _c(f.g, dt)).sum(dim=(1, 2))
        self.sq += n
        if not to_come:
            self.kept = []
            return
        self.kept.append(f)
        if all(v is not None for v in to_come.values()):
            projected: dict[int, Tensor] = {}
            for k, idx in to_come.items():
                assert idx is not None
                parts = [rows_at(x, idx, shape, dt) for x in self.kept]
                if any(p is None for p in parts):
                    return  # keep the factors themselves
                r = parts[0]
                for p in parts[1:]:
                    r = r + p
                projected[k] = r
            for k, r in projected.items():
                prev = self.rows.get(k)
                self.rows[k] = (to_come[k], r if prev is None else prev[1] + r)  # type: ignore[assignment]
            self.kept = []
