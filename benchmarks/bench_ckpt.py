"""OPOB under activation checkpointing: peak memory and time against plain training.

A Hugging Face Qwen2 causal LM built from its config (no download): width 256,
8 layers, 4 heads (2 KV heads), MLP 1024, vocab 4096, tied input/output
embeddings, sdpa attention; B=16 sequences of T=128 tokens, per-sample loss
``l_i = -w_i * sum_t log pi(y_t)``, prompt groups of 8, random rewards
(the configuration of issue 9's table). Contenders, side by side in one process
on identical copies of the model:

* ``plain``: batched forward + ``sum_i l_i`` backward (no norms at all);
* ``OPOB``: batched forward + ``OPOB.backward`` (norms, baselines,
  ``sum_i c_i grad l_i``), default ``checkpointing="auto"``;
* ``OPOB held``: ``OPOB(..., checkpointing=False)``: the inputs of checkpointed
  modules held on the tape, one pass (what OPOB did before: the issue's 353 MB);

each without and with ``model.gradient_checkpointing_enable()`` (non-reentrant,
the transformers 5 default).

Time: median CPU time of this process (``time.process_time``; wall-clock on CUDA, kept
in the json on CPU) of forward + backward (+ norms and the gradient write)
over repeats, contenders interleaved in every repeat, 1 thread. Peak memory:
bytes allocated by PyTorch during the call above what existed before it
(parameters; ``.grad`` is ``None`` at the start), from the PyTorch profiler's
allocation timeline in a separate untimed run (CPU has no allocator peak
counter and ``tracemalloc`` does not see torch's allocations); on CUDA from
``torch.cuda.max_memory_allocated``. Also checked: OPOB's gradient with
checkpointing equals OPOB's without (float32).

    python benchmarks/bench_ckpt.py                 # CPU, 1 thread; writes benchmarks/results/
    python benchmarks/bench_ckpt.py --device cuda
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_opob import peak_bytes

from vcpo_optim.opob import OPOB

RESULTS = Path(__file__).resolve().parent / "results"
GROUP = 8


def build(args: argparse.Namespace, dev: torch.device) -> nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    cfg = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.width,
        intermediate_size=args.mlp,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max(256, args.T),
        pad_token_id=0,
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return transformers.Qwen2ForCausalLM(cfg).to(dev).train()


def rmsnorm_rule() -> str:
    """The Qwen2RMSNorm rule: the library's, or (before the transformers rules) a minimal one.

    ``Qwen2RMSNorm``: ``y = w * (x / sqrt(mean(x^2) + eps))`` (in float32, cast back), so
    per sample ``grad_w_i = sum_t g[i, t] * x_hat[i, t]``: a ``Dense`` factor. Registered
    only if no rule covers the class, and named in the results.
    """
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from vcpo_optim.opob.rules import Dense, get_rule, register_rule

    probe = Qwen2RMSNorm(4)
    if get_rule(probe) is not None:
        return "built-in"

    @register_rule(Qwen2RMSNorm)
    def qwen2_rms_norm(module: nn.Module, inputs: tuple[Tensor, ...], grad_output: Tensor) -> Any:
        x = inputs[0].float()
        xh = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)).to(
            inputs[0].dtype
        )
        b, d = x.shape[0], x.shape[-1]
        return {"weight": Dense((grad_output.float() * xh.float()).reshape(b, -1, d).sum(1))}

    return "benchmark's own (no built-in rule for Qwen2RMSNorm in this checkout)"


def per_sample_loss(model: nn.Module, ids: Tensor, w: Tensor) -> Tensor:
    logits = model(input_ids=ids).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(w * logp.sum(-1))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--B", type=int, default=16)
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)

    base = build(args, dev)
    norm_rule = rmsnorm_rule()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (args.B, args.T), generator=g).to(dev)
    w = (0.5 + torch.rand(args.B, generator=g)).to(dev)
    r = torch.randn(args.B, generator=g).to(dev)
    groups = (torch.arange(args.B) // GROUP).to(dev)

    calls: dict[str, tuple[nn.Module, Callable[[], Any]]] = {}
    for ckpt in (False, True):
        for kind in ("plain", "opob", "opob_held"):
            if kind == "opob_held" and not ckpt:
                continue  # identical to "opob" without checkpointing
            m = copy.deepcopy(base)
            if ckpt:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # renamed in transformers 5
                    m.gradient_checkpointing_enable()
            name = f"{kind}{'_ckpt' if ckpt else ''}"
            if kind == "plain":

                def call(m: nn.Module = m) -> Any:
                    per_sample_loss(m, ids, w).sum().backward()

            else:
                opob = OPOB(m, checkpointing=kind == "opob")

                def call(m: nn.Module = m, opob: OPOB = opob) -> Any:
                    return opob.backward(per_sample_loss(m, ids, w), r, groups)

            calls[name] = (m, call)

    def run(name: str) -> Any:
        m, fn = calls[name]
        for p in m.parameters():
            p.grad = None
        out = fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return out

    # exactness: OPOB with checkpointing against OPOB without (and the held variant)
    checks: dict[str, float] = {}
    ref_res = run("opob")
    ref = torch.cat([p.grad.reshape(-1) for p in calls["opob"][0].parameters()])
    for name in ("opob_ckpt", "opob_held_ckpt"):
        res = run(name)
        got = torch.cat([p.grad.reshape(-1) for p in calls[name][0].parameters()])
        checks[f"{name}_grad_rel_err"] = float((got - ref).norm() / ref.norm())
        checks[f"{name}_norm_rel_err"] = float(
            (res.sq_norms - ref_res.sq_norms).norm() / ref_res.sq_norms.norm()
        )

    # CPU: process time (one compute thread), robust to other jobs on a shared machine;
    # wall-clock is kept in the json. CUDA: wall-clock after a synchronize.
    clock = time.process_time if dev.type == "cpu" else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in calls}
    walls: dict[str, list[float]] = {k: [] for k in calls}
    for k in calls:
        run(k)  # warm-up
    for _ in range(args.reps):
        for k in calls:
            t0, w0 = clock(), time.perf_counter()
            run(k)
            times[k].append(clock() - t0)
            walls[k].append(time.perf_counter() - w0)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem: dict[str, float] = {}
    for k in calls:
        for p in calls[k][0].parameters():
            p.grad = None
        mem[k] = peak_bytes(lambda k=k: run(k), dev) / 2**20

    res = {
        "time_s": med,
        "wall_s": {k: statistics.median(v) for k, v in walls.items()},
        "peak_mem_MB": mem,
        "ratios": {
            "time_opob_over_plain": med["opob"] / med["plain"],
            "time_opob_ckpt_over_plain_ckpt": med["opob_ckpt"] / med["plain_ckpt"],
            "mem_opob_over_plain": mem["opob"] / mem["plain"],
            "mem_opob_ckpt_over_plain_ckpt": mem["opob_ckpt"] / mem["plain_ckpt"],
            "mem_opob_held_ckpt_over_plain_ckpt": mem["opob_held_ckpt"] / mem["plain_ckpt"],
        },
        "checks": checks,
    }
    meta = {
        "command": "python benchmarks/bench_ckpt.py " + " ".join(sys.argv[1:]),
        "config": {k: getattr(args, k) for k in ("B", "T", "width", "layers", "mlp", "vocab")},
        "device": args.device,
        "threads": args.threads,
        "reps": args.reps,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "params_M": sum(p.numel() for p in base.parameters()) / 1e6,
        "rmsnorm_rule": norm_rule,
    }
    print(json.dumps(res, indent=1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = f"bench_ckpt_{args.device}"
    (RESULTS / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "results": res}, indent=1) + "\n"
    )
    (RESULTS / f"{stem}.md").write_text(render(meta, res))
    print(render(meta, res))


def render(meta: dict[str, Any], res: dict[str, Any]) -> str:
    c, t, m, q = meta["config"], res["time_s"], res["peak_mem_MB"], res["ratios"]
    lines = [
        "# OPOB under activation checkpointing",
        "",
        f"Qwen2 (transformers, built from its config): width {c['width']}, {c['layers']} layers, "
        f"MLP {c['mlp']}, vocab {c['vocab']}, tied embeddings, sdpa; B={c['B']}, T={c['T']}; "
        f"{meta['device']}, {meta['threads']} thread(s), torch {meta['torch']}, "
        f"median {'CPU (process) time' if meta['device'] == 'cpu' else 'wall-clock'} of "
        f"{meta['reps']} interleaved repeats. Peak memory: MB allocated by torch during "
        "forward + backward above the parameters (profiler allocation timeline on CPU). "
        f"Command: `{meta['command']}`. Qwen2RMSNorm rule: {meta['rmsnorm_rule']}.",
        "",
        "| | no checkpointing | with checkpointing |",
        "|---|---|---|",
        f"| plain, peak MB | {m['plain']:.0f} | {m['plain_ckpt']:.0f} |",
        f"| OPOB, peak MB | {m['opob']:.0f} | {m['opob_ckpt']:.0f} |",
        f"| OPOB held (`checkpointing=False`), peak MB | | {m['opob_held_ckpt']:.0f} |",
        f"| plain, time s | {t['plain']:.3f} | {t['plain_ckpt']:.3f} |",
        f"| OPOB, time s | {t['opob']:.3f} | {t['opob_ckpt']:.3f} |",
        f"| OPOB held, time s | | {t['opob_held_ckpt']:.3f} |",
        "",
        f"OPOB / plain: memory {q['mem_opob_over_plain']:.2f}x without checkpointing, "
        f"**{q['mem_opob_ckpt_over_plain_ckpt']:.2f}x with** (held: "
        f"{q['mem_opob_held_ckpt_over_plain_ckpt']:.2f}x); time "
        f"{q['time_opob_over_plain']:.2f}x without, {q['time_opob_ckpt_over_plain_ckpt']:.2f}x with "
        "(two passes: one more backward and recomputation).",
        "",
        "OPOB with checkpointing against OPOB without (float32): gradient rel. error "
        f"{res['checks']['opob_ckpt_grad_rel_err']:.1e}, norms "
        f"{res['checks']['opob_ckpt_norm_rel_err']:.1e}.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
