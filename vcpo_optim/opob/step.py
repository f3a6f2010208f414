"""One OPOB backward call, and the state of the optimizer step it belongs to.

A call runs, in order: validation of the inputs and of the tape, the scopes
(prompt groups or the batch), the graph audit, **one** autograd pass that
stops at the recorded module outputs, the per-layer factors (a rule, or the
vmap fallback), the per-sample squared norms (:mod:`vcpo_optim.opob.engine`),
the baselines and scales per scope (:mod:`vcpo_optim.opob.baseline`), the
coefficients ``c_i = (R_i - b_s(i)) k_s(i)``, and the write of
``sum_i c_i grad l_i`` through the :class:`~vcpo_optim.opob.distributed.GradReducer`.
Everything that needs another rank goes through :mod:`vcpo_optim.opob.distributed`.

:class:`Step` also holds what lives for one optimizer step: the
``scope="batch"`` accumulators (``sum_i R_i grad l_i`` and ``sum_i grad l_i``
per parameter, the step's rewards / norms or statistics, the previous
baseline), the group ids seen by the split-group check, and the reward offset.

Controls and diagnostics built on the norms (issue 11):

* ``norm_weights``: per-sample multipliers ``m_i`` of ``n_i`` in the baseline
  only (the baselines see ``m_i n_i``, float64; clipping and the noise scale
  see the true ``n_i``);
* per-trajectory clipping (``max_sample_grad_norm=C``): the coefficients after
  the baseline and the std scale are multiplied by
  ``f_i = min(1, C / (|c_i| sqrt(n_i)))`` (the ``acc`` strategy, whose
  accumulators fix the coefficients before the norms are known, is not used);
* the simple noise scale: ``sum_i |x_i|^2 = sum_i c_i^2 n_i`` and the sample
  count ride in the gradient reduction, ``|sum_i x_i|^2`` is the norm of the
  written gradient (:meth:`GradReducer.grad_sq_norm`), per optimizer step
  (:meth:`Step._noise`).

Packed batches (``cu_seqlens``, :mod:`vcpo_optim.opob.packing`): the validation
checks the records' packed layout (:func:`~vcpo_optim.opob.packing.plan`), and
:meth:`Step._use_factors` calls each rule on the token view of its record and
sums its factors per segment; everything after the factors is unchanged (the
two passes of checkpointed calls included).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as _dist
from . import distributed as red
from . import packing, recompute
from .baseline import (
    merge_stats,
    scope_baselines,
    scope_inv_std,
    scope_stats,
    stats_baselines,
    stats_inv_std,
)
from .engine import LEAN_CHUNK_ELEMS, ParamWork, Running
from .rules import apply_rule, fallback_factors, is_token_local
from .rules.base import Factor, Rows
from .rules.verify import TOLERANCE, _least_precise
from .tape import Tape, _reachable

__all__ = ["Config", "OPOBResult", "Step", "StepState"]


@dataclass
class OPOBResult:
    """What :meth:`OPOB.backward` computed for the samples of that call.

    Per sample (``[B]``, this rank's samples; float32, float64 for a float64
    model):

    * ``sq_norms[i]`` = ``n_i = ||grad_theta l_i||^2`` over the trainable
      parameters (never multiplied by ``norm_weights``);
    * ``baselines[i]`` = ``b_s`` of sample ``i``'s scope;
    * ``coefficients[i]`` = the coefficient written, ``f_i * (R_i - b_s) * k_s``
      with ``k_s = 1`` or ``1 / std_s(R)`` and ``f_i = 1`` without clipping;
    * ``clip_factors[i]`` = ``f_i = min(1, C / (|(R_i - b_s) k_s| sqrt(n_i)))``
      with ``max_sample_grad_norm=C``; ``None`` without clipping.

    Scalars (0-d tensors, global over the process group, no host sync):

    * ``num_clipped``: int64, the number of samples of this call (all ranks)
      with ``f_i < 1``; ``None`` without clipping;
    * ``noise_scale`` = ``B_simple = tr(Sigma) / |G|^2``, with
      ``noise_trace = tr(Sigma)`` and ``noise_grad_sq = |G|^2`` its two
      unbiased estimates (float64), over the samples of the optimizer step so
      far; see :class:`~vcpo_optim.opob.OPOB` for the formulas and when they are
      NaN.

    With ``scope="batch"`` and several calls per optimizer step, each result
    reflects the baseline over the calls of the step so far; the last call's is
    the final one.
    """

    sq_norms: Tensor
    baselines: Tensor
    coefficients: Tensor
    clip_factors: Tensor | None = None
    num_clipped: Tensor | None = None
    noise_scale: Tensor | None = None
    noise_trace: Tensor | None = None
    noise_grad_sq: Tensor | None = None


@dataclass(frozen=True)
class Config:
    """The baseline settings of an OPOB instance (see :class:`~vcpo_optim.opob.OPOB`)."""

    scope: str
    agg: str
    norm_by_std: bool
    winsor_q: float
    max_sample_grad_norm: float | None = None
    strict: bool = True  # a rule that disagrees with its module: refuse (else the fallback)


def _to_1d(
    x: Any, batch: int, device: torch.device, what: str, dtype: torch.dtype | None
) -> Tensor:
    if isinstance(x, Tensor):
        if x.device != device and not (what == "groups" and x.device.type == "cpu"):
            raise ValueError(
                f"OPOB: {what} is on {x.device} but per_sample_loss is on {device} (device mismatch)"
            )
        t = x
    else:
        try:
            t = torch.as_tensor(x)
        except Exception as e:
            raise ValueError(f"OPOB: {what} must be a tensor or a sequence of numbers") from e
    if tuple(t.shape) != (batch,):
        raise ValueError(
            f"OPOB: {what} must have shape [B] = [{batch}] like per_sample_loss, got {tuple(t.shape)}"
        )
    t = t.to(device)
    return t if dtype is None else t.to(dtype)


def _grad_mark(p: Tensor) -> tuple[int, int] | None:
    """Identity and version of ``p.grad`` (``None`` without one): changes when autograd writes it."""
    return None if p.grad is None else (id(p.grad), p.grad._version)


def _hook_name(h: Any) -> str:
    f = getattr(h, "func", h)  # functools.partial
    return getattr(f, "__qualname__", None) or type(f).__name__


def check_param_hooks(params: dict[int, Tensor], names: dict[int, str]) -> None:
    """Refuse trainable parameters that carry gradient hooks OPOB would bypass.

    OPOB writes ``.grad`` from per-sample factors; autograd never accumulates into
    the parameters, so ``Tensor.register_hook`` hooks (run on the gradient before
    accumulation, e.g. a row mask) and ``register_post_accumulate_grad_hook`` hooks
    (run after it: optimizer-in-backward, gradient averaging) would silently not run.
    """
    found: list[str] = []
    for i, p in params.items():
        hooks = [
            (kind, h)
            for kind, d in (
                ("register_hook", getattr(p, "_backward_hooks", None)),
                (
                    "register_post_accumulate_grad_hook",
                    getattr(p, "_post_accumulate_grad_hooks", None),
                ),
            )
            for h in (d or {}).values()
        ]
        if hooks:
            kind, h = hooks[0]
            found.append(f"{names.get(i, '?')} ({kind}: {_hook_name(h)})")
    if found:
        more = f" and {len(found) - 5} more" if len(found) > 5 else ""
        raise ValueError(
            f"OPOB: trainable parameters carry gradient hooks: {', '.join(found[:5])}{more}. "
            "OPOB writes .grad itself from per-sample factors, so autograd never accumulates "
            "into these parameters and the hooks would silently not run (a hook that changes "
            "the gradient would also make the per-sample norms disagree with it). Remove the "
            "hooks (handle.remove()) and apply the transformation to .grad after "
            "opob.backward() and before optimizer.step(). Nothing was changed."
        )


@dataclass
class _StatPlan:
    """Local scopes of a call on the sufficient-statistics path (``agg="mean"`` over a process group)."""

    sid: Tensor  # local scope index of each local sample
    n_local: int
    loc_ids: Tensor | None  # group ids of the local scopes (None: batch scope)
    sizes: list[int]  # number of local scopes of every rank
    inv: Tensor | None  # 1/std of the local scopes (group scope with norm_by_std)


@dataclass
class StepState:
    """What lives for one optimizer step. A call builds the next state and commits it at its end."""

    seen_groups: Tensor | None = None  # group ids of the step so far (split-group check)
    hist_n: Tensor | None = None  # per-sample path, batch scope: the step's norms so far
    hist_r: Tensor | None = None  # ... and its rewards
    hist_stats: Tensor | None = None  # statistics path, batch scope: the step's merged stats
    r_off: Tensor | None = None  # reward offset of the step (single process, scope="batch")
    prev_b: float | Tensor = 0.0  # batch scope: the baseline and scale last written
    prev_k: float | Tensor = 0.0
    # batch scope: per parameter, sum_i r_i grad l_i and sum_i q_i grad l_i over the step
    sums: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    # (parameter, its .grad, the grad's version) after OPOB's last write: the step boundary
    marks: list[tuple[Tensor, Any, int]] = field(default_factory=list)
    calls: int = 0  # backward calls committed in this step
    weighted: bool | None = None  # batch scope: whether the step's calls pass norm_weights
    # the step's noise-scale sums (global, float64 [_NZ_STATE]): count, sum c^2 n, and for
    # the batch scope sum n, sum n (r - b), sum n (r - b)^2 about the last baseline; dirty
    noise: Tensor | None = None


@dataclass
class _Call:
    """What the validation of a call established (``b``, ``r``, ``g`` local; the rest agreed)."""

    b: int
    r: Tensor
    g: Tensor | None  # this rank's group ids (int64), or None
    sizes: list[int]  # number of local scopes of every rank
    ids_given: bool  # group ids were passed (by every rank with samples): split-group check
    new_step: bool  # a new optimizer step started since the last call (agreed)
    m: Tensor | None = None  # this rank's norm_weights (float64), or None
    weighted: bool = False  # some rank with samples passed norm_weights (then every such rank did)
    packed: packing.Packed | None = None  # this rank's packed layout (cu_seqlens), or None


#: Random projections per row of the lean per-sample check (checkpointed calls).
SKETCH_K = 8


def _check_weights(b: int, device: torch.device) -> Tensor:
    """The per-sample check's weights ``v_i``: random powers of two (fixed seed).

    Scaling the loss by ``v_i`` scales every gradient of a separable loss exactly (no
    rounding), so only a real dependence on other samples shows."""
    gen = torch.Generator().manual_seed(0x5E9A)
    k = torch.randint(-3, 4, (b,), generator=gen)
    return torch.exp2(k.to(torch.float64)).to(device)


def _sketch(
    u: Any, g: Tensor, b: int, packed: packing.Packed | None, key: tuple[int, int]
) -> Tensor | None:
    """``[rows, K]`` bilinear projections ``z_t^T G_r z_h`` of a recorded output's gradient.

    Rows are the batch rows, or the tokens of a packed row (up to ``cu[B]``); ``None`` when
    the output has neither (the full check skips such outputs too). ``z`` is Gaussian,
    seeded by ``key`` (the same in both backwards of the check).
    """
    if packed is not None:
        ax = packed.axes.get(id(u))
        if ax is None:
            return None
        g = packing.token_view(g, ax[0], packed.n, ax[1])[: packed.seg.n_tokens]
    elif g.dim() == 0 or g.shape[0] != b:
        return None
    if g.dim() == 0:
        return None
    rows = g.shape[0]
    h = g.shape[-1] if g.dim() > 1 else 1
    m = g.reshape(rows, -1, h)
    if m.dtype not in (torch.float32, torch.float64):
        m = m.float()
    gen = torch.Generator().manual_seed(0x5E9B + 7919 * key[0] + key[1])
    zt = torch.randn(SKETCH_K, m.shape[1], generator=gen, dtype=torch.float64)
    zh = torch.randn(SKETCH_K, h, generator=gen, dtype=torch.float64)
    t = torch.einsum("rth,kh->rkt", m, zh.to(m.device, m.dtype))
    return torch.einsum("rkt,kt->rk", t.double(), zt.to(m.device))


def _not_separable(worst: tuple[float, str], packed: packing.Packed | None) -> str:
    """The per-sample check's refusal."""
    where = "segment i of the packed row (cu_seqlens)" if packed is not None else "row i"
    leak = (
        " In a packed row the usual cause is attention across trajectories: with "
        "transformers pass position_ids restarting at 0 per trajectory, "
        "attention_mask=None and use_cache=False."
        if packed is not None
        else ""
    )
    return (
        f"OPOB: per_sample_loss[i] does not depend on {where} of the batch alone: at "
        f"module '{worst[1]}' the gradient of sum_i v_i l_i differs from v_i times that "
        f"of sum_i l_i by {worst[0]:.2g} (relative) for random v. OPOB's per-sample "
        "norms would be wrong. The loss must be in the order of the batch rows (not "
        "sorted, shuffled or reordered after the forward) and entry i must not mix in "
        f"other samples (e.g. l - l.mean(), a batch-level normaliser with grad).{leak} "
        "Nothing was changed."
    )


