r"""VCPO's ESS step scaling in verl's FSDP engine, switched on by configuration.

Two config keys make verl build and feed a VCPO optimizer::

    actor_rollout_ref.actor.optim.optimizer_impl=vcpo_optim.integrations.verl
    actor_rollout_ref.actor.optim.optimizer=VCPOAdamW
    # optional ESS settings: new keys, hence hydra's "+" prefix
    +actor_rollout_ref.actor.optim.override_optimizer_config.base_ess_ratio=0.5

How it works (tested with verl 0.9.1, its FSDP/FSDP2 engine):

1. **The optimizer.** verl's ``build_optimizer`` (``verl.workers.config.optimizer``)
   imports ``optimizer_impl`` with ``importlib``, takes the class named
   ``optimizer`` from it and calls ``cls(params, lr=..., weight_decay=...,
   betas=..., **override_optimizer_config)``. :class:`VCPOAdamW`,
   :class:`VCPOAdam` and :class:`VCPOSGD` here are the core classes of
   :mod:`vcpo_optim.optim` plus one guard (below), so every keyword of the
   core class (``base_ess_ratio``, ``min_lr_scale``, ``scale_weight_decay``,
   ``ess_power``, ``eps``, ``foreach``, ...) can be given through
   ``override_optimizer_config``.

2. **The importance weights.** Importing this module (which ``build_optimizer``
   does inside every actor worker process, before the first training step)
   calls :func:`install`, which replaces two attributes of verl's
   ``FSDPEngine`` class (``verl.workers.engine.fsdp.transformer_impl``):

   - ``forward_backward_batch(self, data, loss_function, forward_only=False)``:
     when training (``forward_only=False``) with an optimizer from this module,
     the ``loss_function`` handed to verl's own micro-batch loop is wrapped.
     verl calls it once per micro-batch with the micro-batch's
     ``model_output`` (the log-probs of this very forward, with grad) and
     ``data``; the wrapper first calls ``optimizer.observe(log_weights=lw,
     mask=has_tokens)`` with, for every sequence :math:`i` of the micro-batch,

     .. math::

         \mathrm{lw}_i = \sum_t m_{it}\,\big(\log\pi_\theta(y_{it}) - \log\mu(y_{it})\big),

     where :math:`m` is verl's ``response_mask`` and :math:`\mu` the behaviour
     policy (:func:`behaviour_key`: ``rollout_log_probs`` when the batch has
     them, else ``old_log_probs``), then runs verl's loss unchanged. A sequence
     with no token in ``response_mask`` (for example one dropped by verl's
     rejection sampling) contributes no gradient and is left out of the ESS.
   - ``train_batch(self, data, loss_function)`` (inherited from ``BaseEngine``):
     after verl's own ``optimizer_step()``, the step's statistics are added to
     the metrics dict it returns, as ``vcpo/ess``, ``vcpo/ess_ratio``,
     ``vcpo/lr_scale``, ``vcpo/lr`` (the effective lr of the first param group)
     and ``vcpo/n`` (the global number of sequences of the step). verl logs
     them with the actor's prefix: ``actor/vcpo/ess_ratio`` and so on.

   Engines whose optimizer is not from this module (the reference policy, the
   critic, a ``torch.optim`` actor) and forward-only passes are passed through
   untouched. :func:`install` is idempotent (a second call, or a second import,
   changes nothing) and checks, before patching anything, the signatures of the
   verl functions it relies on; if verl changed one of them it raises
   :class:`VerlIntegrationError` naming the installed verl version and the
   function, rather than risk observing nothing.

3. **Never a silent no-op.** An optimizer from this module refuses (raises
   ``RuntimeError`` before changing anything) a ``step()`` that observed no
   importance weights since the last ``zero_grad()``: that happens only if
   the step did not go through the wrapped FSDP micro-batch loop (an engine
   that overrides it, a verl that no longer calls the loss the way 0.9.1 does),
   and it would otherwise be plain AdamW without a word. The one accepted
   exception is a batch that carries neither ``rollout_log_probs`` nor
   ``old_log_probs`` (not a policy-gradient update, e.g. SFT): those steps run
   unscaled after a one-time ``UserWarning``.

4. **OPOB mode (opt-in).** ``override_optimizer_config.opob=group|batch``
   (with ``opob_group_size``, ``opob_norm_by_std``, ``opob_is_mode``,
   ``opob_is_cap``; see :class:`OPOBSettings`) makes the wrapped
   ``forward_backward_batch`` attach :class:`vcpo_optim.OPOB` to the engine's
   FSDP2 model on the first training call and hand verl's loop a loss whose
   ``backward()`` is

   .. math::

       \texttt{opob.backward}(l, R, \mathrm{uid}, \texttt{cu\_seqlens}), \qquad
       l_i = -\frac{w_i}{D_i}\sum_t m_{it}\log\pi_\theta(y_{it}), \quad
       R_i = \sum_t r_{it}

   (:func:`opob_surrogate`: :math:`w_i` the truncated sequence weight,
   :math:`D_i` verl's ``agg_loss`` normaliser over the global mini-batch,
   :math:`r` the ``token_level_rewards``; ``cu_seqlens`` the packed row's
   ``input_ids.offsets()`` under ``use_remove_padding``). verl's advantages
   and PPO clip are not used. Configurations outside the tested subset are
   refused at every training call, on every rank, before anything changes
   (:func:`opob_refusals`); with ``scope="group"`` each micro-batch call must
   hold whole prompt groups over all ranks (checked with one
   ``all_gather_object``, which also spreads any rank's failure to all ranks).

The data-parallel reduction of the ESS uses the engine's data-parallel group
(``engine.get_data_parallel_group()``, set on the optimizer on its first
training batch), so with Ulysses sequence parallelism each sequence counts
once. verl's ``Metric`` objects carry the numbers, so verl's own DP and
mini-batch aggregation applies (the same value on every rank; the mean over
the mini-batches of a training step).

Private verl APIs this module depends on (verl 0.9.1): ``FSDPEngine.
forward_backward_batch`` and ``BaseEngine.train_batch`` (wrapped);
``FSDPEngineWithLMHead.forward_step`` calling
``loss_function(model_output=..., data=..., dp_group=...)`` once per
micro-batch with ``model_output["log_probs"]`` as a nested (jagged) tensor;
``FSDPEngine.optimizer``, ``get_data_parallel_group()``,
``is_mp_src_rank_with_outputs()``; the micro-batch keys ``response_mask``,
``old_log_probs``, ``rollout_log_probs``, ``prompts``, ``responses``
(``attention_mask``); ``verl.workers.utils.padding.no_padding_2_padding``;
``verl.utils.metric.Metric``; and the call convention of
``verl.workers.config.optimizer.build_optimizer``. OPOB mode also relies on
``forward_backward_batch`` calling ``loss.backward()`` on what ``forward_step``
returns (``forward_step`` reading only ``loss.detach().item()``);
``FSDPEngine.module``, ``.ulysses_sequence_parallel_size``, ``.scaler``,
``.engine_config`` (``param_offload``, ``offload_policy``),
``.model_config.lora_rank``; the actor loss being
``partial(verl.workers.utils.losses.ppo_loss, config=ActorConfig)`` with
``loss_agg_mode``, ``loss_scale_factor``, ``policy_loss``, ``entropy_coeff``,
``use_kl_loss``; the micro-batch keys ``token_level_rewards``, ``uid``,
``input_ids``, ``position_ids``, ``rollout_is_weights``,
``multi_modal_inputs`` and the non-tensor entries ``batch_num_tokens``,
``global_batch_size``, ``use_remove_padding``, ``use_fused_kernels``,
``distillation_use_topk``, ``distillation_only``
(``verl.utils.tensordict_utils.get_non_tensor_data``).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import math
import os
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from vcpo_optim import optim as _optim

try:
    import verl as _verl
    from verl.utils import tensordict_utils as _tu
    from verl.utils.metric import Metric as _Metric
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngine as _FSDPEngine
    from verl.workers.engine.fsdp.transformer_impl import (
        FSDPEngineWithLMHead as _FSDPEngineWithLMHead,
    )
    from verl.workers.utils.losses import ppo_loss as _ppo_loss
    from verl.workers.utils.padding import no_padding_2_padding as _no_padding_2_padding
except ImportError as exc:  # pragma: no cover - exercised only without verl
    raise ImportError(
        "vcpo_optim.integrations.verl needs verl (tested with verl==0.9.1); "
        f"importing it failed: {exc}"
    ) from exc

__all__ = [
    "OPOB_LOSS_AGG_MODES",
    "TESTED_VERL_VERSIONS",
    "VCPOSGD",
    "OPOBSettings",
    "VCPOAdam",
    "VCPOAdamW",
    "VerlIntegrationError",
    "behaviour_key",
    "install",
    "opob_metrics",
    "opob_refusals",
    "opob_surrogate",
    "sequence_log_weights",
    "step_metrics",
]

#: verl versions this integration was tested with.
TESTED_VERL_VERSIONS = ("0.9.1",)

_MARK = "_vcpo_verl_wrapped"
_BEHAVIOUR_KEYS = ("rollout_log_probs", "old_log_probs")


class VerlIntegrationError(RuntimeError):
    """The installed verl does not match what this integration wraps."""


# --------------------------------------------------------------------- checks
_EMPTY = inspect.Parameter.empty

#: (owner, attribute, expected parameters as (name, default)) checked by install().
_EXPECTED: tuple[tuple[type, str, tuple[tuple[str, Any], ...]], ...] = (
    (
        _FSDPEngine,
        "forward_backward_batch",
        (("self", _EMPTY), ("data", _EMPTY), ("loss_function", _EMPTY), ("forward_only", False)),
    ),
    (_FSDPEngine, "train_batch", (("self", _EMPTY), ("data", _EMPTY), ("loss_function", _EMPTY))),
    (
        _FSDPEngineWithLMHead,
        "forward_step",
        (
            ("self", _EMPTY),
            ("micro_batch", _EMPTY),
            ("loss_function", _EMPTY),
            ("forward_only", _EMPTY),
        ),
    ),
    (_FSDPEngine, "get_data_parallel_group", (("self", _EMPTY),)),
    (_FSDPEngine, "is_mp_src_rank_with_outputs", (("self", _EMPTY),)),
)


def _describe(params: tuple[tuple[str, Any], ...]) -> str:
    return "(" + ", ".join(n if d is _EMPTY else f"{n}={d!r}" for n, d in params) + ")"


def _original(fn: Any) -> Any:
    """The verl function under our wrapper, if it is wrapped."""
    while getattr(fn, _MARK, False):
        fn = fn.__wrapped__
    return fn


def _check_signature(owner: type, name: str, expected: tuple[tuple[str, Any], ...]) -> None:
    where = f"{owner.__module__}.{owner.__qualname__}.{name}"
    version = getattr(_verl, "__version__", "unknown")
    fn = getattr(owner, name, None)
    if fn is None:
        raise VerlIntegrationError(
            f"vcpo_optim.integrations.verl (tested with verl {', '.join(TESTED_VERL_VERSIONS)}) "
            f"needs {where}{_describe(expected)}, which verl {version} does not have. Without it "
            "the optimizer would observe no importance weights; pin verl to a tested version or "
            "update vcpo_optim."
        )
    try:
        sig = inspect.signature(_original(fn), follow_wrapped=False)
    except (TypeError, ValueError) as exc:
        raise VerlIntegrationError(f"cannot read the signature of {where}: {exc}") from exc
    found = tuple(
        (p.name, p.default)
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    extra = [p.name for p in sig.parameters.values() if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if found != expected or extra:
        raise VerlIntegrationError(
            f"vcpo_optim.integrations.verl was tested with verl {', '.join(TESTED_VERL_VERSIONS)}; "
            f"in the installed verl {version}, {where} has the signature {sig} instead of "
            f"{_describe(expected)}. This integration wraps or relies on that method to feed the "
            "importance weights to the optimizer, and will not guess what the new one does (it "
            "could silently observe nothing). Pin verl to a tested version or update vcpo_optim."
        )


# ------------------------------------------------------------ log weights
def behaviour_key(data: Any) -> str | None:
    """The micro-batch key holding the behaviour policy's log-probs :math:`\\log\\mu`.

    ``"rollout_log_probs"`` (the log-probs the rollout engine, e.g. vLLM,
    recorded while sampling: verl's default ``rollout.calculate_log_probs=True``)
    when present, else ``"old_log_probs"``, else ``None``. The rollout's own
    log-probs come first because they belong to the policy that actually
    sampled the data: ``old_log_probs`` are recomputed by the learner when the
    batch reaches it (verl's "decoupled" mode), which hides exactly the
    staleness an asynchronous pipeline introduces, and they also hide the
    sampler/learner numerical mismatch. In verl's bypass mode the two are the
    same tensor.
    """
    keys = data.keys()
    for key in _BEHAVIOUR_KEYS:
        if key in keys:
            return key
    return None


def sequence_log_weights(
    log_probs: Tensor, data: Any, key: str | None = None
) -> tuple[Tensor, Tensor]:
    r"""Per-sequence log importance weights of one verl micro-batch.

    Args:
        log_probs: ``model_output["log_probs"]`` of verl's FSDP engine: the
            log-probs of every token of every (prompt + response) sequence, as
            a nested (jagged) tensor, the layout verl's ``ppo_loss`` reads.
        data: the micro-batch ``TensorDict`` (``response_mask``, the behaviour
            log-probs, ``prompts``/``responses``).
        key: the behaviour log-probs' key. Default ``None``: :func:`behaviour_key`.

    Returns:
        ``(lw, has_tokens)``: float64 tensors of shape ``[batch]``,
        :math:`\mathrm{lw}_i = \sum_t m_{it}(\log\pi_\theta(y_{it}) -
        \log\mu(y_{it}))` (detached) and whether sequence :math:`i` has any
        token in ``response_mask``. Token positions outside the mask are
        ignored whatever they hold.
    """
    if key is None:
        key = behaviour_key(data)
        if key is None:
            raise ValueError(
                "the micro-batch has neither 'rollout_log_probs' nor 'old_log_probs': there is no "
                "behaviour policy to weight against"
            )
    logp = _no_padding_2_padding(log_probs, data).detach()
    fields = data.select("response_mask", key).to_padded_tensor()
    mask = fields["response_mask"].to(torch.bool)
    behaviour = fields[key]
    if logp.shape != mask.shape or behaviour.shape != mask.shape:
        raise ValueError(
            f"verl's response log-probs have shape {tuple(logp.shape)}, 'response_mask' "
            f"{tuple(mask.shape)} and {key!r} {tuple(behaviour.shape)}; they must match"
        )
    diff = logp.to(torch.float64) - behaviour.to(device=logp.device, dtype=torch.float64)
    mask = mask.to(logp.device)
    lw = torch.where(mask, diff, torch.zeros_like(diff)).sum(dim=-1)
    return lw, mask.any(dim=-1)


class _ObservingLoss:
    """verl's loss function, preceded by ``optimizer.observe`` on each micro-batch."""

    def __init__(self, loss_function: Callable[..., Any], optimizer: _VerlGuard) -> None:
        self.loss_function = loss_function
        self.optimizer = optimizer

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # verl 0.9.1 calls the loss as loss_function(model_output=, data=, dp_group=); it
        # also hands the same callable to top-k distillation as a logits processor
        # (student_logits=, data=): anything that is not the loss call passes through.
        if "model_output" in kwargs and "data" in kwargs:
            self._observe(kwargs["model_output"], kwargs["data"])
        return self.loss_function(*args, **kwargs)

    def _observe(self, model_output: Any, data: Any) -> Tensor | None:
        """Observe the micro-batch's sequence log weights; return them (``None``: no behaviour
        log-probs in the batch, warned about, nothing observed)."""
        opt = self.optimizer
        key = behaviour_key(data)
        if key is None:
            opt._vcpo_verl_unweighted = True
            warnings.warn(
                f"{type(opt).__name__} (vcpo_optim.integrations.verl): this training batch has "
                "neither 'rollout_log_probs' nor 'old_log_probs', so there are no importance "
                "weights: such steps run at the full learning rate (plain "
                f"{opt._ess_base.__name__}). Expected only outside policy-gradient training.",
                UserWarning,
                stacklevel=2,
            )
            return None
        log_probs = model_output.get("log_probs") if hasattr(model_output, "get") else None
        if log_probs is None:
            raise ValueError(
                f"{type(opt).__name__} (vcpo_optim.integrations.verl) needs the policy's "
                "log-probs of each micro-batch, but verl's model output has no 'log_probs' (a "
                "value model, or distillation_only). ESS step scaling is for the actor: use "
                "optimizer_impl=torch.optim for this model."
            )
        lw, has_tokens = sequence_log_weights(log_probs, data, key)
        opt.observe(log_weights=lw, mask=has_tokens)
        return lw


# ------------------------------------------------------------------ OPOB mode
#: ``loss_agg_mode`` values of verl whose normalisation the OPOB mode reproduces
#: (those of ``verl.trainer.ppo.core_algos.agg_loss``).
OPOB_LOSS_AGG_MODES = (
    "token-mean",
    "token-sum",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
    "seq-mean-token-mean",
)
_OPOB_KEYS = ("opob", "opob_group_size", "opob_norm_by_std", "opob_is_mode", "opob_is_cap")


@dataclass(frozen=True)
class OPOBSettings:
    r"""The OPOB mode's settings, read from ``override_optimizer_config``.

    Attributes:
        scope: ``"group"`` (a baseline per prompt group, verl's ``uid``) or
            ``"batch"`` (one baseline per optimizer step over all ranks).
        group_size: with ``scope="group"``, the number of responses per prompt
            (verl's ``rollout.n``, at least 2: a group of one has coefficient 0,
            refused); every group must be complete, on all
            data-parallel ranks together, in every micro-batch call (checked).
        norm_by_std: divide each coefficient by its scope's reward std
            (population), as GRPO's ``norm_adv_by_std_in_grpo``. Default ``False``.
        is_mode: sequence importance weight of the surrogate
            (:func:`vcpo_optim.losses.importance_weights`): ``"tis"`` (default),
            ``"is"``, ``"mis"`` or ``"none"``.
        is_cap: the cap ``c`` of ``"tis"`` / ``"mis"`` (set with ``"is"`` or
            ``"none"`` it is refused: it would do nothing). Default ``8.0``.
    """

    scope: str
    group_size: int | None = None
    norm_by_std: bool = False
    is_mode: str = "tis"
    is_cap: float = 8.0

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> OPOBSettings | None:
        """Remove the ``opob*`` keys from the optimizer's keywords; ``None`` when OPOB is off."""
        from vcpo_optim.losses import IS_MODES

        given = {k: kwargs.pop(k) for k in _OPOB_KEYS if k in kwargs}
        scope = given.get("opob")
        if scope is None or scope is False or scope == "none":
            extra = sorted(k for k in given if k != "opob")
            if extra:
                raise ValueError(
                    f"vcpo_optim.integrations.verl: {extra} set without opob=group|batch; OPOB is "
                    "off, so they would do nothing. Set override_optimizer_config.opob too."
                )
            return None
        if scope not in ("group", "batch"):
            raise ValueError(
                f"vcpo_optim.integrations.verl: opob must be 'group' or 'batch' (or absent), "
                f"got {scope!r}"
            )
        size = given.get("opob_group_size")
        if scope == "group":
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(
                    "vcpo_optim.integrations.verl: opob=group needs opob_group_size=<responses per "
                    f"prompt, verl's actor_rollout_ref.rollout.n>, an integer >= 1; got {size!r}"
                )
            if size == 1:
                raise ValueError(
                    "vcpo_optim.integrations.verl: opob=group with opob_group_size=1: a group of "
                    "one response is its own baseline (b* = R_i), so every coefficient and the "
                    "whole gradient would be 0. Use rollout.n >= 2, or opob=batch."
                )
        elif size is not None:
            raise ValueError(
                "vcpo_optim.integrations.verl: opob_group_size is for opob=group; with "
                "opob=batch there is one baseline per step. Remove it."
            )
        norm = given.get("opob_norm_by_std", False)
        if not isinstance(norm, bool):
            raise ValueError(f"opob_norm_by_std must be true or false, got {norm!r}")
        mode = given.get("opob_is_mode", "tis")
        if mode not in IS_MODES:
            raise ValueError(f"opob_is_mode must be one of {IS_MODES}, got {mode!r}")
        cap = given.get("opob_is_cap", 8.0)
        if isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < math.inf:
            raise ValueError(f"opob_is_cap must be a finite number > 0, got {cap!r}")
        if "opob_is_cap" in given and mode not in ("tis", "mis"):
            raise ValueError(
                f"vcpo_optim.integrations.verl: opob_is_cap={cap!r} is not used by "
                f"opob_is_mode={mode!r} (only 'tis' and 'mis' have a cap); it would do nothing. "
                "Remove it."
            )
        return cls(scope, size, norm, mode, float(cap))


def _loss_config(loss_function: Any) -> Any:
    """verl's ``ActorConfig`` behind ``partial(ppo_loss, config=...)``, else ``None``."""
    if (
        isinstance(loss_function, functools.partial)
        and loss_function.func is _ppo_loss
        and not loss_function.args
        and set(loss_function.keywords) == {"config"}
    ):
        return loss_function.keywords["config"]
    return None


def _fused_logprob_kernel() -> str | None:
    """The fused log-prob kernel verl's ``logprobs_from_logits`` would use, else ``None``.

    verl 0.9.1 (``verl.utils.torch_functional``) uses flash-attn's Triton
    cross-entropy (``inplace_backward=True``) when flash-attn imports and
    ``VERL_DISABLE_FLASH_ATTN_CE`` is not ``"1"``, else torch_npu's kernel where
    it imports, else ``log_softmax`` + ``gather``.
    """
    from verl.utils import torch_functional as tf

    if getattr(tf, "FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE", False) and (
        os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    ):
        return "flash-attn's Triton cross-entropy kernel (inplace_backward=True)"
    if getattr(tf, "NPU_CROSS_ENTROPY_LOSS_AVAILABLE", False):
        return "torch_npu's cross-entropy kernel"
    return None


def opob_refusals(engine: Any, data: Any, loss_function: Any, settings: OPOBSettings) -> list[str]:
    """Why the OPOB mode cannot run this engine, batch and loss (empty: it can).

    Every reason comes from configuration and batch keys, which are the same on
    all data-parallel ranks, so every rank refuses alike before any forward.
    """
    from torch.distributed.fsdp import FSDPModule

    why: list[str] = []
    if type(engine) is not _FSDPEngineWithLMHead:
        why.append(
            f"the engine is {type(engine).__name__}, not verl's FSDPEngineWithLMHead (the actor "
            "of strategy fsdp2)"
        )
        return why
    if not isinstance(engine.module, FSDPModule):
        why.append(
            "the model is not sharded with FSDP2 (fully_shard): set "
            "actor_rollout_ref.actor.strategy=fsdp2 (FSDP1's flat parameters are not supported)"
        )
    if getattr(engine, "ulysses_sequence_parallel_size", 1) != 1:
        why.append(
            "Ulysses sequence parallelism (ulysses_sequence_parallel_size > 1) splits each "
            "packed row across ranks, so no rank holds a whole trajectory; set it to 1"
        )
    if getattr(engine, "scaler", None) is not None:
        why.append("fp16 with a GradScaler; use bf16 or fp32 mixed precision")
    ec = engine.engine_config
    if getattr(ec, "offload_policy", False) or getattr(ec, "param_offload", False):
        why.append(
            "fsdp_config.offload_policy / param_offload (parameters on the CPU between steps) "
            "are untested with OPOB"
        )
    if getattr(engine.model_config, "lora_rank", 0):
        why.append("LoRA (model.lora_rank > 0) is untested with OPOB in verl")
    config = _loss_config(loss_function)
    if config is None:
        why.append(
            "the loss function is not verl's partial(ppo_loss, config=...) (e.g. "
            "distillation_ppo_loss or a custom loss); OPOB mode replaces only ppo_loss"
        )
    else:
        if config.loss_agg_mode not in OPOB_LOSS_AGG_MODES:
            why.append(
                f"loss_agg_mode={config.loss_agg_mode!r} is not one of {OPOB_LOSS_AGG_MODES}"
            )
        mode = config.policy_loss.get("loss_mode", "vanilla")
        if mode != "vanilla":
            why.append(
                f"policy_loss.loss_mode={mode!r}: OPOB mode replaces verl's vanilla policy loss "
                "with its own surrogate and would drop what this loss mode does"
            )
        if config.entropy_coeff:
            why.append(
                "entropy_coeff != 0: the entropy bonus is not of the form sum_i c_i grad l_i; "
                "set actor_rollout_ref.actor.entropy_coeff=0"
            )
        if config.use_kl_loss:
            why.append(
                "use_kl_loss=True: the KL loss is not of the form sum_i c_i grad l_i; use "
                "algorithm.use_kl_in_reward (it enters the rewards) or switch it off"
            )
    kernel = _fused_logprob_kernel()
    if kernel is not None:
        why.append(
            f"verl computes the log-probs with {kernel}, which OPOB mode is not tested with (no "
            "GPU here); set VERL_DISABLE_FLASH_ATTN_CE=1 in the workers' environment for the "
            "plain PyTorch log_softmax path OPOB mode is tested on"
        )
    for key in ("use_fused_kernels", "distillation_use_topk", "distillation_only"):
        if _tu.get_non_tensor_data(data=data, key=key, default=False):
            why.append(f"{key}=True")
    keys = set(data.keys())
    if "token_level_rewards" not in keys:
        why.append("the batch has no 'token_level_rewards' (the rewards OPOB weighs)")
    if settings.scope == "group" and "uid" not in keys:
        why.append("opob=group needs the prompt-group ids 'uid' in the batch")
    if "rollout_is_weights" in keys:
        why.append(
            "the batch carries 'rollout_is_weights' (algorithm.rollout_correction): OPOB mode "
            "applies its own sequence weights (opob_is_mode); switch verl's correction off"
        )
    if "multi_modal_inputs" in keys or data["position_ids"].dim() == 3:
        why.append("multi-modal inputs (mRoPE position ids) are untested with OPOB")
    if behaviour_key(data) is None:
        why.append("the batch has neither 'rollout_log_probs' nor 'old_log_probs'")
    return why


def opob_surrogate(
    log_probs: Tensor, data: Any, config: Any, weights: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Per-trajectory surrogate :math:`l_i` and rewards :math:`R_i` of one verl micro-batch.

    .. math::

        l_i = -\frac{w_i}{D_i} \sum_t m_{it} \log\pi_\theta(y_{it}), \qquad
        R_i = \sum_t r_{it},

    with :math:`m` verl's ``response_mask``, :math:`r` its ``token_level_rewards``,
    :math:`w_i` the (detached) sequence importance weight and :math:`D_i` the
    normaliser of verl's ``agg_loss`` for ``config.loss_agg_mode`` over the
    *global* mini-batch, without verl's ``dp_size`` factor (OPOB sums over
    ranks): ``token-mean`` the global response-token count
    (``batch_num_tokens``), ``token-sum`` 1, ``seq-mean-token-sum``
    ``global_batch_size``, ``seq-mean-token-sum-norm`` that times
    ``loss_scale_factor`` (default: the padded response length, as verl),
    ``seq-mean-token-mean`` ``global_batch_size * (L_i + 1e-8)``. So
    :math:`\sum_i A_i \nabla l_i` is exactly the gradient of verl's vanilla
    policy loss at ratio 1 without clipping, with advantages :math:`A_i`
    replaced by OPOB's :math:`c_i = R_i - b^*`.
    """
    logp = _no_padding_2_padding(log_probs, data)
    fields = data.select("response_mask", "token_level_rewards").to_padded_tensor()
    mask = fields["response_mask"].to(device=logp.device, dtype=torch.bool)
    rewards = fields["token_level_rewards"].to(device=logp.device, dtype=torch.float64).sum(-1)
    cd = torch.promote_types(logp.dtype, torch.float32)
    tok = torch.where(mask, logp.to(cd), torch.zeros((), dtype=cd, device=logp.device)).sum(-1)
    mode = config.loss_agg_mode
    if mode == "token-mean":
        total = data["batch_num_tokens"]
        if total is None or not float(total) > 0:
            raise ValueError(
                f"OPOB mode: the global mini-batch has {total} response tokens (token-mean)"
            )
        denom: Tensor | float = float(total)
    elif mode == "token-sum":
        denom = 1.0
    else:
        gbs = data["global_batch_size"]
        if gbs is None or not float(gbs) > 0:
            raise ValueError(f"OPOB mode: {mode} needs global_batch_size > 0, got {gbs}")
        denom = float(gbs)
        if mode == "seq-mean-token-sum-norm":
            factor = config.loss_scale_factor
            denom *= float(mask.shape[-1] if factor is None else factor)
        elif mode == "seq-mean-token-mean":
            denom = denom * (mask.sum(-1).to(cd) + 1e-8)
    loss = -(weights.to(device=logp.device, dtype=cd) * tok / denom)
    return loss, rewards


def _group_ids(uids: list[Any]) -> Tensor:
    """int64 ids of verl's ``uid`` strings, equal on every rank for equal uids (63-bit hashes)."""
    out = []
    for u in uids:
        h = hashlib.blake2b(str(u).encode(), digest_size=8).digest()
        out.append(int.from_bytes(h, "little") & ((1 << 63) - 1))
    return torch.tensor(out, dtype=torch.long)


class _OPOBBackward:
    """What verl's micro-batch loop gets as ``loss`` in OPOB mode.

    verl 0.9.1 does ``loss.detach().item()`` in ``forward_step`` and
    ``loss.backward()`` in ``forward_backward_batch``; here the latter is
    ``opob.backward(l, R, groups, cu_seqlens=cu)``.
    """

    def __init__(self, run: Callable[[], Any], value: Tensor) -> None:
        self._run = run
        self._value = value

    def detach(self) -> Tensor:
        return self._value

    def backward(self, *args: Any, **kwargs: Any) -> None:
        if args or kwargs:
            raise TypeError("OPOB mode: the micro-batch loss takes no backward() arguments")
        self._run()


class _OPOBLoss(_ObservingLoss):
    """verl's loss call in OPOB mode: observe the weights, build l_i and defer to OPOB."""

    def __init__(
        self, loss_function: Callable[..., Any], optimizer: _VerlGuard, opob: Any, engine: Any
    ) -> None:
        super().__init__(loss_function, optimizer)
        self.opob = opob
        self.engine = engine
        self.config = _loss_config(loss_function)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if "model_output" not in kwargs or "data" not in kwargs:
            return self.loss_function(*args, **kwargs)
        try:
            return self._opob_loss(kwargs["model_output"], kwargs["data"])
        except BaseException:
            self.opob.clear()  # the recorded forward is not backpropagated
            raise

    def _opob_loss(self, model_output: Any, data: Any) -> Any:
        from vcpo_optim.losses import importance_weights

        opt = self.optimizer
        settings = opt.vcpo_opob
        assert settings is not None
        failure: BaseException | None = None
        uids: list[str] = []
        try:
            lw = self._observe(model_output, data)
            # opob_refusals requires behaviour log-probs in every training batch
            assert lw is not None
            log_probs = model_output["log_probs"]
            weights = importance_weights(lw, settings.is_mode, settings.is_cap)
            loss, rewards = opob_surrogate(log_probs, data, self.config, weights)
            if settings.scope == "group":
                uids = [str(u) for u in data["uid"]]
            cu = None
            if _tu.get_non_tensor_data(data=data, key="use_remove_padding", default=True):
                cu = data["input_ids"].offsets().to(device=loss.device, dtype=torch.long)
        except Exception as exc:  # agreed on below, so that no rank waits for another
            failure = exc
        self._agree(uids, failure, settings)
        groups = _group_ids(uids).to(loss.device) if settings.scope == "group" else None
        opob = self.opob

        def run() -> None:
            res = opob.backward(loss, rewards, groups, cu_seqlens=cu)
            opt.vcpo_opob_results.append(res)

        return _OPOBBackward(run, loss.detach().sum()), {}

    def _agree(self, uids: list[str], failure: BaseException | None, s: OPOBSettings) -> None:
        """One exchange over the data-parallel group before ``opob.backward``'s collectives.

        Every rank learns whether any rank failed to build its surrogate and, with
        ``scope="group"``, the global number of responses of each prompt group of
        this call; all ranks then raise the same error (or none).
        """
        group = (
            self.engine.get_data_parallel_group() if torch.distributed.is_initialized() else None
        )
        world = torch.distributed.get_world_size(group) if group is not None else 1
        if world == 1:
            if failure is not None:
                raise failure
            rows: list[Any] = [(Counter(uids), None)]
        else:
            mine = (
                Counter(uids),
                None if failure is None else f"{type(failure).__name__}: {failure}",
            )
            rows = [None] * world
            torch.distributed.all_gather_object(rows, mine, group=group)
        failed = [(r, why) for r, (_, why) in enumerate(rows) if why is not None]
        if failed:
            raise ValueError(
                "OPOB mode: building the per-sample surrogate failed on rank(s) "
                + "; ".join(f"{r}: {why}" for r, why in failed)
                + ". Nothing was changed in this call."
            ) from failure
        if s.scope != "group":
            return
        counts: Counter[str] = Counter()
        for c, _ in rows:
            counts.update(c)
        bad = sorted((u, n) for u, n in counts.items() if n != s.group_size)
        if bad:
            shown = ", ".join(f"{u!r}: {n}" for u, n in bad[:4])
            raise ValueError(
                f"OPOB mode (opob=group, opob_group_size={s.group_size}): this micro-batch call "
                f"holds {len(bad)} prompt group(s) with another number of responses over all "
                f"ranks ({shown}{', ...' if len(bad) > 4 else ''}). Each group must be complete "
                "in one call: use micro-batches (and mini-batches) that hold whole groups, "
                "use_dynamic_bsz=False and trainer.balance_batch=False, or opob=batch. "
                "Nothing was changed in this call."
            )


def _opob_for(engine: Any, opt: _VerlGuard, data: Any, loss_function: Any) -> Any:
    """Check the configuration (every training call) and attach OPOB once per engine."""
    settings = opt.vcpo_opob
    assert settings is not None
    why = opob_refusals(engine, data, loss_function, settings)
    if why:
        raise VerlIntegrationError(
            f"vcpo_optim.integrations.verl: OPOB mode (opob={settings.scope}) cannot run here:\n"
            + "\n".join(f"- {w}" for w in why)
            + "\nNothing was changed. Remove override_optimizer_config.opob to train without "
            "OPOB (ESS step scaling still works), or change the settings above."
        )
    opob = engine.__dict__.get("_vcpo_opob")
    if opob is None:
        from vcpo_optim.opob import OPOB

        group = engine.get_data_parallel_group() if torch.distributed.is_initialized() else None
        opob = OPOB(
            engine.module,
            scope=settings.scope,
            norm_by_std=settings.norm_by_std,
            process_group=group,
        )
        engine.__dict__["_vcpo_opob"] = opob
    return opob


# -------------------------------------------------------------- the wrappers
def _ours(engine: Any) -> _VerlGuard | None:
    opt = getattr(engine, "optimizer", None)
    return opt if isinstance(opt, _VerlGuard) else None


def _wrap_forward_backward_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def forward_backward_batch(
        self: Any, data: Any, loss_function: Callable[..., Any], forward_only: bool = False
    ) -> Any:
        opt = _ours(self)
        if forward_only or opt is None or loss_function is None:
            return original(self, data, loss_function, forward_only)
        if opt.process_group is None and torch.distributed.is_initialized():
            opt.process_group = self.get_data_parallel_group()
        if opt.vcpo_opob is not None:
            opob = _opob_for(self, opt, data, loss_function)
            opt.vcpo_opob_results = []
            return original(self, data, _OPOBLoss(loss_function, opt, opob, self), forward_only)
        return original(self, data, _ObservingLoss(loss_function, opt), forward_only)

    setattr(forward_backward_batch, _MARK, True)
    return forward_backward_batch


def _wrap_train_batch(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def train_batch(self: Any, data: Any, loss_function: Callable[..., Any]) -> Any:
        opt = _ours(self)
        if opt is None:
            return original(self, data, loss_function)
        before = opt.last_stats
        outputs = original(self, data, loss_function)
        stats = opt.last_stats
        stepped = stats is not None and stats is not before  # verl skips non-finite steps
        if (
            stepped
            and stats.observed
            and isinstance(outputs, dict)
            and isinstance(outputs.get("metrics"), dict)
            and self.is_mp_src_rank_with_outputs()
        ):
            outputs["metrics"].update(step_metrics(stats))
        results = opt.vcpo_opob_results if opt.vcpo_opob is not None else []
        if (
            results
            and isinstance(outputs, dict)
            and isinstance(outputs.get("metrics"), dict)
            and self.is_mp_src_rank_with_outputs()
        ):
            outputs["metrics"].update(opob_metrics(results))
        return outputs

    setattr(train_batch, _MARK, True)
    return train_batch


def step_metrics(stats: _optim.ESSStepStats) -> dict[str, Any]:
    """``vcpo/*`` entries for verl's metrics dict (verl ``Metric`` objects, mean-aggregated)."""
    values = {
        "vcpo/ess": float(stats.ess),
        "vcpo/ess_ratio": float(stats.ess_ratio),
        "vcpo/lr_scale": float(stats.lr_scale),
        "vcpo/n": float(stats.n),
    }
    if stats.lrs:
        values["vcpo/lr"] = float(stats.lrs[0])
    return {k: _Metric(aggregation="mean", value=v) for k, v in values.items()}


def opob_metrics(results: list[Any]) -> dict[str, Any]:
    """``vcpo/opob/*`` entries of one OPOB-mode step (this rank's samples; mean over ranks).

    ``vcpo/opob/calls``: ``opob.backward`` calls (verl micro-batches) of the step;
    ``vcpo/opob/baseline``: mean of the samples' baselines :math:`b^*`;
    ``vcpo/opob/sq_norm``: mean of the per-sample squared gradient norms :math:`n_i`.
    """
    base = torch.cat([r.baselines.detach().double().flatten() for r in results])
    sq = torch.cat([r.sq_norms.detach().double().flatten() for r in results])
    values = {
        "vcpo/opob/calls": float(len(results)),
        "vcpo/opob/baseline": float(base.mean()) if base.numel() else 0.0,
        "vcpo/opob/sq_norm": float(sq.mean()) if sq.numel() else 0.0,
    }
    return {k: _Metric(aggregation="mean", value=v) for k, v in values.items()}


def install() -> None:
    """Wrap verl's ``FSDPEngine.forward_backward_batch`` and ``train_batch`` (idempotent).

    Called when this module is imported. Checks every verl signature it relies
    on first and raises :class:`VerlIntegrationError` (patching nothing) if one
    changed. See the module docstring for what the wrappers do.
    """
    for owner, name, expected in _EXPECTED:
        _check_signature(owner, name, expected)
    for name, wrap in (
        ("forward_backward_batch", _wrap_forward_backward_batch),
        ("train_batch", _wrap_train_batch),
    ):
        current = getattr(_FSDPEngine, name)
        if not getattr(current, _MARK, False):
            setattr(_FSDPEngine, name, wrap(current))


def _installed() -> bool:
    return all(
        getattr(getattr(_FSDPEngine, name), _MARK, False)
        for name in ("forward_backward_batch", "train_batch")
    )


# ---------------------------------------------------------------- optimizers
def _refuse_unobserved_step(opt: Any, args: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("importance_weights") is not None or kwargs.get("log_weights") is not None:
        return
    if len(args) > 1 or kwargs.get("closure") is not None:
        return  # a closure may observe inside step(); verl never passes one
    if opt._vcpo_verl_observed or opt._vcpo_verl_unweighted:
        return
    raise RuntimeError(
        f"{type(opt).__name__}.step() (vcpo_optim.integrations.verl): no importance weights were "
        "observed since the last zero_grad(), so this step would silently be plain "
        f"{opt._ess_base.__name__}. In verl the weights are fed by the FSDP engine's micro-batch "
        "loop (FSDPEngine.forward_backward_batch, wrapped when verl imports this module through "
        "optim.optimizer_impl=vcpo_optim.integrations.verl), and this step did not go through it: "
        "use the FSDP engine (strategy fsdp or fsdp2) for the actor, or call "
        "optimizer.observe(log_weights=...) before step() yourself."
    )


def _reset_after_step(opt: Any, args: Any, kwargs: dict[str, Any]) -> None:
    opt._vcpo_verl_observed = False
    opt._vcpo_verl_unweighted = False


class _VerlGuard:
    """Refuses a step without observed weights; see the module docstring."""

    _ess_base: type[torch.optim.Optimizer]
    _vcpo_verl_observed: bool
    _vcpo_verl_unweighted: bool
    #: OPOB mode settings (``override_optimizer_config.opob...``); ``None``: OPOB off.
    vcpo_opob: OPOBSettings | None
    #: OPOB mode: the ``OPOBResult`` of each micro-batch of the last training step.
    vcpo_opob_results: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        opob = OPOBSettings.pop_from(kwargs)
        super().__init__(*args, **kwargs)
        self.vcpo_opob = opob
        self.vcpo_opob_results = []
        self._vcpo_verl_arm()

    def _vcpo_verl_arm(self) -> None:
        self._vcpo_verl_observed = False
        self._vcpo_verl_unweighted = False
        hooks = self._optimizer_step_pre_hooks  # type: ignore[attr-defined]
        if _refuse_unobserved_step not in hooks.values():
            self.register_step_pre_hook(_refuse_unobserved_step)  # type: ignore[attr-defined]
            self.register_step_post_hook(_reset_after_step)  # type: ignore[attr-defined]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._vcpo_verl_arm()

    def observe(self, *args: Any, **kwargs: Any) -> None:
        """``observe`` of the core class (see :meth:`vcpo_optim.VCPOAdamW.observe`)."""
        super().observe(*args, **kwargs)  # type: ignore[misc]
        self._vcpo_verl_observed = True

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``zero_grad`` of the core class; also starts a new observation window."""
        self._vcpo_verl_observed = False
        self._vcpo_verl_unweighted = False
        super().zero_grad(set_to_none)  # type: ignore[misc]


class VCPOAdamW(_VerlGuard, _optim.VCPOAdamW):
    """:class:`vcpo_optim.VCPOAdamW` for verl (``optimizer=VCPOAdamW``).

    Same arguments, defaults and update; verl passes ``lr``, ``weight_decay``
    and ``betas`` from its optim config and ``override_optimizer_config`` as
    keywords. In addition a ``step()`` with no observed weights raises (see
    the module docstring).
    """


class VCPOAdam(_VerlGuard, _optim.VCPOAdam):
    """:class:`vcpo_optim.VCPOAdam` for verl (``optimizer=VCPOAdam``); see :class:`VCPOAdamW`."""


class VCPOSGD(_VerlGuard, _optim.VCPOSGD):
    """:class:`vcpo_optim.VCPOSGD` for verl (``optimizer=VCPOSGD``); see :class:`VCPOAdamW`.

    verl passes no ``betas`` to it (its name has no "adam").
    """


install()
