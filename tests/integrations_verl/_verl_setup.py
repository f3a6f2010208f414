"""Real verl 0.9.1 on the CPU: platform, process group, tiny model, configs and batches.

Everything here drives verl's own code. Two pieces of scaffolding are needed
because verl 0.9.1 ships no CPU platform and its engine expects
``torch.distributed`` to be up:

- :class:`CPUPlatform` implements verl's platform plugin interface
  (``verl.plugin.platform.PlatformBase``, installed with ``set_platform``, the
  documented extension point) for the CPU: device name ``"cpu"``, gloo;
- :func:`init_process_group` starts a one-process gloo group.

The engine is ``FSDPEngineWithLMHead`` with the FSDP2 strategy (FSDP1 refuses CPU
parameters with ``sync_module_states=True``), built from verl's own
``ppo_trainer.yaml`` composed with hydra, exactly as verl's
``ActorRolloutRefWorker.init_model`` derives its configs.
"""

from __future__ import annotations

import os
import socket
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

# verl picks its platform on first use: install the CPU one before anything asks.
from verl.plugin.platform import platform_manager as _pm
from verl.plugin.platform.platform_base import PlatformBase

#: The two config lines of the README, plus an ESS setting through the "+" prefix.
VCPO_OVERRIDES = [
    "actor_rollout_ref.actor.optim.optimizer_impl=vcpo_optim.integrations.verl",
    "actor_rollout_ref.actor.optim.optimizer=VCPOAdamW",
    "+actor_rollout_ref.actor.optim.override_optimizer_config.base_ess_ratio=0.9",
]

TORCH_OVERRIDES = [
    "actor_rollout_ref.actor.optim.optimizer_impl=torch.optim",
    "actor_rollout_ref.actor.optim.optimizer=AdamW",
]


class CPUPlatform(PlatformBase):
    """verl's platform interface for the CPU (verl 0.9.1 has none)."""

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return torch.cpu

    def is_available(self) -> bool:
        return True

    def current_device(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        pass

    def synchronize(self, device_index: int | None = None) -> None:
        pass

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        pass

    def empty_cache(self) -> None:
        pass

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return (None, None)

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str) -> Any:
        yield

    def profiler_start(self) -> None:
        pass

    def profiler_stop(self) -> None:
        pass

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


_pm.set_platform(CPUPlatform())
# torch.cpu has no memory statistics; verl's memory logging asks for them.
for _name in ("memory_allocated", "memory_reserved", "max_memory_allocated", "max_memory_reserved"):
    if not hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, lambda *a, **k: 0)
if not hasattr(torch.cpu, "mem_get_info"):
    torch.cpu.mem_get_info = lambda *a, **k: (0, 0)


def init_process_group() -> None:
    """One-process gloo group (the FSDP engine all-reduces token counts over it)."""
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
    )


def save_tiny_model(path: Path, seed: int = 0) -> None:
    """A random 2-layer Qwen2 (about 23k parameters), saved with save_pretrained."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).save_pretrained(path)


def compose(model_path: Path, overrides: list[str], *, remove_padding: bool = False) -> Any:
    """verl's ppo_trainer.yaml with hydra, for the tiny model on the CPU."""
    import verl
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        return hydra_compose(
            "ppo_trainer",
            overrides=[
                f"actor_rollout_ref.model.path={model_path}",
                "+actor_rollout_ref.model.load_tokenizer=false",
                "+actor_rollout_ref.model.override_config.attn_implementation=eager",
                f"actor_rollout_ref.model.use_remove_padding={remove_padding}",
                "actor_rollout_ref.model.enable_gradient_checkpointing=false",
                "actor_rollout_ref.actor.strategy=fsdp2",
                "actor_rollout_ref.actor.use_torch_compile=false",
                "actor_rollout_ref.actor.ppo_mini_batch_size=4",
                "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                "actor_rollout_ref.actor.optim.lr=0.01",
                "+actor_rollout_ref.actor.fsdp_config.mixed_precision.param_dtype=fp32",
                *overrides,
            ],
        )


@dataclass
class Actor:
    engine: Any
    loss_fn: Any
    config: Any