def _not_additive(worst: tuple[float, str]) -> str:
    """The total check's refusal."""
    return (
        f"OPOB: the per-sample gradients of parameter '{worst[1]}' do not add up to "
        f"autograd's gradient of sum_i l_i (relative difference {worst[0]:.2g}): "
        "something between a recorded module output and its parameters changes the "
        "gradient out of OPOB's sight, e.g. a Tensor.register_hook on a module's output "
        "(remove it, or transform .grad after opob.backward()). Nothing was changed."
    )


class _Worst:
    """The largest relative difference above ``tol`` seen by a first-call check, and where."""

    def __init__(self, tol: float) -> None:
        self.tol = tol
        self.err = 0.0
        self.name = ""
        self.conclusive = False  # some comparison had a nonzero, finite scale

    def add(self, diff: float, scale: float, name: str) -> None:
        """Record ``diff / scale`` (skipped when ``scale`` is zero or not finite)."""
        if scale == 0.0 or not math.isfinite(scale):
            return
        self.conclusive = True
        err = diff / scale
        if err > self.tol and err > self.err:
            self.err, self.name = err, name

    @property
    def found(self) -> tuple[float, str] | None:
        """``(relative difference, where)`` if any comparison failed, else ``None``."""
        return (self.err, self.name) if self.err > 0.0 else None


