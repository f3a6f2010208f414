"""A tiny, fully local GRPO set-up shared by the TRL tests (and their DDP worker).

Everything is built in the process: a character-level tokenizer (``tokenizers``
wrapped in ``PreTrainedTokenizerFast``), a random 1-layer Qwen2 from its
config, an in-memory prompt dataset and a deterministic reward. No hub access.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from typing import Any

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
from transformers import logging as hf_logging
from trl import GRPOConfig

from vcpo_optim import effective_sample_size

hf_logging.set_verbosity_error()

CHARS = "abcdefghijklmnopqrstuvwxyz "
PROMPTS = ["abc", "hello", "xyz", "qq", "def", "ghi", "jk", "lmn", "opq", "rst", "uv", "wxy"]


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", padding_side="left"
    )


def model(seed: int = 0) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(CHARS) + 2,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        tie_word_embeddings=False,
    )
    return Qwen2ForCausalLM(config)


def dataset() -> Dataset:
    return Dataset.from_dict({"prompt": PROMPTS})


def reward(completions: list[str], **kwargs: Any) -> list[float]:
    """Number of distinct characters: varies within every group of a random policy."""
    return [float(len(set(c))) for c in completions]


def config(output_dir: str, **overrides: Any) -> GRPOConfig:
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "num_generations": 4,
        "max_completion_length": 8,
        "max_steps": 2,
        "learning_rate": 3e-2,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        # TRL defaults to bf16 autocast (also on CPU); float32 keeps the
        # comparison with the float64 oracle tight (1e-6 instead of 1e-3).
        "bf16": False,
    }
    kwargs.update(overrides)
    return GRPOConfig(**kwargs)


def trainer(
    cls: type,
    output_dir: str,
    *,
    callbacks: Any = None,
    trainer_kwargs: dict[str, Any] | None = None,
    **overrides: Any,
) -> Any:
    """``cls(...)`` on the tiny set-up; ``overrides`` go to ``GRPOConfig``."""
    from transformers import PrinterCallback

    trainer = cls(
        model=model(),
        reward_funcs=reward,
        args=config(output_dir, **overrides),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        callbacks=callbacks,
        **(trainer_kwargs or {}),
    )
    trainer.remove_callback(PrinterCallback)  # logs stay in state.log_history, not on stdout
    return trainer


def vcpo_logs(trainer: Any) -> list[dict[str, float]]:
    """The ``vcpo/*`` entries of every per-step log, in step order."""
    return [
        {k: v for k, v in h.items() if k.startswith("vcpo/")}
        for h in trainer.state.log_history
        if "loss" in h
    ]


# ------------------------------------------------------- independent oracle


class Recorder:
    """Record, per optimizer step, the parameters at its start and its micro-batches.

    ``install(trainer_cls)`` returns a subclass whose public ``compute_loss``
    also keeps the micro-batch it was given; a ``TrainerCallback`` snapshot of
    the parameters is taken at ``on_step_begin``. Nothing here touches the
    code under test.
    """

    def __init__(self) -> None:
        self.params: list[dict[str, torch.Tensor]] = []
        self.batches: list[list[dict[str, Any]]] = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        rec = self

        class _Snap(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                model = kw["model"]
                rec.params.append({k: v.detach().clone() for k, v in model.state_dict().items()})
                rec.batches.append([])

        return _Snap()

    def install(self, trainer_cls: type) -> type:
        rec = self

        class _Recording(trainer_cls):  # type: ignore[misc, valid-type]
            def compute_loss(self, model, inputs, *args, **kwargs):  # type: ignore[no-untyped-def]
                if self.model.training:
                    rec.batches[-1].append({k: v for k, v in inputs.items()})
                return super().compute_loss(model, inputs, *args, **kwargs)

        return _Recording


def completion_logps64(params: dict[str, torch.Tensor], batch: dict[str, Any]) -> torch.Tensor:
    """``[B, T]`` float64 log-probs of the completion tokens under ``params``, by a plain forward."""
    net = model().double()
    net.load_state_dict({k: v.double() for k, v in params.items()})
    net.eval()
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attn = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    t = batch["completion_ids"].shape[1]
    with torch.no_grad():
        logits = net(input_ids=ids, attention_mask=attn).logits[:, -t - 1 : -1]
    logp = torch.log_softmax(logits.double(), dim=-1)
    return logp.gather(-1, batch["completion_ids"].unsqueeze(-1)).squeeze(-1)


def oracle_log_weights(
    rec: Recorder, step: int, behaviour_step: int, *, reduce: str = "sum"
) -> torch.Tensor:
    """Float64 sequence log weights of step ``step``'s micro-batches.

    Policy: the parameters at the start of ``step``; behaviour: the parameters
    at the start of ``behaviour_step`` (the step that generated the batch).
    ``reduce="mean"`` gives GSPO's per-token mean instead of the sum.
    """
    out = []
    for batch in rec.batches[step]:
        mask = batch["completion_mask"].double()
        diff = completion_logps64(rec.params[step], batch) - completion_logps64(
            rec.params[behaviour_step], batch
        )
        lw = (diff * mask).sum(-1)
        if reduce == "mean":
            lw = lw / mask.sum(-1).clamp(min=1)
        out.append(lw)
    return torch.cat(out)


def oracle_ess(lw: torch.Tensor) -> tuple[float, float]:
    r = effective_sample_size(log_weights=lw)
    return float(r.ess), float(r.ratio)


# ------------------------------------------------ use_opob: the per-sample oracle

IS_CAP = 8.0


class GradRecorder(Recorder):
    """``Recorder`` plus the gradient handed to the optimizer at each step."""

    def __init__(self) -> None:
        super().__init__()
        self.grads: list[dict[str, torch.Tensor]] = []

    def grad_callback(self) -> Any:
        from transformers import TrainerCallback

        rec = self

        class _Grad(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):  # type: ignore[no-untyped-def]
                model = kw["model"]
                grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
                rec.grads.append({n: g.detach().clone() for n, g in grads.items()})

        return _Grad()


def completion_logp(net: Any, batch: dict[str, Any]) -> torch.Tensor:
    """``[B, T]`` log-probs of the completion tokens by a plain forward of the micro-batch.

    The micro-batch is run as the trainer runs it (one padded batch): Qwen2's
    RMSNorm rounds to float32 even in a float64 model, so a different batch
    shape could change the rounding by an ulp of float32.
    """
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    t = batch["completion_ids"].shape[1]
    logits = net(input_ids=ids, attention_mask=att).logits[:, -t - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, batch["completion_ids"][..., None])[..., 0]


def oracle_net(params: dict[str, torch.Tensor], peft_config: Any = None) -> Any:
    net = model().double()
    if peft_config is not None:
        from peft import get_peft_model

        net = get_peft_model(net, peft_config)
    net.load_state_dict(params)
    net.eval()  # the tiny model has no dropout; eval only skips the train-mode recording paths
    return net


def opob_oracle(
    params: dict[str, torch.Tensor],
    behaviour: dict[str, torch.Tensor],
    rank_batches: list[list[dict[str, Any]]],
    *,
    loss_type: str,
    ga: int,
    spg: int,
    scope: str,
    norm_by_std: bool,
    clip: float | None = None,
    peft_config: Any = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 per-sample oracle of the gradient of one optimizer step of ``use_opob``.

    ``params``: the parameters the step started from; ``behaviour``: those the
    step's completions were generated with; ``rank_batches[r]``: the
    micro-batches rank ``r`` trained in the step (``steps_per_generation ==
    gradient_accumulation_steps``: the step is one generation batch).

    Per completion: its surrogate term (TRL's aggregation of ``loss_type``, the
    truncated importance weight from the parameters the batch was generated
    with), one backward, its reward recomputed from the decoded text; then
    ``n_i``, the baselines, ``1/std`` and the clip factors from those
    gradients, all in float64.
    """
    net, old = oracle_net(params, peft_config), oracle_net(behaviour, peft_config)
    named = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    trainable = [p for _, p in named]
    tok = tokenizer()
    world = len(rank_batches)
    batches = [b for rank in rank_batches for b in rank]
    gen_tokens = sum(float(b["completion_mask"].sum()) for b in batches)  # over all ranks
    grads, rewards, groups, lws = [], [], [], []
    for batch in batches:
        mask = batch["completion_mask"].double()
        b = mask.shape[0]
        logps = completion_logp(net, batch)
        with torch.no_grad():
            old_logps = completion_logp(old, batch)
        stored = batch.get("old_per_token_logps")
        for i in range(b):
            m, logp = mask[i], logps[i]
            length = float(m.sum())
            lw = float(((logp.detach() - old_logps[i]) * m).sum())
            if stored is not None:
                # TRL keeps the behaviour log-probs in float32: the weight the trainer must
                # use is the one from those; they are the behaviour policy's to float32.
                lw_trl = float(((logp.detach() - stored[i].double()) * m).sum())
                assert abs(lw_trl - lw) < 1e-4 * max(1.0, abs(lw))
                lw = lw_trl
            else:
                assert lw == 0.0  # on-policy: the same parameters
            w = math.exp(min(lw, math.log(IS_CAP)))
            if loss_type == "grpo":
                denom = max(length, 1.0) * b * ga
            elif loss_type == "bnpo":
                denom = max(float(mask.sum()), 1.0) * ga
            elif loss_type == "dr_grpo":
                denom = b * 8 * ga  # max_completion_length = 8
            else:  # dapo: num_items_in_batch (the generation batch's tokens) / world * ga / spg
                denom = gen_tokens / world * ga / spg
            l_i = -w * (logp * m).sum() / denom
            # one backward per completion
            g = torch.autograd.grad(l_i, trainable, allow_unused=True, retain_graph=True)
            grads.append(
                torch.cat(
                    [
                        (x if x is not None else torch.zeros_like(p)).flatten()
                        for x, p in zip(g, trainable)
                    ]
                )
            )
            ids = batch["completion_ids"][i][batch["completion_mask"][i].bool()]
            text = tok.decode(ids, skip_special_tokens=True)
            rewards.append(reward([text])[0])
            groups.append(int(batch["vcpo_groups"][i]))
            lws.append(lw)
    g = torch.stack(grads)  # [N, P]
    r = torch.tensor(rewards, dtype=torch.float64)
    gid = torch.tensor(groups) if scope == "group" else torch.zeros(len(groups), dtype=torch.long)
    n = (g * g).sum(1)
    c = torch.empty_like(r)
    for s in gid.unique():
        sel = gid == s
        ns, rs = n[sel], r[sel]
        base = (ns * rs).sum() / ns.sum()
        k = 1.0
        if norm_by_std:
            std = rs.std(unbiased=False)
            k = 0.0 if float(std) == 0.0 else 1.0 / std
        c[sel] = (rs - base) * k
    f = torch.ones_like(c)
    if clip is not None:
        f = torch.where(c == 0, f, torch.clamp(clip / (c.abs() * n.sqrt()), max=1.0))
        c = c * f
    flat = (c[:, None] * g).sum(0) / world  # DDP's averaging convention
    out, offset = {}, 0
    for name, p in zip(names, trainable):
        out[name] = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return out, r, torch.tensor(lws, dtype=torch.float64), f
