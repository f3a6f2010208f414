"""``OPOB``: per-sample gradient norms in one batched backward, the off-policy
optimal baseline, and the reweighted gradient.

This module is the public object: constructor checks and the coverage scan,
attaching and detaching the hooks, the orchestration of a backward call, and
the optimizer-step boundary. The pieces it wires together:

* :mod:`vcpo_optim.opob.tape`: what each hooked module saw in the forward;
* :mod:`vcpo_optim.opob.step`: one backward call (norms, baselines,
  coefficients, ``.grad``) and the per-optimizer-step state;
* :mod:`vcpo_optim.opob.distributed`: the reductions across ranks.

See :class:`OPOB` for the math and the contract.
"""

from __future__ import annotations

import math
import numbers
import warnings
import weakref
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.parametrize import ParametrizationList
from torch.optim.optimizer import register_optimizer_step_post_hook

from .. import distributed as _dist
from . import distributed as red
from . import recompute
from .baseline import AGGS
from .rules import FALLBACK_UNITS, RULES, get_rule, register_rule, uncovered_message
from .step import Config, OPOBResult, Step
from .tape import BATCHNORM_TYPES, Tape
from .tape import owner as tape_owner

__all__ = ["OPOB", "OPOBResult"]


def _alias_fsdp_rules(model: nn.Module) -> None:
    """``fully_shard`` swaps a module's class for a dynamic ``FSDP<Cls>(FSDPModule, Cls)``.

    Rules are looked up by exact type, so register the original class's rule
    for the dynamic class too.
    """
    for m in red.fsdp_modules(model):
        cls = type(m)
        if get_rule(m) is not None:
            continue
        for base in cls.__mro__[1:]:
            rule = RULES.get(base)
            if rule is not None:
                register_rule(cls)(rule)
                break