class Step:
    """Runs OPOB backward calls and keeps the state of the current optimizer step.

    Every rank runs the same code, a rank with no samples (``B = 0``) included,
    and issues the same collectives in the same order. A failure on a rank after
    the first collective is not raised there at once: it is carried by the next
    collective's error flag, so that every rank raises the same ``ValueError``
    (naming the ranks and their causes) at the same point. The gradient
    reduction is the last such point; ``.grad`` and the step state change only
    after it.

    Args:
        cfg: the baseline settings.
        tape: the records of the hooked modules (consumed and cleared by each call).
        reducer: gradient writes and norm completion (collectives, if any).
        params, names: the tracked trainable parameters by id (TP stand-ins are
            added by the reducer).
        owned: the parameter ids each hooked module (by id) covers (the audit).
        model: the model (named in audit errors).
    """

    def __init__(
        self,
        cfg: Config,
        tape: Tape,
        reducer: red.GradReducer,
        params: dict[int, Tensor],
        names: dict[int, str],
        owned: dict[int, set[int]],
        model: nn.Module,
    ) -> None:
        self.cfg = cfg
        self.tape = tape
        self.reducer = reducer
        self.params = params
        self.names = names
        self.owned = owned
        self.model = model
        self.state = StepState()
        # the per-sample check (:meth:`_check_separable`) ran conclusively once
        self.separable_checked = False
        self._separable_pending: (
            tuple[tuple[Tensor | None, ...], Tensor, dict[int, Tensor | None] | None] | None
        ) = None

    # ------------------------------------------------------------------ optimizer step

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.state = StepState()

    def _new_step(self) -> bool:
        """Whether a new optimizer step started since OPOB last wrote ``.grad``.

        Read from the gradients OPOB wrote: one set to ``None`` or replaced by another
        tensor (``zero_grad()``, ``p.grad = ...``) means their content is gone; one
        changed in place (its version counter moved) and now all zero means
        ``zero_grad(set_to_none=False)`` / ``p.grad.zero_()``. A gradient changed in
        place to anything else is ambiguous (a reset followed by other gradients, or
        clipping, or an auxiliary loss added mid-step): with ``scope="batch"``, whose
        baseline correction relies on ``.grad`` still holding OPOB's earlier writes,
        that is refused; ``scope="group"`` keeps the step.
        """
        st = self.state
        changed = []
        for p, ref, version in st.marks:
            g = p.grad
            if g is None or g is not ref():
                return True
            if g._version != version:
                changed.append(p)
        if not changed:
            return False
        if all(not bool(red.local(p.grad).any()) for p in changed):
            return True
        if self.cfg.scope == "batch" and st.sums:
            names = [self.names.get(id(p), "?") for p in changed]
            raise ValueError(
                f"OPOB: the gradients of {names[:5]} were modified in place since OPOB's last "
                "backward call of this optimizer step (they are neither what OPOB wrote nor zero), "
                "so OPOB cannot tell whether a new step started: scope='batch' corrects the "
                "gradient of the earlier calls as the step's baseline moves and needs them intact. "
                "Call opob.finalize() when a new optimizer step starts (or zero gradients with "
                "set_to_none=True), and clip or add other gradients only after the last "
                "opob.backward() of the step."
            )
        return False

    @staticmethod
    def check_no_split_groups(new_ids: Tensor, seen: Tensor | None) -> None:
        """Raise if a group id of this call already appeared earlier in the optimizer step."""
        if seen is None:
            return
        dup = new_ids[torch.isin(new_ids, seen)]
        if dup.numel():
            raise ValueError(
                f"OPOB: scope='group' needs each group complete within one backward call, but "
                f"group ids {dup.tolist()[:10]} already appeared in an earlier call of this "
                "optimizer step (split group). Put whole groups in each micro-batch, use "
                "scope='batch', or call opob.finalize() if a new step started."
            )

    def _dtype(self) -> torch.dtype:
        return (
            torch.float64
            if any(p.dtype == torch.float64 for p in self.params.values())
            else torch.float32
        )

    def _uses_stats(self, group: Any | None) -> bool:
        """Whether this call reduces per-scope sums instead of gathering per-sample values."""
        return group is not None and self.cfg.agg == "mean"

    # ------------------------------------------------------------------ validation

    def _validate_local(
        self, loss: Any, rewards: Any, groups: Any, empty_ok: bool, cu_seqlens: Any = None
    ) -> tuple[int, Tensor, Tensor | None, packing.Packed | None]:
        if not self.tape.attached:
            if self.tape.replaced:
                raise ValueError(
                    "OPOB: this OPOB was detached because another OPOB was attached to the same "
                    "model (each module is recorded by one OPOB); use the newer one"
                )
            raise ValueError("OPOB: this OPOB was detached")
        check_param_hooks(self.params, self.names)
        if not isinstance(loss, Tensor):
            raise ValueError("OPOB: per_sample_loss must be a torch.Tensor")
        if loss.dim() != 1:
            raise ValueError(f"OPOB: per_sample_loss must have shape [B], got {tuple(loss.shape)}")
        b = loss.shape[0]
        if b == 0 and not empty_ok:
            raise ValueError("OPOB: empty batch (B = 0)")
        if not loss.is_floating_point():
            raise ValueError("OPOB: per_sample_loss must be floating point")
        if b and not loss.requires_grad:
            raise ValueError(
                "OPOB: per_sample_loss does not require grad (no graph to backpropagate)"
            )
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError("OPOB: per_sample_loss contains NaN or Inf")
        r = _to_1d(rewards, b, loss.device, "rewards", None)
        if r.is_complex():
            raise ValueError(f"OPOB: rewards must be real numbers, got dtype {r.dtype}")
        if not r.is_floating_point():
            r = r.to(torch.float32)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("OPOB: rewards contain NaN or Inf")
        g: Tensor | None = None
        if groups is not None and self.cfg.scope == "group":
            g = _to_1d(groups, b, loss.device, "groups", None)
            bad = g.is_floating_point() or g.is_complex() or g.dtype == torch.bool
            if bad and b:  # an empty list of ids is a float tensor; nothing to check
                raise ValueError(f"OPOB: groups must be integer ids, got dtype {g.dtype}")
            g = g.to(torch.int64)
        if b and not self.tape and recompute.find_reentrant(loss):
            raise ValueError(recompute.REENTRANT)  # what an empty tape usually means then
        if self.tape.deferred and self.tape.once:
            raise ValueError(
                f"OPOB: {self.tape.once}, while other checkpointed modules of this forward are "
                "recorded to be recomputed twice (OPOB(..., checkpointing='auto')). Use one kind "
                "of checkpointing, or OPOB(..., checkpointing=False) (inputs held, one backward). "
                "Nothing was changed."
            )
        seg = None if cu_seqlens is None else packing.segments(cu_seqlens, b, loss.device)
        self.tape.validate(b, require_records=b > 0, loss=loss, packed=seg is not None)
        packed = None
        if seg is not None:
            packed, kept = packing.plan(
                self.tape.uses,
                seg,
                lambda u: u.rule and is_token_local(u.module) is not None,
                lambda: _reachable(loss),
            )
            self.tape.keep(kept)
        return b, r, g, packed

    @staticmethod
    def _validate_norm_weights(m: Any, b: int, device: torch.device) -> Tensor | None:
        """``norm_weights``: ``[B]`` real, finite and non-negative; returned as float64."""
        if m is None:
            return None
        t = _to_1d(m, b, device, "norm_weights", None)
        if t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"OPOB: norm_weights must be real numbers, got dtype {t.dtype}")
        t = t.to(torch.float64)
        if not bool(torch.isfinite(t).all()):
            raise ValueError("OPOB: norm_weights contain NaN or Inf")
        if bool((t < 0).any()):
            raise ValueError(
                "OPOB: norm_weights must be >= 0 (they multiply the squared norms n_i in the "
                f"baseline weights); got min {float(t.min())}"
            )
        return t

    def _validate(
        self,
        loss: Any,
        rewards: Any,
        groups: Any,
        group: Any | None,
        norm_weights: Any = None,
        cu_seqlens: Any = None,
    ) -> _Call:
        """Local checks, then the call's first collective: one agreement over the group.

        Every rank's batch size, number of local scopes and whether it passed group
        ids ride along; from them every rank draws the same conclusions (an empty
        global batch, ids on some ranks but not on others).
        """
        shared = group is not None or self.reducer.tp_active()
        error: BaseException | None = None
        out: tuple[int, Tensor, Tensor | None, packing.Packed | None] | None = None
        new_step = False
        m: Tensor | None = None
        try:
            out = self._validate_local(
                loss, rewards, groups, empty_ok=group is not None, cu_seqlens=cu_seqlens
            )
            m = self._validate_norm_weights(norm_weights, out[0], loss.device)
            new_step = self._new_step()
        except Exception as exc:
            if not shared:
                raise
            error = exc
        error = red.agree_tp(error, self.reducer.tp_group)
        b, g = (out[0], out[2]) if out is not None else (0, None)
        kind = 0.0 if b == 0 or self.cfg.scope != "group" else (1.0 if g is not None else 2.0)
        n_local = 0 if b == 0 else (1 if g is None else int(torch.unique(g).numel()))
        weights_kind = 0.0 if b == 0 else (1.0 if norm_weights is not None else 2.0)
        payload = [float(b), float(n_local), kind, float(new_step), weights_kind]
        rows = red.agree(error, group, "invalid input", payload)
        assert out is not None
        if sum(x[0] for x in rows) == 0:
            raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
        with_ids = [k for k, x in enumerate(rows) if x[2] == 1.0]
        without = [k for k, x in enumerate(rows) if x[2] == 2.0]
        if with_ids and without:
            raise ValueError(
                f"OPOB: rank(s) {with_ids} passed group ids but rank(s) {without} passed "
                "groups=None in the same backward call: pass the prompt-group ids on every rank "
                "(groups=None makes the call one group, which cannot be merged with ids)"
            )
        weighted = [k for k, x in enumerate(rows) if x[4] == 1.0]
        unweighted = [k for k, x in enumerate(rows) if x[4] == 2.0]
        if weighted and unweighted:
            raise ValueError(
                f"OPOB: rank(s) {weighted} passed norm_weights but rank(s) {unweighted} did not "
                "in the same backward call: the baselines are global, so pass norm_weights on "
                "every rank that has samples (ones for plain n_i)"
            )
        sizes = [int(x[1]) for x in rows]
        return _Call(
            out[0],
            out[1],
            out[2],
            sizes,
            bool(with_ids),
            any(x[3] for x in rows),
            m,
            bool(weighted),
            out[3],
        )

    # ------------------------------------------------------------------ scopes

    def _scopes(
        self, c: _Call, r: Tensor, group: Any | None, st: StepState
    ) -> tuple[Tensor, Tensor, int, int, Tensor | None]:
        """Per-sample path: global rewards of the scope(s), scope index of every global sample,
        #scopes, this rank's offset among them, and this call's global group ids."""
        r_all, offset = red.gather_varlen(r, group)
        if self.cfg.scope == "batch":
            prev = st.hist_r
            r_step = r_all if prev is None else torch.cat([prev.to(r_all.dtype), r_all])
            sid = torch.zeros(r_step.numel(), dtype=torch.long, device=r.device)
            return r_step, sid, 1, offset + (0 if prev is None else prev.numel()), None
        new_ids = None
        if c.ids_given:
            ids = c.g if c.g is not None else torch.zeros(0, dtype=torch.int64, device=r.device)
            ids_all, _ = red.gather_varlen(ids, group)  # gathered as int64: exact
            new_ids = torch.unique(ids_all)
            self.check_no_split_groups(new_ids, st.seen_groups)
        else:
            zeros = torch.zeros(c.b, dtype=torch.int64, device=r.device)
            ids_all, _ = red.gather_varlen(zeros, group)
        uniq, sid = torch.unique(ids_all, return_inverse=True)
        return r_all, sid, uniq.numel(), offset, new_ids

    def _stats_scopes(self, c: _Call, r: Tensor, group: Any) -> _StatPlan:
        """Statistics path, before the norms: local scopes; with ``norm_by_std`` and
        ``scope="group"`` the global 1/std (one collective)."""
        dev = r.device
        if self.cfg.scope == "batch":
            return _StatPlan(torch.zeros(c.b, dtype=torch.long, device=dev), 1, None, [], None)
        if c.g is None:
            loc_ids = torch.zeros(1 if c.b else 0, dtype=torch.int64, device=dev)
            sid = torch.zeros(c.b, dtype=torch.long, device=dev)
        else:
            loc_ids, sid = torch.unique(c.g, return_inverse=True)
        n_local = int(loc_ids.numel())
        inv = None
        if self.cfg.norm_by_std:
            st = scope_stats(None, r, sid, n_local)
            _, merged, loc2glob = red.exchange_rows(
                loc_ids, st, c.sizes, group, None, "reward statistics"
            )
            inv = stats_inv_std(merged)[loc2glob].to(device=dev, dtype=r.dtype)
        return _StatPlan(sid, n_local, loc_ids, c.sizes, inv)

    def _stats_finish(
        self,
        sq: Tensor,
        r: Tensor,
        plan: _StatPlan,
        c: _Call,
        group: Any,
        st: StepState,
        error: BaseException | None,
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """Statistics path, after the norms: one collective of per-scope sums with the error flag.

        Returns the baselines and scales of the local scopes (``[n_local]``; ``[1]`` for
        the batch scope), the global ids of the call (split-group check) and, for the
        batch scope, the step's merged stats. Raises the same error on every rank.
        """
        dev, dt = r.device, r.dtype
        what = "error in the backward call"
        stats = scope_stats(sq, r, plan.sid, plan.n_local)
        if self.cfg.scope == "batch":
            call = red.gather_batch_stats(stats[0], group, error, what)
            hist = st.hist_stats
            step = (
                call
                if hist is None
                else merge_stats(torch.cat([hist, call]), torch.zeros(2, dtype=torch.long), 1)
            )
            bs = stats_baselines(step)
            ks = stats_inv_std(step) if self.cfg.norm_by_std else torch.ones_like(bs)
            return bs.to(device=dev, dtype=dt), ks.to(device=dev, dtype=dt), None, step
        assert plan.loc_ids is not None
        uniq, merged, loc2glob = red.exchange_rows(
            plan.loc_ids, stats, plan.sizes, group, error, what
        )
        new_ids = None
        if c.ids_given:
            new_ids = uniq.to(dev)
            self.check_no_split_groups(new_ids, st.seen_groups)
        bs = stats_baselines(merged)[loc2glob].to(device=dev, dtype=dt)
        ks = plan.inv if plan.inv is not None else torch.ones_like(bs)
        return bs, ks, new_ids, None

    # ------------------------------------------------------------------ the call

    def run(
        self,
        loss: Tensor,
        rewards: Any,
        groups: Any,
        norm_weights: Any = None,
        cu_seqlens: Any = None,
    ) -> OPOBResult:
        """One backward call: every rank, with or without samples, runs exactly this.

        The tape is consumed (the caller clears it whatever happens).
        """
        reducer = self.reducer
        group = reducer.dp_group()
        buffered = not reducer.local()
        if buffered:
            reducer.begin()
        try:
            return self._run(loss, rewards, groups, group, buffered, norm_weights, cu_seqlens)
        finally:
            reducer.end()

    def _check_step(self, c: _Call, st: StepState) -> None:
        """Refusals that depend on the earlier calls of the step (the same on every rank)."""
        if self.cfg.scope != "batch" or st.calls == 0:
            return
        if self.cfg.max_sample_grad_norm is not None:
            raise ValueError(
                "OPOB: max_sample_grad_norm with scope='batch' needs the whole optimizer step in "
                "one backward call: the clip factor min(1, C / (|R_i - b| k sqrt(n_i))) of a "
                "sample from an earlier call depends on the step's final baseline, and its "
                "per-sample gradient is gone, so the earlier calls' clipped gradient cannot be "
                "corrected. Use one opob.backward() per step, or scope='group' (each group "
                "complete in one call), or call opob.finalize() if a new step started. Nothing "
                "was changed."
            )
        if st.weighted is not None and st.weighted != c.weighted:
            raise ValueError(
                "OPOB: with scope='batch' every backward call of an optimizer step must pass "
                "norm_weights, or none may: the step's baseline mixes the calls' weighted norms. "
                f"An earlier call of this step {'did' if st.weighted else 'did not'}. Nothing "
                "was changed."
            )

    def _run(
        self,
        loss: Tensor,
        rewards: Any,
        groups: Any,
        group: Any | None,
        buffered: bool,
        norm_weights: Any = None,
        cu_seqlens: Any = None,
    ) -> OPOBResult:
        cfg, reducer = self.cfg, self.reducer
        shared = group is not None or reducer.tp_active()  # failures must be agreed
        c = self._validate(loss, rewards, groups, group, norm_weights, cu_seqlens)  # collective 1
        st = StepState() if c.new_step else self.state  # read-only until the commit
        self._check_step(c, st)
        # a gradient OPOB wrote earlier in this step changed in place since (scope="group")
        foreign = any(
            p.grad is not None and p.grad._version != version for p, _, version in st.marks
        )
        clip = cfg.max_sample_grad_norm
        b, dev, dt = c.b, loss.device, self._dtype()
        r = c.r
        r_off, step_off = None, st.r_off
        if group is None and dt != torch.float64:
            # Baselines are shift-equivariant and the std shift-invariant: center the rewards (in
            # float64, per scope; one offset per optimizer step for scope="batch") so that a large
            # common offset does not cancel catastrophically in float32 (baselines, gradient sums).
            r64 = r.to(torch.float64)
            if cfg.scope == "batch":
                if step_off is None:
                    step_off = r64.mean()
                r_off = step_off.expand(b)
            elif c.g is None:
                r_off = r64.mean().expand(b)
            else:
                _, idx, cnt = torch.unique(c.g, return_inverse=True, return_counts=True)
                sums = torch.zeros(cnt.numel(), dtype=torch.float64, device=r.device)
                r_off = (sums.index_add_(0, idx, r64) / cnt)[idx]
            r = r64 - r_off
        r = r.to(dt)

        # ---- scopes; collectives that need nothing from the backward pass ----
        plan = None
        if self._uses_stats(group):  # per-scope sums over the group, no per-sample gather
            plan = self._stats_scopes(c, r, group)
            sid, n_scopes, inv = plan.sid, plan.n_local, plan.inv
        else:
            r_scope, sid_all, n_scopes, off, new_ids = self._scopes(c, r, group, st)
            sid = sid_all[off : off + b]
            inv = scope_inv_std(r_scope, sid_all, n_scopes) if cfg.norm_by_std else None

        batch_scope = cfg.scope == "batch"
        if batch_scope:
            q_acc = torch.ones(b, dtype=dt, device=dev)
            r_acc = r
            sid_acc = torch.zeros(b, dtype=torch.long, device=dev)
            ns_acc = 1
        else:
            k = inv[sid] if inv is not None else torch.ones(b, dtype=dt, device=dev)
            q_acc, r_acc, sid_acc, ns_acc = k, k * r, sid, n_scopes

        # ---- local work: audit, the autograd pass, factors, norms (failures deferred) ----
        error: BaseException | None = None
        works: dict[int, Any] = {}
        parts: list[tuple[Tensor, Tensor]] = []
        sq = torch.zeros(b, dtype=dt, device=dev)
        checked = False  # the first-call checks ran conclusively and passed on this rank
        # two passes: autograd's gradient of sum_i l_i, for the total check after pass 2
        total_ref: dict[int, Tensor | None] | None = None
        total_conclusive = False
        try:
            grads: tuple[Tensor | None, ...] = ()
            two_pass = False  # checkpointed modules: norms while recomputing, then the gradient
            if b or (self.tape and loss.requires_grad):  # an empty rank that ran a forward too
                self.tape.audit(loss, self.params, self.names, self.owned, self.model)
                two_pass = b > 0 and self.tape.deferred
                if two_pass:
                    self._norm_pass(loss, b, ns_acc, dt, parts, c.packed)
                    if b > 1 and not self.separable_checked:  # (FSDP2 / TP hold: no two passes)
                        # after pass 1 (which refuses a recomputation that differs): the checks'
                        # two extra backwards see the outputs recomputed like passes 1 and 2
                        total_ref, total_conclusive = self._check_separable_lean(loss, b, c.packed)
                else:
                    # regions recomputable once (selective checkpointing) allow one pass only
                    armed = not self.separable_checked and not self.tape.once
                    # FSDP2 / tensor parallelism: the check's backward issues collectives
                    # (all-gathers, TP all-reduces) like any other, so every rank runs it
                    # (whatever its B); autograd's gradient is then of FSDP2's unsharded
                    # copies or TP shards, which OPOB does not track: no total check
                    lockstep = reducer.fsdp or reducer.tp_group is not None
                    check = armed and (lockstep or b > 1)
                    grads = self._autograd(
                        loss, separable=b if check else None, totals=not lockstep
                    )
            with torch.no_grad(), torch.autocast(dev.type, enabled=False):
                if b and not two_pass:
                    works = self._factors(grads, b, c.packed)
                pending, self._separable_pending = self._separable_pending, None
                if pending is not None:  # after the factors' own checks
                    gv, v, pgrads = pending
                    if b and not two_pass:
                        conclusive = self._check_separable(gv, grads, v, c.packed)
                        if pgrads is not None:
                            ones = torch.ones(b, dtype=torch.float64, device=dev)
                            self._check_total(
                                lambda pid: (
                                    works[pid].weighted_sum(ones)
                                    if pid in works and works[pid].factors
                                    else None
                                ),
                                pgrads,
                            )
                        # disarmed at the commit: a refused call (on any rank) is checked
                        # again on the next call
                        checked = conclusive
                    # FSDP2 / TP: disarmed on every rank together (all run the same backwards)
                    checked = checked or reducer.fsdp or reducer.tp_group is not None
                    del gv, pending
                grads = ()
                if not two_pass:  # pass 2 needs the records again
                    self.tape.clear()  # the factors hold what is still needed; free the rest now
                for w in works.values() if not two_pass else ():
                    if clip is None:
                        w.choose(b, ns_acc, 2 if batch_scope else 1)
                    else:  # clipped coefficients: one write, no accumulators
                        w.choose(b, ns_acc, 1, accumulate=False)
                    parts.append((w.param, w.sq_norms(b, r_acc, q_acc, sid_acc, ns_acc).to(dt)))
                for _, n in parts:
                    sq += n
        except Exception as exc:
            self._separable_pending = None
            if not shared:
                raise
            error = exc
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            # Tensor parallelism completes n_i (and shares failures) here.
            sq, error = reducer.complete_norms(parts, sq, error)
            if error is None and not bool(torch.isfinite(sq).all()):
                error = red.NonFiniteNorms(
                    "OPOB: per-sample gradient norms are not finite (overflow in the backward pass?)"
                )
            # the baseline weights: n_i, or m_i n_i in float64 with norm_weights (on every rank)
            sq_b = sq
            if c.weighted:
                sq_b = sq.to(torch.float64) * (c.m if c.m is not None else 1.0)
                if error is None and not bool(torch.isfinite(sq_b).all()):
                    error = ValueError(
                        "OPOB: norm_weights * per-sample squared norms overflow float64; scale "
                        "norm_weights down by a common factor (the baselines do not change)"
                    )
            if error is not None and not shared:
                raise error

            # ---- baselines: one collective carrying every rank's failure flag ----
            step_stats = n_scope = None
            if plan is not None:
                bs, ks, new_ids, step_stats = self._stats_finish(sq_b, r, plan, c, group, st, error)
            else:
                red.agree(error, group, "error in the backward call")
                n_all, _ = red.gather_varlen(sq_b, group)
                n_scope = (
                    n_all if not batch_scope or st.hist_n is None else torch.cat([st.hist_n, n_all])
                )
                bs = scope_baselines(n_scope, r_scope, sid_all, n_scopes, cfg.agg, cfg.winsor_q)
                bs = bs.to(dt)
                ks = inv if inv is not None else torch.ones(n_scopes, dtype=dt, device=dev)
            base = bs[sid]
            coef = (r - base) * ks[sid]
            # noise-scale sums of this rank (batch scope: about the step's current baseline)
            dev_r = (r - base).to(torch.float64)
            sq64 = sq.to(torch.float64)
            clip_f = None
            if clip is not None:  # |c_i| sqrt(n_i) <= C: the contribution's norm, bounded
                size = coef.abs() * sq.sqrt()
                clip_f = torch.where(size > clip, clip / size, torch.ones_like(size))
                coef = coef * clip_f
            c64 = coef.to(torch.float64)
            local = [
                torch.tensor(float(b), dtype=torch.float64, device=dev),
                (c64 * c64 * sq64).sum(),
                sq64.sum(),
                (sq64 * dev_r).sum(),
                (sq64 * dev_r * dev_r).sum(),
                (clip_f < 1).sum().to(torch.float64)
                if clip_f is not None
                else torch.zeros((), dtype=torch.float64, device=dev),
                self._pre_sq(dev)
                if st.calls == 0
                else torch.tensor(float(foreign), dtype=torch.float64, device=dev),
            ]
            payload = torch.stack(local)
            if r_off is not None:
                base = (base.to(torch.float64) + r_off).to(dt)

            # ---- the reweighted gradient (failures deferred to the gradient reduction) ----
            staged: dict[int, tuple[Tensor, Tensor]] = {}  # batch scope: this call's sums
            try:
                acc_batch = batch_scope and clip is None  # clipped: one call per step, no sums
                if two_pass:  # pass 2: the weighted sums from the factors, recomputed again
                    vectors = [r, q_acc] if acc_batch else [coef]
                    ref_norms: dict[int, float] = {}
                    diffs: dict[int, Tensor] | None = None
                    if total_ref is not None:  # the first-call total check: sum_i G_i - ref
                        ref_norms = {
                            pid: float(g.double().norm())
                            for pid, g in total_ref.items()
                            if g is not None
                        }
                        diffs = {pid: g.neg_() for pid, g in total_ref.items() if g is not None}
                        total_ref = None  # each difference is formed in place of its reference
                    works = self._sum_pass(loss, b, vectors, c.packed, diffs)
                    if diffs is not None:
                        self._check_total_diff(diffs, ref_norms)
                        checked = total_conclusive
                        del diffs
                self._write(works, st, bs, ks, r, q_acc, coef, acc_batch, staged, buffered)
            except Exception as exc:
                if not buffered:
                    raise
                error = exc
            if buffered:
                buffer = reducer.end()
                assert buffer is not None
                # the last collective; raises on a flag; the noise sums ride along
                written, total = reducer.flush(buffer, error, payload)
                assert total is not None
            else:
                written = [w.param for w in works.values()] + [
                    self.params[i] for i in st.sums if i not in works
                ]
                total = payload
            noise_state, noise = self._noise(st, total, bs[0] if batch_scope else None, ks, dev)

            # ---- commit the step state (nothing below can fail on one rank only) ----
            for pid, (d1, d0) in staged.items():
                prev = st.sums.get(pid)
                if prev is None:
                    st.sums[pid] = (d1.clone(), d0.clone())
                else:
                    prev[0].add_(d1)
                    prev[1].add_(d0)
            if batch_scope:
                st.prev_b, st.prev_k = bs[0], ks[0]
                if plan is not None:
                    st.hist_stats = step_stats
                else:
                    st.hist_n, st.hist_r = n_scope, r_scope
            elif new_ids is not None:
                seen = st.seen_groups
                st.seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
            st.r_off = step_off
            st.marks = [
                (p, weakref.ref(p.grad), p.grad._version) for p in written if p.grad is not None
            ]
            st.calls += 1
            st.noise = noise_state
            if batch_scope:
                st.weighted = c.weighted
            self.state = st
            if checked:
                self.separable_checked = True
        return OPOBResult(
            sq_norms=sq,
            baselines=base,
            coefficients=coef,
            clip_factors=clip_f,
            num_clipped=None if clip is None else total[5].round().to(torch.int64),
            noise_scale=noise[0],
            noise_trace=noise[1],
            noise_grad_sq=noise[2],
        )

    def _pre_sq(self, device: torch.device) -> Tensor:
        """``sum ||.grad||^2`` (local) of the tracked parameters before a step's first write.

        Zero (no work) when every gradient is ``None``, as after ``zero_grad()``. Anything
        else in ``.grad`` would be counted in ``|sum_i x_i|^2``: it voids the noise scale.
        """
        grads = [red.local(p.grad) for p in self.reducer.order if p.grad is not None]
        return red.sq_sum(grads, device)

    def _noise(
        self, st: StepState, total: Tensor, bb: Tensor | None, ks: Tensor, dev: torch.device
    ) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """The step's noise-scale sums after this call, and ``(B_simple, tr Sigma, |G|^2)``.

        ``total`` holds this call's global sums (count, ``sum c^2 n``, ``sum n``,
        ``sum n (r - b)``, ``sum n (r - b)^2``, clipped, dirty). ``S = sum_i |x_i|^2``
        over the step: ``scope="group"`` adds the calls' final ``sum c_i^2 n_i``;
        ``scope="batch"`` (coefficients ``k (r_i - b)`` that move with the baseline)
        re-centres the step's ``sum n (r - b)`` moments at the new baseline ``bb``
        and takes ``S = k^2 sum n (r - bb)^2``. ``P = |sum_i x_i|^2`` is the norm of the
        gradient OPOB wrote in the step (``.grad``, global).
        """
        cfg = self.cfg
        f64 = torch.float64
        prev = st.noise if st.noise is not None else torch.zeros(6, dtype=f64, device=dev)
        count = prev[0] + total[0]
        dirty = prev[5] + total[6]
        if bb is not None and cfg.max_sample_grad_norm is None:
            d = (torch.as_tensor(st.prev_b, device=dev) - bb).to(f64) if st.calls else 0.0
            n_sum = prev[2] + total[2]
            m1 = prev[3] + d * prev[2] + total[3]
            m2 = prev[4] + 2 * d * prev[3] + d * d * prev[2] + total[4]
            s = ks[0].to(f64) ** 2 * m2
        else:
            n_sum = m1 = m2 = torch.zeros((), dtype=f64, device=dev)
            s = prev[1] + total[1]
        state = torch.stack([count, s, n_sum, m1, m2, dirty])
        p = self.reducer.grad_sq_norm(dev)
        group = self.reducer.dp_group()
        if self.reducer.grad_reduction == "mean" and group is not None:
            p = p * float(_dist.get_world_size(group)) ** 2  # .grad holds the sum / world
        den = count * (count - 1)
        trace = (count * s - p) / den
        grad_sq = (p - s) / den
        scale = (count * s - p) / (p - s)
        bad = (count < 2) | (dirty > 0)
        nan = torch.full((), torch.nan, dtype=f64, device=dev)
        out = tuple(torch.where(bad, nan, x) for x in (scale, trace, grad_sq))
        return state, out  # type: ignore[return-value]

    def _write(
        self,
        works: dict[int, Any],
        st: StepState,
        bs: Tensor,
        ks: Tensor,
        r: Tensor,
        q: Tensor,
        coef: Tensor,
        batch_scope: bool,
        staged: dict[int, tuple[Tensor, Tensor]],
        buffered: bool,
    ) -> None:
        """Write ``sum_i c_i grad l_i`` (the only place gradients are produced).

        Batch scope: this call's ``d1 = sum r_i G_i``, ``d0 = sum q_i G_i`` plus the change
        of the earlier calls' share as the step's baseline moved. Unbuffered (single
        process) the step sums are updated in place; buffered they are staged in
        ``staged`` and added after the gradient reduction succeeded.
        """
        write = self.reducer.write_grad
        if not batch_scope:
            for w in works.values():
                if w.strategy == "acc":
                    assert w.acc_r is not None and w.acc_s is not None
                    contrib = w.acc_r - torch.tensordot(bs.to(w.acc_s.dtype), w.acc_s, dims=1)
                else:
                    contrib = w.weighted_sum(coef)
                write(w.param, contrib)
                w.release()
            return
        bb, kk = bs[0], ks[0]
        pb, pk = st.prev_b, st.prev_k
        for w in works.values():
            if w.strategy == "acc":
                assert w.acc_r is not None and w.acc_s is not None
                d1, d0 = w.acc_r, w.acc_s[0]
            else:
                d1, d0 = w.weighted_sum(r), w.weighted_sum(q)
            s1, s0 = st.sums.get(id(w.param), (None, None))
            delta = kk * (d1 - bb * d0)
            if s1 is not None and s0 is not None:
                delta += (kk - pk) * s1 - (kk * bb - pk * pb) * s0
            if buffered or s1 is None or s0 is None:
                staged[id(w.param)] = (d1, d0)
            else:
                s1 += d1
                s0 += d0
            write(w.param, delta)
            w.release()
        for pid, (s1, s0) in st.sums.items():
            if pid not in works:  # used in an earlier call only: its baseline moved
                write(self.params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0)

    def _autograd(
        self,
        loss: Tensor,
        inputs: list[Any] | None = None,
        retain: bool = False,
        separable: int | None = None,
        totals: bool = True,
    ) -> tuple[Tensor | None, ...]:
        """An autograd pass of OPOB (the tape paused): gradients of ``sum_i l_i`` at every
        recorded module output (the single pass), or at ``inputs`` (the two passes of
        :mod:`vcpo_optim.opob.recompute`). ``separable=B``: then the pass of the
        per-sample check (:meth:`_check_separable`), its gradients kept for the check."""
        params = list(self.params.values())
        before = [_grad_mark(p) for p in params]
        self.tape.paused = True
        try:
            if inputs is None:
                inputs = [e for u in self.tape for e in u.edges]
            with torch.enable_grad():  # pass 2 runs inside the write's no_grad block
                total = loss.sum()
            if separable is None:
                grads = torch.autograd.grad(total, inputs, retain_graph=retain, allow_unused=True)
            else:  # also autograd's own gradient of sum_i l_i, for the check (``totals``)
                both = torch.autograd.grad(
                    total,
                    [*inputs, *(params if totals else ())],
                    retain_graph=True,
                    allow_unused=True,
                )
                grads, pgrads = both[: len(inputs)], both[len(inputs) :]
                v = _check_weights(separable, loss.device)
                try:
                    gv = torch.autograd.grad(
                        loss, inputs, v.to(loss.dtype), retain_graph=retain, allow_unused=True
                    )
                except RuntimeError as e:  # e.g. selective checkpointing: one backward only
                    if "heckpoint" not in str(e):
                        raise
                    self.separable_checked = True  # this model's graph cannot be checked
                else:
                    self._separable_pending = (
                        gv,
                        v,
                        dict(zip(map(id, params), pgrads)) if totals else None,
                    )
        except RuntimeError as e:
            if "heckpoint" in str(e):
                raise ValueError(recompute.REENTRANT) from e
            raise
        finally:
            self.tape.paused = False
        self._refuse_plain_grads(
            params,
            before,
            "OPOB's backward pass (reentrant activation checkpointing or a custom autograd "
            "Function that calls backward itself)",
            "Use torch.utils.checkpoint.checkpoint(..., use_reentrant=False).",
        )
        return grads

    def _refuse_plain_grads(
        self, params: list[Tensor], before: list[Any], during: str, remedy: str
    ) -> None:
        """Raise if autograd wrote any ``.grad`` during an OPOB pass (``before``: their marks)."""
        touched = [self.names[id(p)] for p, m in zip(params, before) if _grad_mark(p) != m]
        if touched:
            raise ValueError(
                f"OPOB: parameters {touched[:10]} received plain gradients during {during}: "
                f"their per-sample gradients are invisible to OPOB. {remedy}"
            )

    def _tolerance(self, tensors: list[Tensor]) -> float:
        """The first-call checks' tolerance: that of the least precise dtype in play
        (``tensors``, the parameters, and the autocast dtype of any recorded forward)."""
        dts = [*tensors, *self.params.values()]
        dts += [torch.empty(0, dtype=u.amp[1]) for u in self.tape if u.amp and u.amp[1]]
        return TOLERANCE[_least_precise(dts)]

    def _check_separable(
        self,
        gv: tuple[Tensor | None, ...],
        g1: tuple[Tensor | None, ...],
        v: Tensor,
        packed: packing.Packed | None,
    ) -> bool:
        """Refuse a per-sample loss whose entry ``i`` is not a function of sample ``i`` alone.

        Returns whether the check was conclusive (some recorded output got a gradient).

        OPOB reads sample ``i``'s gradient from row ``i`` of every recorded module output
        (from the tokens of segment ``i`` in a packed row). That holds exactly when the
        gradient of ``sum_i v_i l_i`` at every recorded output is row ``i`` (token ``t``)
        of the gradient of ``sum_i l_i`` times ``v_i`` (``v_seg(t)``), for any weights
        ``v``. Checked once, for random ``v``, at every recorded output: a loss reordered
        against the batch (``l[perm]``), one that mixes samples (``l - l.mean()``), samples
        that attend to each other (a packed row run with an attention mask or the
        KV cache) all fail it by far more than rounding.
        """
        pos = 0
        worst = _Worst(self._tolerance([g for g in (*gv, *g1) if g is not None]))
        for u in self.tape:
            k = len(u.edges)
            for a, c1, shape in zip(gv[pos : pos + k], g1[pos : pos + k], u.out_shapes):
                if a is None and c1 is None:
                    continue
                if a is None or c1 is None:  # one pass reached it, the other did not
                    a, c1 = (c1, a) if a is None else (a, c1)
                    assert a is not None
                    a = red.local(a).reshape(shape)
                    c1 = torch.zeros_like(a)
                else:
                    a, c1 = red.local(a).reshape(shape), red.local(c1).reshape(shape)
                if packed is not None:
                    ax = packed.axes.get(id(u))
                    if ax is None:
                        continue
                    a = packing.token_view(a, ax[0], packed.n, ax[1])
                    c1 = packing.token_view(c1, ax[0], packed.n, ax[1])
                    # padding after cu[B] is refused by its own check (it must get no gradient)
                    a, c1 = a[: packed.seg.n_tokens], c1[: packed.seg.n_tokens]
                    w = v[packed.seg.seg_ids.to(v.device)]
                else:
                    w = v
                if a.dim() == 0 or a.shape[0] != w.shape[0]:
                    continue
                a64 = a.double()
                ref = c1.double() * w.to(a64.device).view(-1, *([1] * (a.dim() - 1)))
                scale = max(float(a64.norm()), float(ref.norm()))
                worst.add(float((a64 - ref).norm()), scale, u.name)
            pos += k
        if worst.found:
            raise ValueError(_not_separable(worst.found, packed))
        return worst.conclusive

    def _check_separable_lean(
        self, loss: Tensor, b: int, packed: packing.Packed | None
    ) -> tuple[dict[int, Tensor | None], bool]:
        """The per-sample check of a call with checkpointed records, without holding gradients.

        The two-pass mode (:mod:`vcpo_optim.opob.recompute`) exists not to hold what
        the single pass holds, so instead of the recorded outputs' gradients this
        keeps, per recorded output and row (token of a packed row), ``K`` random
        bilinear projections ``z_t^T G_i z_h`` of the gradient ``G_i`` (its row seen as a
        matrix ``[T', H']``; ``z`` Gaussian, the same in both backwards), formed by a
        node pre-hook as each gradient arrives. A separable loss gives
        ``P(sum_i v_i l_i) = v_i P(sum_i l_i)`` row-wise (exactly, for powers of two
        ``v``); a dependence on other rows gives a difference whose projections are
        nonzero almost surely, and ``E[(z_t^T D z_h)^2] = |D|^2``, so the relative
        difference of the projections estimates that of the gradients. Both backwards
        take the parameters as inputs (no ``.grad`` is formed); the first's result is
        autograd's gradient of ``sum_i l_i`` for the total check after pass 2.

        Returns ``(gradient of sum_i l_i by parameter id, conclusive)``; raises the
        per-sample check's ``ValueError``.
        """
        v = _check_weights(b, loss.device)
        # the weighted pass first: its parameter gradients are dropped before the plain pass
        # forms the ones kept for the total check (one gradient held, not two)
        sv, _, dts = self._sketch_pass(loss, v, b, packed)
        s1, pgrads, dts2 = self._sketch_pass(loss, None, b, packed)
        worst = _Worst(self._tolerance(dts + dts2))
        uses = list(self.tape)
        for key in sorted(set(s1) | set(sv)):
            a, c1 = sv.get(key), s1.get(key)
            if a is None or c1 is None:  # one pass reached it, the other did not
                a = a if a is not None else torch.zeros_like(c1)  # type: ignore[arg-type]
                c1 = c1 if c1 is not None else torch.zeros_like(a)
            u = uses[key[0]]
            w = v if packed is None else v[packed.seg.seg_ids.to(v.device)]
            if c1.shape[0] != w.shape[0]:
                continue
            ref = c1 * w.to(c1.device, torch.float64).view(-1, 1)
            scale = max(float(a.norm()), float(ref.norm()))
            worst.add(float((a - ref).norm()), scale, u.name)
        if worst.found:
            raise ValueError(_not_separable(worst.found, packed))
        return pgrads, worst.conclusive

    def _sketch_pass(
        self, loss: Tensor, v: Tensor | None, b: int, packed: packing.Packed | None
    ) -> tuple[dict[tuple[int, int], Tensor], dict[int, Tensor | None], list[Tensor]]:
        """One backward of ``sum_i v_i l_i`` (``v=None``: ones) to the parameters, sketching
        every recorded output's gradient as it arrives (:meth:`_check_separable_lean`).

        Returns the sketches ``[rows, K]`` (float64) by (record, output), the parameter
        gradients by id, and empty tensors of the gradients' dtypes."""
        params = list(self.params.values())
        before = [_grad_mark(p) for p in params]
        at: dict[int, tuple[Any, list[tuple[int, int, Any, int, Any]]]] = {}
        for ui, u in enumerate(self.tape):
            for ei, (e, shape) in enumerate(zip(u.edges, u.out_shapes)):
                if e.node is not None and not hasattr(e.node, "variable"):
                    at.setdefault(id(e.node), (e.node, []))[1].append(
                        (ui, ei, u, e.output_nr, shape)
                    )
        sk: dict[tuple[int, int], Tensor] = {}
        dts: list[Tensor] = []

        def hook_for(entries: list[tuple[int, int, Any, int, Any]]) -> Callable[..., None]:
            def hook(grad_outputs: Any) -> None:
                with torch.no_grad(), torch.autocast(loss.device.type, enabled=False):
                    for ui, ei, u, nr, shape in entries:
                        g = grad_outputs[nr]
                        if g is None:
                            continue
                        dts.append(torch.empty(0, dtype=g.dtype))
                        got = _sketch(u, red.local(g).reshape(shape), b, packed, (ui, ei))
                        if got is not None:
                            sk[(ui, ei)] = got

            return hook

        handles = [node.register_prehook(hook_for(ents)) for node, ents in at.values()]
        self.tape.paused = True
        try:
            with torch.enable_grad():
                total = loss.sum() if v is None else (loss * v.to(loss.dtype)).sum()
            got = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        finally:
            self.tape.paused = False
            for h in handles:
                h.remove()
        self._refuse_plain_grads(
            params,
            before,
            "OPOB's backward pass (a custom autograd Function that calls backward itself)",
            "Nothing was changed.",
        )
        return sk, dict(zip(map(id, params), got)), dts

    def _check_total_diff(self, diffs: dict[int, Tensor], ref_norms: dict[int, float]) -> None:
        """:meth:`_check_total` from the differences ``sum_i G_i - ref`` (two-pass mode).

        The scale is ``max(|ref|, |diff| - |ref|)`` (``|sum_i G_i| >= |diff| - |ref|``).
        """
        worst = _Worst(self._tolerance([]))
        for pid, d in diffs.items():
            dn = float(d.double().norm())
            rn = ref_norms.get(pid, 0.0)
            worst.add(dn, max(rn, dn - rn), self.names.get(pid, "?"))
        if worst.found:
            raise ValueError(_not_additive(worst.found))

    def _check_total(
        self, mine_of: Callable[[int], Tensor | None], pgrads: dict[int, Tensor | None]
    ) -> None:
        """Refuse a call whose per-sample factors do not add up to autograd's own gradient.

        With every coefficient 1, ``sum_i G_i`` from the factors must equal the gradient
        of ``sum_i l_i`` that autograd computes through the model (checked once, with
        the per-sample check). It differs where something changes the gradient between a
        recorded module output and the parameters that OPOB cannot see, e.g. a
        ``Tensor.register_hook`` on a module's output that rescales its gradient.
        """
        worst = _Worst(self._tolerance([]))
        for pid, p in self.params.items():
            ref = pgrads.get(pid)
            mine = mine_of(pid)
            if ref is None and mine is None:
                continue
            mine = mine.double() if mine is not None else None
            r64 = ref.double() if ref is not None else torch.zeros_like(p, dtype=torch.float64)
            m64 = mine if mine is not None else torch.zeros_like(r64)
            scale = max(float(r64.norm()), float(m64.norm()))
            worst.add(float((m64 - r64).norm()), scale, self.names.get(pid, "?"))
        if worst.found:
            raise ValueError(_not_additive(worst.found))

    def _norm_pass(
        self,
        loss: Tensor,
        b: int,
        n_scopes: int,
        dt: torch.dtype,
        parts: list[tuple[Tensor, Tensor]],
        packed: packing.Packed | None = None,
    ) -> None:
        """Norms of a call with checkpointed records (:mod:`vcpo_optim.opob.recompute`, pass 1).

        Each record's factors are formed as soon as its output gradient and its
        input exist, and freed right after: a parameter used once gets its norms
        (appended to ``parts``) at once; one used several times accumulates them
        as its uses arrive (:class:`~vcpo_optim.opob.engine.Running`). The graph is
        retained for pass 2 (:meth:`_sum_pass`).
        """
        uses_of: dict[int, list[Any]] = {}
        for u in self.tape:
            for pid in self.owned.get(id(u.module), ()):
                uses_of.setdefault(pid, []).append(u)
        done: set[int] = set()
        running: dict[int, Running] = {}
        probed: dict[int, dict[int, Tensor]] = {}
        off = torch.autocast(loss.device.type, enabled=False)

        def rows_of(u: Any, pid: int) -> Tensor | None:
            """The Rows indices of a use still to come, if its input is there to tell."""
            if id(u) not in probed:
                got: dict[int, Tensor] = {}
                ready = not u.deferred or u.captured
                if packed is None and u.rule and len(u.edges) == 1 and ready:
                    zero = torch.zeros(u.out_shapes[0], device=loss.device)
                    for pname, f in (self._use_factors(u, [zero], b) or {}).items():
                        if isinstance(f, Rows):
                            got[id(u.module.get_parameter(pname))] = f.idx
                probed[id(u)] = got
            return probed[id(u)].get(pid)

        def consume(u: Any, grads: list[Tensor | None]) -> None:
            with torch.no_grad(), off:
                facs = self._use_factors(u, grads, b, packed)
                if u.deferred:  # recaptured in pass 2; held inputs stay for it
                    u.args, u.kwargs = (), {}
                done.add(id(u))
                probed.pop(id(u), None)
                for pname, fac in (facs or {}).items():
                    p = u.module.get_parameter(pname)
                    pid = id(p)
                    name = self.names.get(pid, pname)
                    mates = uses_of.get(pid, [])
                    if len(mates) <= 1:  # used once: its norms now
                        w = ParamWork(p, name, [fac], min_chunk=LEAN_CHUNK_ELEMS)
                        w.choose(b, n_scopes, 0, accumulate=False)
                        parts.append((p, w.sq_norms(b).to(dt)))
                        continue
                    run = running.get(pid)
                    if run is None:
                        run = running[pid] = Running(p, name, b)
                    to_come = {id(v): rows_of(v, pid) for v in mates if id(v) not in done}
                    run.add(id(u), fac, to_come)

        recompute.factor_pass(
            self.tape,
            loss,
            self.params,
            self.owned,
            lambda inputs: self._autograd(loss, inputs, retain=True),
            consume,
        )
        for run in running.values():
            parts.append((run.param, run.sq.to(dt)))
        running.clear()

    def _sum_pass(
        self,
        loss: Tensor,
        b: int,
        vectors: list[Tensor],
        packed: packing.Packed | None = None,
        diffs: dict[int, Tensor] | None = None,
    ) -> dict[int, Any]:
        """Pass 2 of a call with checkpointed records: ``sum_i c_i G_i`` for each ``c`` in ``vectors``.

        The same backward as pass 1 (the records' inputs captured again from the
        recomputation), with each record's factors written into one
        parameter-sized sum per vector as they arrive (the engine's weighted sums,
        as in the single pass) and freed. Frees the graph. ``diffs`` (the first-call
        total check): ``sum_i G_i`` is also added into each parameter's entry in place
        (created at zero where missing).
        """
        sums: dict[int, tuple[Tensor, list[Tensor]]] = {}
        ones = torch.ones(b, dtype=torch.float64, device=loss.device)
        off = torch.autocast(loss.device.type, enabled=False)

        def consume(u: Any, grads: list[Tensor | None]) -> None:
            with torch.no_grad(), off:
                facs = self._use_factors(u, grads, b, packed)
                if u.deferred:
                    u.args, u.kwargs = (), {}
                for pname, fac in (facs or {}).items():
                    p = u.module.get_parameter(pname)
                    w = ParamWork(
                        p, self.names.get(id(p), pname), [fac], min_chunk=LEAN_CHUNK_ELEMS
                    )
                    got = [w.weighted_sum(c) for c in vectors]
                    if diffs is not None:
                        one = w.weighted_sum(ones)
                        d = diffs.get(id(p))
                        if d is None:
                            diffs[id(p)] = one
                        else:
                            d.add_(one)
                    prev = sums.get(id(p))
                    if prev is None:
                        sums[id(p)] = (p, got)
                    else:
                        for acc, g in zip(prev[1], got):
                            acc.add_(g)

        recompute.factor_pass(
            self.tape,
            loss,
            self.params,
            self.owned,
            lambda inputs: self._autograd(loss, inputs),
            consume,
        )
        return {
            pid: recompute.SumWork(p, {id(c): g for c, g in zip(vectors, got)})
            for pid, (p, got) in sums.items()
        }

    def _factors(
        self, grads: tuple[Tensor | None, ...], b: int, packed: packing.Packed | None = None
    ) -> dict[int, ParamWork]:
        """Per-parameter factors of every record (a rule, or the vmap fallback)."""
        works: dict[int, ParamWork] = {}
        pos = 0
        for u in self.tape:
            gs = list(grads[pos : pos + len(u.edges)])
            pos += len(u.edges)
            facs = self._use_factors(u, gs, b, packed)
            if facs is None:
                continue
            for pname, fac in facs.items():
                p = u.module.get_parameter(pname)
                w = works.get(id(p))
                if w is None:
                    w = works[id(p)] = ParamWork(p, self.names.get(id(p), pname))
                w.factors.append(fac)
        return works

    def _use_factors(
        self,
        u: Any,
        grads: list[Tensor | None],
        b: int,
        packed: packing.Packed | None = None,
    ) -> dict[str, Factor] | None:
        """The factors of one record from its output gradients (``None``: none reached the loss).

        Packed (``packed``): the rule runs on the token view of the record (or on the
        padded segments, for rules registered ``token_local="padded"``) and its
        per-token factors are summed per segment (only token-local rules get here).
        """
        # a tensor-parallel module's own output is a DTensor: its gradient's local shard
        gs = [
            None if gr is None else red.local(gr).reshape(s) for gr, s in zip(grads, u.out_shapes)
        ]
        if all(gr is None for gr in gs):
            return None
        facs: dict[str, Factor] | None = None
        if packed is not None:
            return self._packed_factors(u, gs, packed)
        if u.rule:  # None: the rule does not fit the module (strict=False): the fallback
            facs = apply_rule(u.module, u.name, u.args, u.kwargs, gs, u.amp, self.cfg.strict)
        if facs is None:
            paused, self.tape.paused = self.tape.paused, True
            try:
                facs = fallback_factors(
                    u.module, u.args, u.kwargs, gs, u.out_index, b, u.recurse, u.amp
                )
            except RuntimeError as e:
                if "random" in str(e):
                    raise ValueError(
                        f"OPOB: module '{u.name}' ({type(u.module).__name__}) draws random "
                        "numbers in its forward (dropout in training mode). The exact vmap "
                        "fallback replays the module once per sample and cannot reproduce the "
                        "random mask the forward drew (torch.func's randomness='same' or "
                        "'different' would draw new ones), so its per-sample gradients are "
                        "undefined. Set its dropout to 0 (e.g. nn.TransformerEncoderLayer(..., "
                        "dropout=0.0) or nn.MultiheadAttention(..., dropout=0.0)); dropout "
                        "between modules (nn.Dropout) is fine. Nothing was changed."
                    ) from e
                raise ValueError(
                    f"OPOB: the exact torch.func (vmap) fallback failed for module '{u.name}' "
                    f"({type(u.module).__name__}): {e}. Register a per-sample rule for this "
                    "module type (vcpo_optim.opob.register_rule) or freeze its parameters; "
                    "nothing was changed."
                ) from e
            finally:
                self.tape.paused = paused
        return facs

    def _packed_factors(
        self, u: Any, gs: list[Tensor | None], packed: packing.Packed
    ) -> dict[str, Factor]:
        """A packed record's per-segment factors (:mod:`vcpo_optim.opob.packing`).

        The rule runs on the token view (or the padded segments); a rule checked on
        first use is also checked to be position-wise (its module's forward on the
        token view equals its forward on the packed row). There is no fallback: a
        rule that does not fit its module is refused whatever ``strict`` says.
        """
        mode = is_token_local(u.module)
        assert mode is not None and u.rule  # packing.plan refused the others
        args, kwargs, tgs = packing.token_inputs(u, gs, packed, mode)
        packing.check_position_wise(u, packed, u.amp)
        facs = apply_rule(u.module, u.name, args, kwargs, tgs, u.amp, self.cfg.strict)
        if facs is None:  # strict=False: the rule does not fit, and there is no fallback here
            raise ValueError(
                f"OPOB: the per-sample rule for module '{u.name}' ({type(u.module).__name__}) "
                "does not fit it (see rule_status), and the exact vmap fallback cannot handle "
                "packed batches (cu_seqlens): register a token-local rule written for it, freeze "
                "it, or run the batch unpacked. Nothing was changed."
            )
        if mode == "tokens":
            facs = {k: packing.segment(f, packed.seg) for k, f in facs.items()}  # type: ignore[misc]
        return facs
