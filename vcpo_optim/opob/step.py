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

Extension points (not implemented yet):

* per-sample multipliers of ``n_i`` (``norm_weights``): applied to ``sq``
  right after the norms are complete (:meth:`Step._norms`), before any
  baseline or statistic is formed;
* per-trajectory gradient clipping: a factor ``min(1, C / sqrt(n_i))`` folded
  into the coefficients after :meth:`Step._baselines` (the engine's weighted
  sum takes any coefficient vector);
* a gradient-noise-scale estimate: from ``sum_i n_i`` and ``||sum_i grad l_i||^2``,
  both available in :meth:`Step._write` (one more weighted sum with unit
  coefficients, or the ``acc`` strategy's accumulators);
* packed batches: the factors arrive per segment from the tape, so nothing
  here changes beyond passing ``cu_seqlens`` to :meth:`Tape.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed as red
from .baseline import (
    merge_stats,
    scope_baselines,
    scope_inv_std,
    scope_stats,
    stats_baselines,
    stats_inv_std,
)
from .engine import ParamWork
from .rules import fallback_factors, get_rule
from .rules.base import Factor
from .tape import Tape

__all__ = ["Config", "OPOBResult", "Step"]


@dataclass
class OPOBResult:
    """What :meth:`OPOB.backward` computed for the samples of that call (all ``[B]``).

    ``sq_norms[i]`` = ``||grad_theta l_i||^2`` over the trainable parameters,
    ``baselines[i]`` = ``b_s`` of sample ``i``'s scope, ``coefficients[i]`` =
    ``c_i = (R_i - b_s) * k_s`` with ``k_s = 1`` or ``1 / std_s(R)``. Float32
    (float64 for a float64 model). With ``scope="batch"`` and several calls per
    optimizer step, each result reflects the baseline over the calls of the
    step so far; the last call's is the final one.
    """

    sq_norms: Tensor
    baselines: Tensor
    coefficients: Tensor


@dataclass(frozen=True)
class Config:
    """The baseline settings of an OPOB instance (see :class:`~vcpo_optim.opob.OPOB`)."""

    scope: str
    agg: str
    norm_by_std: bool
    winsor_q: float


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


def _as_empty(x: Any, device: torch.device, what: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(x if x is not None else [])
    if tuple(t.shape) != (0,):
        raise ValueError(
            f"OPOB: per_sample_loss is empty but {what} has shape {tuple(t.shape)} (expected [0])"
        )
    return t.to(device)


@dataclass
class _StatPlan:
    """Local scopes of a call on the sufficient-statistics path (``agg="mean"`` over a process group)."""

    sid: Tensor  # local scope index of each local sample
    n_local: int
    loc_ids: Tensor | None  # group ids of the local scopes (None: batch scope)
    sizes: list[int]  # number of local scopes of every rank
    inv: Tensor | None  # 1/std of the local scopes (group scope with norm_by_std)


class Step:
    """Runs OPOB backward calls and keeps the state of the current optimizer step.

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
        self.reset()

    # ------------------------------------------------------------------ optimizer step

    def reset(self) -> None:
        """Start a new optimizer step."""
        self.seen_groups: Tensor | None = None
        self.hist_n: Tensor | None = None
        self.hist_r: Tensor | None = None
        self.r_off: Tensor | None = None  # reward offset of the step (scope="batch")
        self.hist_stats: Tensor | None = None
        self.prev_b: float | Tensor = 0.0
        self.prev_k: float | Tensor = 0.0
        self.sums: dict[int, tuple[Tensor, Tensor]] = {}
        self.written: list[Tensor] = []

    def check_no_split_groups(self, new_ids: Tensor) -> None:
        """Raise if a group id of this call already appeared earlier in the optimizer step."""
        if self.seen_groups is None:
            return
        dup = new_ids[torch.isin(new_ids, self.seen_groups)]
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
        self, loss: Any, rewards: Any, groups: Any
    ) -> tuple[int, Tensor, Tensor | None]:
        if not self.tape.attached:
            raise ValueError("OPOB: this OPOB was detached")
        if not isinstance(loss, Tensor):
            raise ValueError("OPOB: per_sample_loss must be a torch.Tensor")
        if loss.dim() != 1:
            raise ValueError(f"OPOB: per_sample_loss must have shape [B], got {tuple(loss.shape)}")
        b = loss.shape[0]
        if b == 0:
            raise ValueError("OPOB: empty batch (B = 0)")
        if not loss.is_floating_point():
            raise ValueError("OPOB: per_sample_loss must be floating point")
        if not loss.requires_grad:
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
            if g.is_floating_point() or g.is_complex() or g.dtype == torch.bool:
                raise ValueError(f"OPOB: groups must be integer ids, got dtype {g.dtype}")
            g = g.to(torch.int64)
        self.tape.validate(b)
        return b, r, g

    def _validate(
        self, loss: Any, rewards: Any, groups: Any, group: Any | None
    ) -> tuple[int, Tensor, Tensor | None, list[int] | None]:
        """Local checks, then one agreement over the group (number of local scopes riding along)."""
        error: ValueError | None = None
        out: Any = None
        try:
            out = self._validate_local(loss, rewards, groups)
        except ValueError as exc:
            if group is None:
                raise
            error = exc
        payload = None
        if self._uses_stats(group) and self.cfg.scope == "group":
            n = 0 if out is None else self._local_scope_count(out[0], out[2])
            payload = [float(n)]
        rows = red.agree(error, group, "invalid input", payload)
        sizes = None if payload is None else [int(x[0]) for x in rows]
        return (*out, sizes)

    @staticmethod
    def _local_scope_count(b: int, groups: Tensor | None) -> int:
        if groups is None:
            return 1 if b else 0
        return int(torch.unique(groups).numel())

    # ------------------------------------------------------------------ scopes

    def _scopes(
        self, b: int, r: Tensor, groups: Tensor | None, group: Any | None
    ) -> tuple[Tensor, Tensor, int, Tensor, int, Tensor | None]:
        """Global rewards, scope index of every global sample, #scopes, this call's global group ids, offset."""
        r_all, offset = red.gather_varlen(r, group)
        if self.cfg.scope == "batch":
            prev = self.hist_r
            r_step = r_all if prev is None else torch.cat([prev.to(r_all.dtype), r_all])
            sid = torch.zeros(r_step.numel(), dtype=torch.long, device=r.device)
            return r_step, sid, 1, r_all, offset + (0 if prev is None else prev.numel()), None
        if groups is None:
            ids_all, _ = red.gather_varlen(
                torch.zeros(b, dtype=torch.int64, device=r.device), group
            )
            new_ids = None
        else:
            ids_all, _ = red.gather_varlen(groups, group)  # gathered as int64: exact
            new_ids = torch.unique(ids_all)
            self.check_no_split_groups(new_ids)
        uniq, sid = torch.unique(ids_all, return_inverse=True)
        return r_all, sid, uniq.numel(), r_all, offset, new_ids

    def _stats_scopes(
        self, b: int, r: Tensor, groups: Tensor | None, group: Any, sizes: list[int] | None
    ) -> _StatPlan:
        """Before the norms: local scopes; with ``norm_by_std`` and ``scope="group"`` the global 1/std."""
        dev = r.device
        if self.cfg.scope == "batch":
            return _StatPlan(torch.zeros(b, dtype=torch.long, device=dev), 1, None, [], None)
        if groups is None:
            loc_ids = torch.zeros(1 if b else 0, dtype=torch.int64, device=dev)
            sid = torch.zeros(b, dtype=torch.long, device=dev)
        else:
            loc_ids, sid = torch.unique(groups, return_inverse=True)
        assert sizes is not None  # rode along with the validation
        if sum(sizes) == 0:
            raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
        n_local = int(loc_ids.numel())
        inv = None
        if self.cfg.norm_by_std:
            st = scope_stats(None, r, sid, n_local)
            _, merged, loc2glob = red.exchange_rows(loc_ids, st, sizes, group, False, "error")
            inv = stats_inv_std(merged)[loc2glob].to(device=dev, dtype=r.dtype)
        return _StatPlan(sid, n_local, loc_ids, sizes, inv)

    def _stats_finish(
        self, sq: Tensor, r: Tensor, plan: _StatPlan, groups: Tensor | None, group: Any
    ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """After the norms: one collective of per-scope sums (with the non-finite-norm flag).

        Returns the baselines and scales of the local scopes (``[n_local]``; ``[1]`` for
        the batch scope), the global ids of the call (split-group check) and, for the
        batch scope, the step's merged stats. Raises the same error on every rank.
        """
        dev, dt = r.device, r.dtype
        bad = not bool(torch.isfinite(sq).all())
        what = "non-finite per-sample gradient norms"
        st = scope_stats(sq, r, plan.sid, plan.n_local)
        if self.cfg.scope == "batch":
            call = red.gather_batch_stats(st[0], group, bad, what)
            if call[0, 0] == 0:
                raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
            hist = self.hist_stats
            step = (
                call
                if hist is None
                else merge_stats(torch.cat([hist, call]), torch.zeros(2, dtype=torch.long), 1)
            )
            bs = stats_baselines(step)
            ks = stats_inv_std(step) if self.cfg.norm_by_std else torch.ones_like(bs)
            return bs.to(device=dev, dtype=dt), ks.to(device=dev, dtype=dt), None, step
        assert plan.loc_ids is not None
        uniq, merged, loc2glob = red.exchange_rows(plan.loc_ids, st, plan.sizes, group, bad, what)
        new_ids = None
        if groups is not None:
            new_ids = uniq.to(dev)
            self.check_no_split_groups(new_ids)
        bs = stats_baselines(merged)[loc2glob].to(device=dev, dtype=dt)
        ks = plan.inv if plan.inv is not None else torch.ones_like(bs)
        return bs, ks, new_ids, None

    # ------------------------------------------------------------------ the call

    def run(self, loss: Tensor, rewards: Any, groups: Any) -> OPOBResult:
        """One backward call (the tape is consumed; the caller clears it on error)."""
        group = self.reducer.dp_group()
        if (
            group is not None
            and isinstance(loss, Tensor)
            and loss.dim() == 1
            and loss.shape[0] == 0
        ):
            self.tape.clear()
            return self._run_empty(loss, rewards, groups, group)
        return self._run(loss, rewards, groups, group)

    def _run(self, loss: Tensor, rewards: Any, groups: Any, group: Any | None) -> OPOBResult:
        b, r, g_ids, sizes = self._validate(loss, rewards, groups, group)
        if any(p.grad is None for p in self.written):
            self.reset()  # gradients were dropped (zero_grad(set_to_none=True)): a new step
        dev = loss.device
        dt = self._dtype()
        cfg = self.cfg
        r_off = None
        if group is None and dt != torch.float64:
            # Baselines are shift-equivariant and the std shift-invariant: center the rewards (in
            # float64, per scope; one offset per optimizer step for scope="batch") so that a large
            # common offset does not cancel catastrophically in float32 (baselines, gradient sums).
            r64 = r.to(torch.float64)
            if cfg.scope == "batch":
                if self.r_off is None:
                    self.r_off = r64.mean()
                r_off = self.r_off.expand(b)
            elif g_ids is None:
                r_off = r64.mean().expand(b)
            else:
                _, idx, cnt = torch.unique(g_ids, return_inverse=True, return_counts=True)
                sums = torch.zeros(cnt.numel(), dtype=torch.float64, device=r.device)
                r_off = (sums.index_add_(0, idx, r64) / cnt)[idx]
            r = r64 - r_off
        r = r.to(dt)
        plan = None
        if self._uses_stats(group):  # per-scope sums over the group, no per-sample gather
            plan = self._stats_scopes(b, r, g_ids, group, sizes)
            sid, n_scopes, inv, new_ids = plan.sid, plan.n_local, plan.inv, None
        else:
            r_scope, sid_all, n_scopes, _, off, new_ids = self._scopes(b, r, g_ids, group)
            sid = sid_all[off : off + b]
            inv = scope_inv_std(r_scope, sid_all, n_scopes) if cfg.norm_by_std else None
        self.tape.audit(loss, self.params, self.names, self.owned, self.model)

        grads = self._autograd(loss)
        with torch.no_grad(), torch.autocast(dev.type, enabled=False):
            works = self._factors(grads, b)
            grads = None  # type: ignore[assignment]
            self.tape.clear()  # the factors hold what is still needed; free the rest now

            batch_scope = cfg.scope == "batch"
            if batch_scope:
                q_acc = torch.ones(b, dtype=dt, device=dev)
                r_acc = r
                sid_acc = torch.zeros(b, dtype=torch.long, device=dev)
                ns_acc = 1
            else:
                k = inv[sid] if inv is not None else torch.ones(b, dtype=dt, device=dev)
                q_acc, r_acc, sid_acc, ns_acc = k, k * r, sid, n_scopes
            sq = torch.zeros(b, dtype=dt, device=dev)
            parts: list[tuple[Tensor, Tensor]] = []
            for w in works.values():
                w.choose(b, ns_acc, 2 if batch_scope else 1)
                parts.append((w.param, w.sq_norms(b, r_acc, q_acc, sid_acc, ns_acc).to(dt)))
                sq += parts[-1][1]
            # Tensor parallelism completes n_i here (vcpo_optim.opob.distributed).
            sq = self.reducer.complete_norms(parts, sq, group, self._uses_stats(group))
            step_stats = None
            if plan is not None:
                bs, ks, new_ids, step_stats = self._stats_finish(sq, r, plan, g_ids, group)
            else:
                if not bool(torch.isfinite(sq).all()):
                    raise ValueError(
                        "OPOB: per-sample gradient norms are not finite (overflow in the backward pass?)"
                    )
                n_all, _ = red.gather_varlen(sq, group)
                if batch_scope:
                    n_scope = n_all if self.hist_n is None else torch.cat([self.hist_n, n_all])
                else:
                    n_scope = n_all
                bs = scope_baselines(n_scope, r_scope, sid_all, n_scopes, cfg.agg, cfg.winsor_q)
                ks = inv if inv is not None else torch.ones(n_scopes, dtype=dt, device=dev)
            base = bs[sid]
            coef = (r - base) * ks[sid]
            if r_off is not None:
                base = (base.to(torch.float64) + r_off).to(dt)

            # ---- write the reweighted gradient (only place .grad is touched) ----
            write = self.reducer.write_grad
            if batch_scope:
                bb, kk = bs[0], ks[0]
                pb, pk = self.prev_b, self.prev_k
                for w in works.values():
                    if w.strategy == "acc":
                        assert w.acc_r is not None and w.acc_s is not None
                        d1, d0 = w.acc_r, w.acc_s[0]
                    else:
                        d1, d0 = w.weighted_sum(r), w.weighted_sum(q_acc)
                    s1, s0 = self.sums.get(id(w.param), (None, None))
                    delta = kk * (d1 - bb * d0)
                    if s1 is not None and s0 is not None:
                        delta += (kk - pk) * s1 - (kk * bb - pk * pb) * s0
                        s1 += d1
                        s0 += d0
                    else:
                        self.sums[id(w.param)] = (d1.clone(), d0.clone())
                    write(w.param, delta)
                    w.release()
                for pid, (s1, s0) in self.sums.items():
                    if pid not in works:  # used in an earlier call only: its baseline moved
                        write(self.params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0)
                self.prev_b, self.prev_k = bb, kk
                if plan is not None:
                    self.hist_stats = step_stats
                else:
                    self.hist_n, self.hist_r = n_scope, r_scope
            else:
                for w in works.values():
                    if w.strategy == "acc":
                        assert w.acc_r is not None and w.acc_s is not None
                        contrib = w.acc_r - torch.tensordot(bs.to(w.acc_s.dtype), w.acc_s, dims=1)
                    else:
                        contrib = w.weighted_sum(coef)
                    write(w.param, contrib)
                    w.release()
                if new_ids is not None:
                    seen = self.seen_groups
                    self.seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
            self.written = [w.param for w in works.values()] + [
                self.params[i] for i in self.sums if i not in works
            ]
        return OPOBResult(sq_norms=sq, baselines=base, coefficients=coef)

    def _autograd(self, loss: Tensor) -> tuple[Tensor | None, ...]:
        """The single autograd pass: gradients of ``sum_i l_i`` at every recorded module output."""
        params = list(self.params.values())
        before = [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]
        self.tape.paused = True
        try:
            edges = [e for u in self.tape for e in u.edges]
            grads = torch.autograd.grad(loss.sum(), edges, allow_unused=True)
        except RuntimeError as e:
            if "heckpoint" in str(e):
                raise ValueError(
                    "OPOB: reentrant activation checkpointing cannot be combined with OPOB's single "
                    "backward pass; use torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
                ) from e
            raise
        finally:
            self.tape.paused = False
        touched = [
            self.names[id(p)]
            for p, v in zip(params, before)
            if (None if p.grad is None else (id(p.grad), p.grad._version)) != v
        ]
        if touched:
            raise ValueError(
                f"OPOB: parameters {touched[:10]} received plain gradients during OPOB's backward pass "
                "(reentrant activation checkpointing or a custom autograd Function that calls "
                "backward itself): their per-sample gradients are invisible to OPOB. Use "
                "torch.utils.checkpoint.checkpoint(..., use_reentrant=False)."
            )
        return grads

    def _factors(self, grads: tuple[Tensor | None, ...], b: int) -> dict[int, ParamWork]:
        """Per-parameter factors of every record (a rule, or the vmap fallback)."""
        works: dict[int, ParamWork] = {}
        pos = 0
        for u in self.tape:
            gs = list(grads[pos : pos + len(u.edges)])
            pos += len(u.edges)
            gs = [None if gr is None else gr.reshape(s) for gr, s in zip(gs, u.out_shapes)]
            if all(gr is None for gr in gs):
                continue
            facs: dict[str, Factor]
            if u.rule:
                (go,) = gs
                assert go is not None
                rule = get_rule(u.module)
                assert rule is not None
                facs = rule(u.module, u.args, go)
            else:
                self.tape.paused = True
                try:
                    facs = fallback_factors(
                        u.module, u.args, u.kwargs, gs, u.out_index, b, recurse=u.recurse
                    )
                except RuntimeError as e:
                    raise ValueError(
                        f"OPOB: the exact torch.func (vmap) fallback failed for module '{u.name}' "
                        f"({type(u.module).__name__}): {e}. Register a per-sample rule for this "
                        "module type (vcpo_optim.opob.register_rule) or freeze its parameters; "
                        "nothing was changed."
                    ) from e
                finally:
                    self.tape.paused = False
            for pname, fac in facs.items():
                p = u.module.get_parameter(pname)
                w = works.get(id(p))
                if w is None:
                    w = works[id(p)] = ParamWork(p, self.names.get(id(p), pname))
                w.factors.append(fac)
        return works

    # ------------------------------------------------------------------ empty rank

    def _run_empty(self, loss: Tensor, rewards: Any, groups: Any, group: Any) -> OPOBResult:
        """This rank's part of a backward call in which it has no samples.

        Mirrors the collectives of :meth:`_run` and its per-step state, with
        ``B = 0``: validation (with the number of local groups), then per-scope
        statistics (``agg="mean"``) or the per-sample rewards, group ids and
        norms (median, winsorized mean).
        """
        error = None
        try:
            r = _as_empty(rewards, loss.device, "rewards")
            g = None
            if groups is not None and self.cfg.scope == "group":
                g = _as_empty(groups, loss.device, "groups").to(torch.int64)
        except ValueError as exc:
            error = exc
        ride = self._uses_stats(group) and self.cfg.scope == "group"
        payload = [0.0] if ride else None
        rows = red.agree(error, group, "invalid input", payload)
        sizes = [int(x[0]) for x in rows] if ride else None
        if any(p.grad is None for p in self.written):
            self.reset()
        dev = loss.device
        dt = self._dtype()
        r = r.to(dt)
        if self._uses_stats(group):
            return self._run_empty_stats(r, g, group, sizes)
        r_scope, sid_all, n_scopes, r_call, _, new_ids = self._scopes(0, r, g, group)
        if r_call.numel() == 0:
            raise ValueError("OPOB: empty batch: no rank has a sample in this backward call")
        inv = scope_inv_std(r_scope, sid_all, n_scopes) if self.cfg.norm_by_std else None
        sq = self.reducer.complete_norms([], torch.zeros(0, dtype=dt, device=dev), group, False)
        n_all, _ = red.gather_varlen(sq, group)
        batch_scope = self.cfg.scope == "batch"
        if batch_scope and self.hist_n is not None:
            n_scope = torch.cat([self.hist_n, n_all])
        else:
            n_scope = n_all
        bs = scope_baselines(n_scope, r_scope, sid_all, n_scopes, self.cfg.agg, self.cfg.winsor_q)
        ks = inv if inv is not None else torch.ones(n_scopes, dtype=dt, device=dev)
        with torch.no_grad():
            if batch_scope:
                bb, kk = bs[0], ks[0]
                pb, pk = self.prev_b, self.prev_k
                for pid, (s1, s0) in self.sums.items():  # earlier calls: their baseline moved
                    self.reducer.write_grad(
                        self.params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0
                    )
                self.prev_b, self.prev_k = bb, kk
                self.hist_n, self.hist_r = n_scope, r_scope
            elif new_ids is not None:
                seen = self.seen_groups
                self.seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
        self.written = [self.params[i] for i in self.sums]
        empty = torch.zeros(0, dtype=dt, device=dev)
        return OPOBResult(sq_norms=empty, baselines=empty.clone(), coefficients=empty.clone())

    def _run_empty_stats(
        self, r: Tensor, g: Tensor | None, group: Any, sizes: list[int] | None
    ) -> OPOBResult:
        """:meth:`_run_empty` on the sufficient-statistics path (``agg="mean"``)."""
        plan = self._stats_scopes(0, r, g, group, sizes)
        sq = self.reducer.complete_norms(
            [], torch.zeros(0, dtype=r.dtype, device=r.device), group, True
        )
        bs, ks, new_ids, step_stats = self._stats_finish(sq, r, plan, g, group)
        with torch.no_grad():
            if self.cfg.scope == "batch":
                bb, kk = bs[0], ks[0]
                pb, pk = self.prev_b, self.prev_k
                for pid, (s1, s0) in self.sums.items():  # earlier calls: their baseline moved
                    self.reducer.write_grad(
                        self.params[pid], (kk - pk) * s1 - (kk * bb - pk * pb) * s0
                    )
                self.prev_b, self.prev_k = bb, kk
                self.hist_stats = step_stats
            elif new_ids is not None:
                seen = self.seen_groups
                self.seen_groups = new_ids if seen is None else torch.cat([seen, new_ids])
        self.written = [self.params[i] for i in self.sums]
        empty = r.new_zeros(0)
        return OPOBResult(sq_norms=empty, baselines=empty.clone(), coefficients=empty.clone())