def build_actor(cfg: Any, *, micro_batch_size: int = 2) -> Actor:
    """The actor's FSDP engine and ppo_loss, configured as ActorRolloutRefWorker.init_model does."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead
    from verl.workers.utils.losses import ppo_loss

    init_process_group()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
        actor_config = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
        actor_config.model_config = model_config
        engine_config = actor_config.engine
        engine_config.use_dynamic_bsz = False
        engine_config.micro_batch_size_per_gpu = micro_batch_size
        engine_config.infer_micro_batch_size_per_gpu = micro_batch_size
        engine_config.use_remove_padding = model_config.use_remove_padding
        engine = FSDPEngineWithLMHead(
            model_config=model_config,
            engine_config=engine_config,
            optimizer_config=actor_config.optim,
            checkpoint_config=actor_config.checkpoint,
        )
        engine.initialize()
    return Actor(engine=engine, loss_fn=partial(ppo_loss, config=actor_config), config=actor_config)


def make_batch(
    *,
    prompt_lens: list[int],
    response_lens: list[int],
    seed: int,
    vocab: int = 64,
    hole: bool = True,
) -> dict[str, torch.Tensor]:
    """A left/right-padded rollout batch in verl's layout (before ``left_right_2_no_padding``).

    ``prompts`` are left-padded to P, ``responses`` right-padded to R. With
    ``hole`` the second response token of sequence 0 is outside
    ``response_mask`` (as a tool-output token of a multi-turn rollout is).
    """
    g = torch.Generator().manual_seed(seed)
    b = len(prompt_lens)
    p, r = max(prompt_lens), max(response_lens)
    prompts = torch.zeros(b, p, dtype=torch.long)
    responses = torch.zeros(b, r, dtype=torch.long)
    attention = torch.zeros(b, p + r, dtype=torch.long)
    for i, (pl, rl) in enumerate(zip(prompt_lens, response_lens)):
        prompts[i, p - pl :] = torch.randint(1, vocab, (pl,), generator=g)
        responses[i, :rl] = torch.randint(1, vocab, (rl,), generator=g)
        attention[i, p - pl : p + rl] = 1
    response_mask = attention[:, p:].clone()
    if hole:
        response_mask[0, 1] = 0
    position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
    return {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "advantages": torch.randn(b, 1, generator=g).expand(b, r).contiguous() * response_mask,
    }


def to_engine_batch(
    tensors: dict[str, torch.Tensor], engine: Any, *, global_batch_size: int
) -> Any:
    """What verl's trainer and TrainingWorker.train_batch hand to ``engine.train_batch``."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    b = next(iter(tensors.values())).shape[0]
    td = TensorDict({k: v.clone() for k, v in tensors.items()}, batch_size=[b])
    td = left_right_2_no_padding(td)
    ec = engine.engine_config
    tu.assign_non_tensor(
        td,
        temperature=1.0,
        calculate_entropy=False,
        global_batch_size=global_batch_size,
        compute_loss=True,
        use_remove_padding=engine.model_config.use_remove_padding,
        use_dynamic_bsz=ec.use_dynamic_bsz,
        max_token_len_per_gpu=ec.max_token_len_per_gpu,
        micro_batch_size_per_gpu=ec.micro_batch_size_per_gpu,
        use_fused_kernels=False,
    )
    return td


def reference_log_probs(model_path: Path, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(response token) of each sequence, one unpadded forward per sequence (float64 [B, R]).

    The independent oracle: a fresh Hugging Face model loaded from the same
    files, no verl code, no batching.
    """
    from transformers import Qwen2ForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Qwen2ForCausalLM.from_pretrained(model_path, attn_implementation="eager").eval()
    prompts, responses = tensors["prompts"], tensors["responses"]
    attention = tensors["attention_mask"]
    p = prompts.shape[1]
    out = torch.zeros(responses.shape, dtype=torch.float64)
    with torch.no_grad():
        for i in range(prompts.shape[0]):
            pl = int(attention[i, :p].sum())
            rl = int(attention[i, p:].sum())
            ids = torch.cat([prompts[i, p - pl :], responses[i, :rl]])
            logits = model(ids[None]).logits[0].to(torch.float64)
            logp = torch.log_softmax(logits, dim=-1)
            # response token t sits at position pl + t and is predicted at pl + t - 1
            tokens = responses[i, :rl]
            out[i, :rl] = logp[pl - 1 : pl - 1 + rl].gather(-1, tokens[:, None])[:, 0]
    return out


def params_of(engine: Any) -> dict[str, torch.Tensor]:
    """Full (unsharded) parameters of the engine's FSDP2 module, cloned."""
    out = {}
    for name, p in engine.module.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = t.detach().clone()
    return out