class OPOB:
    r"""Off-policy optimal baseline with per-sample gradient norms from one batched backward.

    Attach to a model, run the forward pass in training mode, then call
    :meth:`backward` with the per-sample loss instead of ``loss.backward()``::

        opob = OPOB(model, scope="group")
        per_sample_loss = grpo_surrogate(model(ids), ...)      # [B], entry i depends on sample i only
        res = opob.backward(per_sample_loss, rewards, groups)  # writes .grad
        optimizer.step(); optimizer.zero_grad()

    For the per-sample loss ``l`` (shape ``[B]``) and trainable parameters
    ``theta`` it computes ``n_i = ||grad_theta l_i||^2``, per scope ``s``

        ``b_s = sum_{i in s} n_i R_i / sum_{i in s} n_i``   (``agg="mean"``; plain mean if all n_i = 0)

    and accumulates ``sum_i c_i grad_theta l_i`` into ``.grad`` (added to any
    gradient already there, like autograd), with ``c_i = (R_i - b_s(i)) * k_i``,
    ``k_i = 1`` or, with ``norm_by_std``, ``1 / std_s(R)`` (population std; a
    scope whose rewards are all equal gets ``c_i = 0``). The result equals a
    loop with one backward per sample to floating-point tolerance. Cost: one
    backward that skips autograd's weight-gradient matmuls, plus per-layer norm
    work (ghost Gram matrices or direct per-sample gradients, chosen per
    parameter by operation count), plus writing the weighted gradient.

    Args:
        model: any ``nn.Module``. Modules that own trainable parameters are
            hooked (registered rules: ``nn.Linear``, ``nn.Embedding``,
            ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.Conv1d``,
            ``nn.Conv2d``; add more with :func:`vcpo_optim.opob.register_rule`;
            ``nn.MultiheadAttention`` (``batch_first=True``) is covered as a
            unit by the exact vmap fallback, which is slower).
            Dimension 0 of every hooked module's input must be the sample,
            or, for a packed batch (``backward(..., cu_seqlens=...)``), every
            hooked module sees the packed tokens and is token-local.
        scope: ``"group"`` (default): one baseline per prompt group given by
            ``groups``; a group must be complete within one :meth:`backward`
            call (seen again later in the same optimizer step -> ``ValueError``).
            ``groups=None`` makes the whole call one group. ``"batch"``: one
            baseline over every sample of the optimizer step, across all
            :meth:`backward` calls (gradient accumulation) and ranks.
        agg: ``"mean"`` (default), ``"median"`` (lower weighted median) or
            ``"winsorized_mean"``; all weighted by ``n_i``.
        norm_by_std: default ``False``. Divide by the scope's reward std (GRPO).
        strict: default ``True``: a ``ValueError`` at construction lists the
            trainable parameters no rule covers. ``False``: those modules use an
            exact ``torch.func.vmap`` fallback (materialises per-sample
            gradients; for small modules).
        process_group: default ``None``: the world group if
            ``torch.distributed`` is initialised, else no communication. Every
            rank uses the global baseline: with ``agg="mean"`` the ranks
            exchange per-scope sufficient statistics (count, moments, min and
            max of ``R``, ``sum n``, ``sum n R``: a fixed-size row for
            ``scope="batch"``, one row per prompt group for ``"group"``),
            never per-sample values. ``"median"`` and ``"winsorized_mean"``
            need the per-sample values, so there the rewards, norms and group
            ids (three numbers per sample) are gathered over the group.
        winsor_q: default ``0.1``; the quantile for ``agg="winsorized_mean"``.
        tensor_parallel_group: the TP group over which parameters are sharded
            (e.g. ``mesh["tp"].get_group()``). Default ``None``: taken from the
            mesh of the first TP-sharded ``DTensor`` parameter, if any. With
            tensor parallelism ``process_group`` is required (the
            data-parallel group, e.g. ``mesh["dp"].get_group()``, of size 1
            without data parallelism).
        grad_reduction: ``"sum"`` (default; ``.grad`` is ``sum_i c_i grad l_i``
            over the global batch, equal to single-process OPOB on the
            concatenated batch) or ``"mean"`` (divided by the data-parallel
            group size: DDP's convention, right when each rank's ``l_i``
            carries ``1/B_local`` with equal local batch sizes).
        max_sample_grad_norm: default ``None`` (no clipping). A number ``C > 0``
            bounds each trajectory's contribution to ``.grad``: the coefficient
            becomes ``f_i c_i`` with ``f_i = min(1, C / (|c_i| sqrt(n_i)))``, so
            that ``||f_i c_i grad l_i|| <= C`` (``c_i`` after the baseline and the
            std scale; ``n_i`` the true squared norm, not multiplied by
            ``norm_weights``). No extra backward: the norms are already there.
            The baseline is computed from the unclipped ``n_i`` first (see
            below). With ``scope="batch"`` the optimizer step must be one
            :meth:`backward` call (a second call in the step raises).
        checkpointing: activation checkpointing
            (``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``,
            ``model.gradient_checkpointing_enable()`` in ``transformers``).
            ``"auto"`` (default): modules called inside a checkpoint region are
            recorded without their input, which is captured while the backward
            recomputes the region; a call with such modules runs two passes
            (the norms while recomputing, then, once the coefficients are known,
            the same backward again writing ``sum_i c_i grad l_i`` from the
            factors), so its peak memory stays near that of plain checkpointed
            training, at the cost of one more backward and recomputation.
            Exact like the single pass. Regions that cannot be recomputed twice
            identically (a ``context_fn`` such as selective activation
            checkpointing, or ``preserve_rng_state=False``) are held (one pass;
            a warning). Where this torch's checkpoint internals are not
            recognised (checked once per process), and under FSDP2 or tensor
            parallelism, the inputs are held too (exact; a warning says the
            memory is not saved). ``False``: always hold the inputs (one pass,
            faster, no memory saving). ``True``: like ``"auto"``, but a
            ``ValueError`` at construction where the inputs would be held.
        check_first_call: default ``True``: the first call with ``B >= 2`` (per
            rank; every rank under FSDP2 / tensor parallelism; not with
            selective checkpointing) runs one more autograd pass, with the
            parameters' gradients (two more, keeping only random projections of
            the output gradients, when checkpointed regions are recomputed), and
            refuses a ``per_sample_loss`` that is not per-sample (entry ``i``
            depending on other rows, or on other segments of a packed row: the
            gradient of ``sum_i v_i l_i`` at every recorded output must be ``v_i``
            times that of ``sum_i l_i``, for random powers of two ``v_i``) and
            per-sample gradients that do not add up to autograd's gradient of
            ``sum_i l_i`` (a gradient hook on a module output; not under FSDP2 /
            TP, whose autograd gradients are of unsharded copies / shards). Under a process
            group every rank raises the same error when one rank fails. About 2x
            that call's time and one extra gradient's memory, once (until a call
            passes it conclusively). ``False``: skip it.

    Per-trajectory clipping (``max_sample_grad_norm``) is Opacus-style
    clipping of the summands actually written: each ``x_i = c_i grad l_i``
    with its final coefficient, after the baseline. The baseline is the
    variance-optimal one of the *unclipped* estimator ``sum_i c_i grad l_i``,
    from the unclipped ``n_i``; the clip then acts on the (baselined)
    contributions, so it bounds the influence of one trajectory
    (``||x_i|| <= C``), which truncating its importance weight does not (a
    long trajectory or a large ``|R_i - b|`` still scales its gradient). A
    baseline of the clipped estimator would be circular: the clip factors
    depend on the baseline, and ``sum_i f_i(b) (R_i - b) grad l_i`` has no
    closed-form variance minimiser. ``OPOBResult.clip_factors`` holds ``f_i``,
    ``num_clipped`` the number of clipped samples of the call (all ranks).

    Gradient noise scale (``OPOBResult.noise_scale``, always computed). With
    the per-sample contributions ``x_i = c_i grad l_i`` (final, clipped
    coefficients) of the ``B`` samples of the optimizer step so far (all
    calls of the step, all ranks), ``S = sum_i |x_i|^2 = sum_i c_i^2 n_i`` and
    ``P = |sum_i x_i|^2`` (the squared norm of the gradient OPOB wrote in the
    step, over all trainable parameters: data-parallel replicas counted once,
    tensor-parallel and FSDP2 shards summed; with ``grad_reduction="mean"``
    rescaled to the sum), the unbiased estimates for ``G = E[x_i]`` and the
    per-sample covariance ``Sigma`` (McCandlish et al. 2018, appendix A, with
    the two batch sizes 1 and ``B``) are

        ``noise_grad_sq = |G|^2 est = (P - S) / (B (B - 1))``
        (``= sum_{i != j} <x_i, x_j> / (B (B - 1))``),
        ``noise_trace = tr(Sigma) est = (B S - P) / (B (B - 1))``,
        ``noise_scale = B_simple = tr(Sigma) / |G|^2 = (B S - P) / (P - S)``.

    The ratio of the two unbiased estimates is not itself unbiased and is
    noisy (negative when ``P < S``): average ``noise_trace`` and
    ``noise_grad_sq`` over steps and take the ratio of the averages. It treats
    the ``x_i`` as independent draws (the baseline couples them slightly).
    Per step, not per call: with several calls in a step (gradient
    accumulation) each result holds the estimate over the step so far, the
    last call's is the step's; with ``scope="batch"`` the earlier calls'
    contributions are counted with the step's current baseline (as written
    in ``.grad``). NaN when ``B < 2``, or when ``.grad`` held a non-zero
    gradient when the step's first call began, or (``scope="group"``) a
    gradient OPOB wrote was changed in place between two calls of the step:
    ``P`` is read from ``.grad``, which then holds more than OPOB's
    gradient. Cost: ``S`` and ``B`` ride in the gradient reduction (no extra
    collective with DDP); ``P`` is one pass over the gradients (one small
    all-reduce for FSDP2 / tensor-parallel shards); no host sync of its own
    (with FSDP2 alone the sums are read on the host with the error flags,
    which that path already reads there).

    Data and tensor parallelism: OPOB writes ``.grad`` outside autograd, so
    DDP's and FSDP2's gradient hooks never see it; OPOB reduces its own
    gradients (see :mod:`vcpo_optim.opob.distributed`). Attach it to the model
    *inside* the parallel wrapper (``ddp.module``; the ``fully_shard`` model
    itself; the parallelized TP model), after wrapping::

        model = DDP(policy)                        # optional: OPOB does the all-reduce
        opob = OPOB(policy, scope="group")
        with model.no_sync():                      # DDP's own reducer has nothing to do
            l = per_sample_loss(model(batch))      # [B_local]
            opob.backward(l, rewards, groups)      # .grad = global sum_i c_i grad l_i
        optimizer.step()

    Every rank calls :meth:`backward` the same number of times per optimizer
    step; a rank with no samples in a call passes an empty ``per_sample_loss``
    (shape ``[0]``) and empty ``rewards``. Without a process group (single
    process, or a group of one rank) nothing is buffered and no collective is
    issued. ``vcpo_optim.opob.DistributedOPOB`` is this class (an alias kept for
    code written against the former subclass).

    Recording happens only for modules in training mode with grad enabled.
    Every recorded forward must be consumed by :meth:`backward` (or dropped
    with :meth:`clear`); after :meth:`backward` no activation is held.
    The optimizer step boundary (for ``scope="batch"`` accumulation and the
    split-group check) is detected with a global optimizer step hook for any
    ``torch.optim.Optimizer`` holding these parameters, or by the gradients
    OPOB wrote having been set to ``None``, replaced, or zeroed in place (their
    identity and version counters); call :meth:`finalize` to end a step by
    hand. With ``scope="batch"`` a gradient changed in place between two calls
    to anything else (clipping, an auxiliary backward mid-step) is refused.
    A module is recorded by one OPOB at a time (a second OPOB on it replaces
    the first, with a warning); an OPOB dropped without :meth:`detach` removes
    its hooks when collected; a ``copy.deepcopy`` of the model is not
    recorded. OPOB's forward hook sees each module's own output whatever the
    order of other (module or global) forward hooks. ``.grad`` is complete after every call, so
    gradient clipping, ``GradScaler.unscale_`` and DDP-free loops need nothing
    else.

    Refused with a ``ValueError``: reentrant activation checkpointing
    (``use_reentrant=True``: its backward runs inside OPOB's and writes plain
    gradients; with ``transformers`` pass
    ``gradient_checkpointing_kwargs={"use_reentrant": False}``),
    BatchNorm in training mode (mixes samples),
    hooked modules whose input dim 0 is not ``B`` (broadcast inputs such as
    position ids of shape ``[1, T]``: expand them to ``[B, T]``; a packed row
    ``[1, N]`` passes ``cu_seqlens``), in a packed call modules that are not
    token-local or do not see the packed tokens, and padding that reaches the
    loss, a tracked
    parameter used outside the forward of a module that owns it (for example
    ``F.linear(h, emb.weight)``: use an ``nn.Linear`` sharing the Parameter),
    ``nn.Embedding(scale_grad_by_freq=True)``, hooked modules with
    ``batch_first=False``, parametrized weights (``weight_norm``,
    ``torch.nn.utils.parametrize``), trainable parameters that reach the loss but
    were not trainable parameters of ``model`` when OPOB was attached (they
    would get no gradient), an input of a hooked module modified in place
    after the forward, and randomness (dropout) inside a module handled by the
    vmap fallback.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        scope: str = "group",
        agg: str = "mean",
        norm_by_std: bool = False,
        strict: bool = True,
        process_group: Any = None,
        winsor_q: float = 0.1,
        tensor_parallel_group: Any = None,
        grad_reduction: str = "sum",
        max_sample_grad_norm: float | None = None,
        checkpointing: bool | str = "auto",
        check_first_call: bool = True,
    ) -> None:
        if scope not in ("group", "batch"):
            raise ValueError(f"OPOB: scope must be 'group' or 'batch', got {scope!r}")
        if not isinstance(check_first_call, bool):
            raise ValueError(f"OPOB: check_first_call must be a bool, got {check_first_call!r}")
        if agg not in AGGS:
            raise ValueError(f"OPOB: agg must be one of {AGGS}, got {agg!r}")
        if not 0.0 <= winsor_q < 0.5:
            raise ValueError(f"OPOB: winsor_q must be in [0, 0.5), got {winsor_q}")
        if grad_reduction not in ("sum", "mean"):
            raise ValueError(
                f"OPOB: grad_reduction must be 'sum' or 'mean', got {grad_reduction!r}"
            )
        if max_sample_grad_norm is not None:
            c = max_sample_grad_norm
            if (
                isinstance(c, bool)
                or not isinstance(c, numbers.Real)
                or not math.isfinite(c)
                or c <= 0
            ):
                raise ValueError(
                    "OPOB: max_sample_grad_norm must be a finite number > 0 (or None for no "
                    f"clipping), got {c!r}"
                )
            max_sample_grad_norm = float(c)
        self.max_sample_grad_norm = max_sample_grad_norm
        if not (isinstance(checkpointing, bool) or checkpointing == "auto"):
            raise ValueError(
                f"OPOB: checkpointing must be 'auto', True or False, got {checkpointing!r}"
            )
        self.model = model
        self.scope = scope
        self.agg = agg
        self.norm_by_std = bool(norm_by_std)
        self.strict = bool(strict)
        self.winsor_q = float(winsor_q)
        self.grad_reduction = grad_reduction
        self._attached = False

        bn = [n for n, m in model.named_modules() if isinstance(m, BATCHNORM_TYPES) and m.training]
        if bn:
            raise ValueError(
                f"OPOB: BatchNorm modules in training mode mix samples (batch statistics), so per-sample "
                f"gradients are undefined: {bn}. Replace them with GroupNorm/LayerNorm, or put them in "
                "eval mode with frozen parameters."
            )

        _alias_fsdp_rules(model)
        self._names: dict[int, str] = {}
        self._params: dict[int, Tensor] = {}
        for n, p in model.named_parameters():
            if p.requires_grad:
                self._names[id(p)] = n
                self._params[id(p)] = p
        self._owned: dict[int, set[int]] = {}
        rule_mods: list[tuple[str, nn.Module]] = []
        fb_mods: list[tuple[str, nn.Module]] = []
        unit_mods: list[tuple[str, nn.Module]] = []
        inside_unit: set[int] = set()
        uncovered: list[tuple[str, nn.Module, list[str]]] = []
        for mname, mod in model.named_modules():
            if id(mod) in inside_unit:
                continue
            if type(mod) in FALLBACK_UNITS:  # the whole subtree by the exact vmap fallback
                inside_unit.update(id(m) for m in mod.modules())
                sub = [p for p in mod.parameters() if p.requires_grad]
                if sub:
                    self._owned[id(mod)] = {id(p) for p in sub}
                    unit_mods.append((mname, mod))
                continue
            own = [(n, p) for n, p in mod.named_parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            self._owned[id(mod)] = {id(p) for _, p in own}
            if get_rule(mod) is not None:
                rule_mods.append((mname, mod))
            else:
                uncovered.append((mname, mod, [n for n, _ in own]))
                fb_mods.append((mname, mod))
        if uncovered and self.strict:
            raise ValueError(uncovered_message(uncovered))

        computed = [
            mname or type(mod).__name__
            for mname, mod in rule_mods + fb_mods
            if isinstance(mod, ParametrizationList)
            or any(
                isinstance(getattr(mod, a, None), Tensor)
                and not isinstance(getattr(mod, a), nn.Parameter)
                for a in ("weight", "bias")
            )
        ]
        if computed:
            raise ValueError(
                f"OPOB: modules {computed} compute their weight from other parameters "
                "(torch.nn.utils.parametrize, weight_norm, spectral_norm): per-sample gradients of "
                "the underlying parameters are not supported (the parametrization runs outside the "
                "sample dimension). Remove the parametrization or freeze its parameters."
            )
        seq_first = [
            mname or type(mod).__name__
            for mname, mod in rule_mods + fb_mods + unit_mods
            if getattr(mod, "batch_first", None) is False
        ]
        if seq_first:
            raise ValueError(
                f"OPOB: modules {seq_first} have batch_first=False: dimension 0 of their input is the "
                "sequence, not the sample, so their per-sample gradients cannot be recovered (and "
                "would be silently wrong when the sequence length equals B). Construct them with "
                "batch_first=True."
            )

        # ---- data / tensor parallel layout (vcpo_optim.opob.distributed) ----
        fsdp = bool(red.fsdp_modules(model))
        if fsdp:
            red.check_fsdp_layout(self._params.values())
        # Order of the gradient bucket: named_parameters order, identical on every rank.
        order = list(self._params.values())
        tp_group = tensor_parallel_group
        if not fsdp and tp_group is None:
            for p in order:
                if red.is_dtensor(p):
                    tp_group = p.device_mesh.get_group()
                    break
        if (
            process_group is None
            and tp_group is not None
            and _dist.get_world_size(_dist.resolve_group(tp_group, default_world=False)) > 1
        ):
            raise ValueError(
                "OPOB: the model is tensor parallel; pass process_group=<the data-parallel group> "
                "(e.g. mesh['dp'].get_group(), of size 1 without data parallelism): the default, "
                "the world group, would also sum the gradients of different TP shards"
            )
        self._reducer = red.GradReducer(process_group, tp_group, grad_reduction, fsdp, order)
        self.checkpointing = checkpointing
        defer, hold_reason = self._checkpoint_mode(checkpointing, fsdp or tp_group is not None)

        # ---- attach (nothing above changed any state) ----
        hooked = rule_mods + fb_mods + unit_mods
        previous = {t for _, m in hooked if (t := tape_owner(m)) is not None}
        for old in previous:  # two OPOBs on one module would both write its gradient
            warnings.warn(
                f"OPOB: {old.describe()} already recorded modules of this model; it is detached "
                "and replaced by the new OPOB (its backward() now raises). Create one OPOB per "
                "model and reuse it, or call opob.detach() before attaching another.",
                UserWarning,
                stacklevel=2,
            )
            old.detach(replaced=True)
        self._tape = tape = Tape(f"the OPOB created for {type(model).__name__} at {id(self):#x}")
        tape.defer, tape.hold_reason = defer, hold_reason
        self._step = Step(
            Config(
                self.scope,
                self.agg,
                self.norm_by_std,
                self.winsor_q,
                self.max_sample_grad_norm,
                self.strict,
            ),
            tape,
            self._reducer,
            self._params,
            self._names,
            self._owned,
            model,
        )
        self._step.separable_checked = not check_first_call
        for mname, mod in rule_mods:
            tape.attach(mname, mod, True)
        for mname, mod in fb_mods:
            tape.attach(mname, mod, False)
        for mname, mod in unit_mods:
            tape.attach(mname, mod, False, recurse=True)
        for mname, mod in model.named_modules():
            if isinstance(mod, BATCHNORM_TYPES):
                tape.attach_bn_check(mname, mod)
        # The optimizer step hook and the finalizer hold no strong reference to this object:
        # an OPOB that is dropped without detach() removes its hooks when it is collected.
        ref = weakref.ref(self)

        def on_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            me = ref()
            if me is not None:
                me._on_optimizer_step(optimizer, args, kwargs)

        tape.handles.append(register_optimizer_step_post_hook(on_step))  # removed with the tape
        self._finalizer = weakref.finalize(self, tape.detach)
        self._attached = True

    @staticmethod
    def _checkpoint_mode(checkpointing: bool | str, sharded: bool) -> tuple[bool, str]:
        """Whether checkpointed modules' inputs are deferred, and else why (the warning)."""
        if checkpointing is False:
            return False, ""
        if sharded:
            why = (
                "OPOB: under FSDP2 or tensor parallelism the inputs of checkpointed modules are "
                "held until the backward (exact, but activation checkpointing saves no memory "
                "under OPOB)"
            )
        elif not recompute.supported():
            why = (
                f"OPOB: this torch ({torch.__version__}) does not checkpoint the way OPOB "
                "recognises (torch.utils.checkpoint internals), so the inputs of checkpointed "
                "modules are held until the backward (exact, but activation checkpointing saves "
                "no memory under OPOB)"
            )
        else:
            return True, ""
        if checkpointing is True:
            raise ValueError(
                why.replace("held until", "would be held until")
                + "; pass checkpointing='auto' or False"
            )
        return False, why + "; pass checkpointing=False to silence this warning."

    # ------------------------------------------------------------------ lifecycle

    def detach(self) -> None:
        """Remove every hook and drop all recorded and per-step state (idempotent)."""
        if self._attached:
            self._tape.detach()
            self._step.reset()
        self._attached = False

    def __enter__(self) -> OPOB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def clear(self) -> None:
        """Drop activations recorded since the last :meth:`backward` (a forward you will not backprop)."""
        self._tape.clear()

    def finalize(self) -> None:
        """End the current optimizer step.

        ``.grad`` is already complete after every :meth:`backward`; this only
        resets the per-step state (the ``scope="batch"`` accumulators and the
        groups seen by the split-group check). Called automatically after
        ``optimizer.step()`` of any ``torch.optim.Optimizer`` holding these
        parameters, and when those parameters' ``.grad`` were set to ``None``.
        """
        self._step.reset()

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if not self._tape.attached:
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                if id(p) in self._params:
                    self._step.reset()
                    return

    @property
    def num_recorded(self) -> int:
        """Number of module calls recorded since the last :meth:`backward` (0 after it)."""
        return len(self._tape)

    # ------------------------------------------------------------------ backward

    def backward(
        self,
        per_sample_loss: Tensor,
        rewards: Any,
        groups: Any = None,
        *,
        norm_weights: Any = None,
        cu_seqlens: Any = None,
    ) -> OPOBResult:
        """One batched backward: per-sample norms, baselines, and ``sum_i c_i grad l_i`` into ``.grad``.

        Args:
            per_sample_loss: ``[B]`` floating tensor with a graph; entry ``i``
                depends only on sample ``i``. Its gradient is never formed
                with unit weights: only ``sum_i c_i grad l_i`` is written.
                Under a process group, a rank with no samples in this call
                passes an empty ``per_sample_loss`` (shape ``[0]``; a forward
                pass on the empty batch is optional) and empty ``rewards``: it
                takes part in every collective and receives the global gradient.
            rewards: ``[B]`` rewards ``R_i`` (tensor on the loss's device, or
                a sequence of numbers).
            groups: ``[B]`` integer prompt-group ids for ``scope="group"``
                (ignored for ``"batch"``); default ``None``: the whole call
                is one group.
            norm_weights: ``[B]`` multipliers ``m_i >= 0`` of ``n_i`` in the
                baseline only: ``b_s = sum m_i n_i R_i / sum m_i n_i`` (and the
                median / winsorized weights), computed in float64. Default
                ``None`` (``m_i = 1``: the variance-optimal baseline). The
                gradient, the clipping and the noise scale use the true ``n_i``.
                Under a process group they enter the same global statistics;
                pass them on every rank with samples (and, with
                ``scope="batch"``, in every call of the step, or in none).
                :func:`vcpo_optim.opob.reference_norm_weights` gives the ``m_i``
                that reproduce the research code's baseline.
            cu_seqlens: a packed (padding-free) batch: ``[B + 1]`` integer
                cumulative sequence lengths over the packed token dimension
                (flash-attention varlen / verl convention: ``cu[0] = 0``,
                non-decreasing, ``cu[B] <= N``). Sample ``i`` is the segment of
                tokens ``cu[i] <= t < cu[i + 1]`` (length 0 allowed); the hooked
                modules saw ``[1, N, ...]`` or ``[N, ...]`` inputs; tokens after
                ``cu[B]`` (padding) belong to no sample and must not reach the
                loss. Every hooked module must be token-local (see
                :mod:`vcpo_optim.opob.packing`). Default ``None``: dimension 0
                of every hooked module's input is the sample.

        Returns:
            :class:`OPOBResult` with ``sq_norms``, ``baselines``,
            ``coefficients`` (each ``[B]``, float32 or float64), the clip
            factors, and the noise-scale estimates.

        Raises:
            ValueError: non-finite losses or rewards, ``B = 0``, shape or
                device mismatch, bad ``groups``, a group already seen in this
                optimizer step, a recorded module input whose dim 0 is not
                ``B``, parameters used outside their module, non-finite
                per-sample norms, ``norm_weights`` that are not finite,
                non-negative and ``[B]``, a malformed ``cu_seqlens``, a packed
                call with a module that is not token-local, whose records do not
                hold the packed tokens, or whose padding reaches the loss, or a second call in a step with
                ``scope="batch"`` and ``max_sample_grad_norm``, gradient hooks on trainable
                parameters, or (checked on the first call, except with selective checkpointing, with
                one more autograd pass) a loss whose entry ``i`` depends on other rows or
                segments than ``i`` (reordered, mixed, packed segments attending to each other). Raised before any ``.grad`` or OPOB state
                changes; the recorded activations are dropped. Under a process
                group every rank raises the same error.
        """
        reducer = self._reducer
        try:
            if not reducer.fsdp and reducer.tp_group is None:
                self._check_still_plain()
                if reducer.dp_group() is None:  # nothing to reduce: write .grad directly
                    return self._step.run(
                        per_sample_loss, rewards, groups, norm_weights, cu_seqlens
                    )
            return self._backward_reduced(
                per_sample_loss, rewards, groups, norm_weights, cu_seqlens
            )
        finally:
            self._tape.clear()

    def _backward_reduced(
        self,
        loss: Tensor,
        rewards: Any,
        groups: Any,
        norm_weights: Any = None,
        cu_seqlens: Any = None,
    ) -> OPOBResult:
        """A call whose gradients are reduced (data parallel, FSDP2) or sharded (TP)."""
        reducer = self._reducer
        swapped = []
        if reducer.tp_group is not None:
            swapped = reducer.swap_tp_params(self.model, self._params, self._names)
            self._tape.localize(red.local)  # inputs a TP style turned into DTensors
        try:
            return self._step.run(loss, rewards, groups, norm_weights, cu_seqlens)
        finally:
            reducer.restore_tp_params(swapped)

    def _check_still_plain(self) -> None:
        """Refuse a model that was sharded or parallelized after OPOB was attached."""
        late = bool(red.fsdp_modules(self.model)) or any(
            red.is_dtensor(p) for p in self.model.parameters()
        )
        if late:
            raise ValueError(
                "OPOB: the model was sharded (fully_shard) or parallelized (parallelize_module) "
                "after OPOB was attached; its parameters are no longer the ones OPOB tracks. "
                "Attach OPOB after fully_shard / parallelize_module."
            )
