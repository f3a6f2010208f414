"""The mutations ``tools/mutate.py`` applies, one at a time.

Each is a plausible bug: an exact snippet of a library file (it must occur exactly
once), its replacement, and the tests that should catch it (pytest arguments,
run from the repository root). Keep the selections to single-process tests so a
run stays within minutes. Add a mutation whenever a bug slips through the suite.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mutation:
    id: str
    file: str
    original: str
    replacement: str
    tests: tuple[str, ...]
    what: str


OPTIM = ("tests/test_optim.py",)
ESS = ("tests/test_ess.py", "tests/test_optim.py")
LOSSES = ("tests/test_losses.py",)
BASELINE = (
    "tests/opob/test_opob_baseline.py",
    "tests/opob/test_opob_exact.py",
    "tests/opob/test_opob_accum.py",
)
OPOB = ("tests/opob/test_opob_rules.py", "tests/opob/test_opob_exact.py")

MUTATIONS: list[Mutation] = [
    # ------------------------------------------------------------------ optim.py
    Mutation(
        "optim-tensor-lr",
        "vcpo_optim/optim.py",
        "new_lr = lr * scale.to(device=lr.device, dtype=lr.dtype) if stats.observed else lr",
        "new_lr = lr if stats.observed else lr",
        OPTIM,
        "a tensor lr (fused/capturable path) is not scaled",
    ),
    Mutation(
        "optim-tensor-wd-inverted",
        "vcpo_optim/optim.py",
        'group["weight_decay"] = weight_decay / scale.to(',
        'group["weight_decay"] = weight_decay * scale.to(',
        OPTIM,
        "scale_weight_decay=False: tensor weight decay compensated the wrong way",
    ),
    Mutation(
        "optim-float-wd-inverted",
        "vcpo_optim/optim.py",
        'group["weight_decay"] = weight_decay / s_host',
        'group["weight_decay"] = weight_decay * s_host',
        OPTIM,
        "scale_weight_decay=False: float weight decay compensated the wrong way",
    ),
    Mutation(
        "optim-power-ignored",
        "vcpo_optim/optim.py",
        'scale = ratio.clamp(max=1.0).pow(_resolve_power(group["ess_power"]))',
        "scale = ratio.clamp(max=1.0)",
        OPTIM,
        "the rule's power p is ignored (sqrt rule becomes linear)",
    ),
    Mutation(
        "optim-no-clamp",
        "vcpo_optim/optim.py",
        'scale = ratio.clamp(max=1.0).pow(_resolve_power(group["ess_power"]))',
        'scale = ratio.pow(_resolve_power(group["ess_power"]))',
        OPTIM,
        "rho / rho_base above 1 is not clamped (lr scale > 1)",
    ),
    Mutation(
        "optim-no-floor",
        "vcpo_optim/optim.py",
        'scale = scale.clamp(min=float(group["min_lr_scale"]))',
        "scale = scale",
        OPTIM,
        "min_lr_scale is ignored",
    ),
    Mutation(
        "optim-base-ratio-ignored",
        "vcpo_optim/optim.py",
        'ratio = result.ratio / float(group["base_ess_ratio"])',
        "ratio = result.ratio",
        OPTIM,
        "base_ess_ratio is ignored",
    ),
    Mutation(
        "optim-closure-drops-window",
        "vcpo_optim/optim.py",
        'if not getattr(self, "_vcpo_in_step", False):',
        "if True:",
        OPTIM,
        "a closure's zero_grad() drops the step's weights (issue 8, item 1)",
    ),
    Mutation(
        "optim-zero-grad-keeps-window",
        "vcpo_optim/optim.py",
        'if not getattr(self, "_vcpo_in_step", False):',
        "if False:",
        OPTIM,
        "zero_grad() never starts a new window (GradScaler skipped steps leak)",
    ),
    Mutation(
        "optim-lr-not-restored",
        "vcpo_optim/optim.py",
        'for group, lr, weight_decay in saved:\n                group["lr"] = lr',
        "for group, lr, weight_decay in saved:\n                pass",
        OPTIM,
        "the scaled lr is left in the param group after step()",
    ),
    Mutation(
        "optim-window-not-closed",
        "vcpo_optim/optim.py",
        "        self._vcpo_pending = []\n        stats.lrs = tuple(lrs)",
        "        stats.lrs = tuple(lrs)",
        OPTIM,
        "a step's weights stay in the window for the next step",
    ),
    Mutation(
        "optim-failed-step-keeps-weights",
        "vcpo_optim/optim.py",
        "            self._vcpo_pending = window\n            raise\n        saved = [",
        "            raise\n        saved = [",
        OPTIM,
        "a step() that raises keeps the weights passed to it",
    ),
    Mutation(
        "optim-coupled-decay-allowed",
        "vcpo_optim/optim.py",
        'if decay_kind == "decoupled" or (',
        "if True or (",
        OPTIM,
        "scale_weight_decay=False accepted with coupled decay (issue 8, item 6)",
    ),
    Mutation(
        "optim-allow-list-bypassed",
        "vcpo_optim/optim.py",
        "if optimizer_cls not in _LR_LINEAR and assume_lr_linear is not True:",
        "if False:",
        OPTIM,
        "ess_scaled accepts unverified optimizers without assume_lr_linear",
    ),
    Mutation(
        "optim-refused-list-bypassed",
        "vcpo_optim/optim.py",
        "        if issubclass(optimizer_cls, refused):",
        "        if False:",
        OPTIM,
        "ess_scaled accepts Rprop/ASGD/Adafactor/LBFGS (issue 8, item 7)",
    ),
    Mutation(
        "optim-float-lr-stats",
        "vcpo_optim/optim.py",
        "lrs.append(torch.tensor(new_lr, dtype=torch.float64))",
        "lrs.append(torch.tensor(lr, dtype=torch.float64))",
        OPTIM,
        "last_stats.lrs reports the unscaled lr",
    ),
    # -------------------------------------------------------------------- ess.py
    Mutation(
        "ess-formula",
        "vcpo_optim/ess.py",
        "ess = s1 * s1 / s2",
        "ess = s1 / s2",
        ESS,
        "ESS = S1 / S2 instead of S1^2 / S2",
    ),
    Mutation(
        "ess-combine-shift",
        "vcpo_optim/ess.py",
        "out[SUM2] = (rows[:, SUM2] * f * f).sum()",
        "out[SUM2] = (rows[:, SUM2] * f).sum()",
        ESS,
        "combining micro-batches re-shifts S2 by exp(m_r - m) instead of its square",
    ),
    Mutation(
        "ess-mask-ignored",
        "vcpo_optim/ess.py",
        "valid = keep & ~bad",
        "valid = ~bad",
        ESS,
        "masked-out weights still count in S1 and S2",
    ),
    Mutation(
        "ess-masked-count",
        "vcpo_optim/ess.py",
        "else keep.sum().to(torch.float64)",
        "else torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)",
        ESS,
        "n counts masked-out entries",
    ),
    Mutation(
        "ess-negative-check",
        "vcpo_optim/ess.py",
        "neg = x < 0",
        "neg = x < -1.0",
        ESS,
        "negative weights in (-1, 0) pass validation",
    ),
    Mutation(
        "ess-all-zero-check",
        "vcpo_optim/ess.py",
        "if not summary.any_positive:",
        "if False:",
        ESS,
        "all-zero weights give a NaN ESS instead of an error",
    ),
    # ----------------------------------------------------------------- losses.py
    Mutation(
        "losses-grpo-mean",
        "vcpo_optim/losses.py",
        "adv = r - total / count",
        "adv = r - total / (count + 1)",
        LOSSES,
        "GRPO subtracts a wrong group mean",
    ),
    Mutation(
        "losses-rloo-leave-one-out",
        "vcpo_optim/losses.py",
        "adv = r - (total - r) / (count - 1)",
        "adv = r - total / count",
        LOSSES,
        "RLOO uses the group mean including the sample itself",
    ),
    Mutation(
        "losses-population-std",
        "vcpo_optim/losses.py",
        "index_add_(0, inv, dev2) / count",
        "index_add_(0, inv, dev2) / (count - 1).clamp(min=1)",
        LOSSES,
        "the unbiased std instead of the population std",
    ),
    Mutation(
        "losses-tis-untruncated",
        "vcpo_optim/losses.py",
        'if mode == "tis":\n        return lw.clamp(max=log_c).exp()',
        'if mode == "tis":\n        return lw.exp()',
        LOSSES,
        "TIS does not truncate at c",
    ),
    Mutation(
        "losses-token-mean-per-seq",
        "vcpo_optim/losses.py",
        "s = tok_sum / lengths.clamp(min=1.0) / b",
        "s = tok_sum / lengths.clamp(min=1.0)",
        LOSSES,
        "seq-mean-token-mean forgets the 1/B",
    ),
    # ---------------------------------------------------------- opob/baseline.py
    Mutation(
        "baseline-stats-constant-reward",
        "vcpo_optim/opob/baseline.py",
        "const = (stats[:, 4] == stats[:, 3]) | (var <= 0)",
        "const = var <= 0",
        BASELINE,
        "sufficient-statistics inverse std: equal rewards not detected exactly (issue 8)",
    ),
    Mutation(
        "baseline-constant-reward",
        "vcpo_optim/opob/baseline.py",
        "const = (rmax == rmin) | (var <= 0)",
        "const = var <= 0",
        BASELINE,
        "per-sample inverse std: equal rewards not detected exactly",
    ),
    Mutation(
        "baseline-zero-norms",
        "vcpo_optim/opob/baseline.py",
        "return torch.where(tot[sid] > 0, sq_norms, torch.ones_like(sq_norms))",
        "return sq_norms",
        BASELINE,
        "a scope with all-zero norms does not fall back to the plain mean",
    ),
    Mutation(
        "baseline-upper-median",
        "vcpo_optim/opob/baseline.py",
        "ok = within >= q * tot[s]",
        "ok = within > q * tot[s]",
        BASELINE,
        "the weighted median is the upper, not the lower one",
    ),
    Mutation(
        "baseline-winsor-hi",
        "vcpo_optim/opob/baseline.py",
        "hi = weighted_quantile(rewards, w, sid, n_scopes, 1.0 - winsor_q)",
        "hi = weighted_quantile(rewards, w, sid, n_scopes, 1.0)",
        BASELINE,
        "the winsorized mean does not clip the upper tail",
    ),
    Mutation(
        "baseline-chan-merge",
        "vcpo_optim/opob/baseline.py",
        "m2 = _scope_sum(rows[:, 2] + c * (rows[:, 1] - mean[idx]) ** 2, idx, n_scopes)",
        "m2 = _scope_sum(rows[:, 2], idx, n_scopes)",
        BASELINE,
        "merging statistics drops the between-part spread",
    ),
    # ------------------------------------------------------------ opob/engine.py
    Mutation(
        "engine-ghost-cross-terms",
        "vcpo_optim/opob/engine.py",
        "out[lo:hi] += d if u == v else 2 * d",
        "out[lo:hi] += d",
        OPOB,
        "ghost norms count the cross terms of tied uses once instead of twice",
    ),
    Mutation(
        "engine-one-token-ghost",
        "vcpo_optim/opob/engine.py",
        "return va * torch.linalg.vecdot(g1.flatten(1), g2.flatten(1))",
        "return va",
        OPOB,
        "the one-token ghost norm drops the output-gradient factor",
    ),
    Mutation(
        "engine-materialize-sum",
        "vcpo_optim/opob/engine.py",
        "g = g + _materialize(f, lo, hi, p.shape, dt)",
        "g = _materialize(f, lo, hi, p.shape, dt)",
        OPOB,
        "direct norms keep only the last use of a tied parameter",
    ),
    Mutation(
        "engine-acc-scope",
        "vcpo_optim/opob/engine.py",
        "acc_s[sc].addmv_(flat.t(), qq[lo:hi])",
        "acc_s[0].addmv_(flat.t(), qq[lo:hi])",
        OPOB,
        "the acc strategy folds every scope into the first one",
    ),
    # ------------------------------------------------------------ opob/rules/*.py
    Mutation(
        "rules-layer-norm-eps",
        "vcpo_optim/opob/rules/layer_norm.py",
        "None, None, module.eps)",
        "None, None, 1e-5)",
        OPOB,
        "LayerNorm rule ignores the module's eps (issue 8)",
    ),
    Mutation(
        "rules-group-norm-eps",
        "vcpo_optim/opob/rules/group_norm.py",
        "None, None, module.eps)",
        "None, None, 1e-5)",
        OPOB,
        "GroupNorm rule ignores the module's eps (issue 8)",
    ),
    Mutation(
        "rules-rms-norm-eps",
        "vcpo_optim/opob/rules/rms_norm.py",
        "eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps",
        "eps = torch.finfo(x.dtype).eps",
        OPOB,
        "RMSNorm rule ignores an explicit eps",
    ),
    Mutation(
        "rules-embedding-padding",
        "vcpo_optim/opob/rules/embedding.py",
        "g = g * (idx != module.padding_idx).unsqueeze(-1).to(g.dtype)",
        "g = g",
        OPOB,
        "Embedding rule counts padding_idx positions",
    ),
    Mutation(
        "rules-linear-bias",
        "vcpo_optim/opob/rules/linear.py",
        'out["bias"] = Dense(g.sum(dim=(1, 2)))',
        'out["bias"] = Dense(g[:, 0, 0])',
        OPOB,
        "Linear bias rule keeps the first token only",
    ),
    Mutation(
        "rules-conv-padding",
        "vcpo_optim/opob/rules/conv.py",
        "    if any(pads):\n        x = F.pad(x, pads, mode=mode)",
        "    if False:\n        x = F.pad(x, pads, mode=mode)",
        OPOB,
        "conv rule ignores padding",
    ),
]
