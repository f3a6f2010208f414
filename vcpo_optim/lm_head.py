r"""Memory-lean token log-probabilities: an LM head that never materialises ``[B, T, V]`` logits.

:class:`TokenLogProbs` maps hidden states ``h`` (``[B, T, d]``) and token ids
``y`` (``[B, T]``) to

.. math::

    z = (h W^\top + b) \cdot s, \qquad
    z' = c \tanh(z / c) \ \text{(if soft-capped)}, \qquad
    z'' = z' / \tau, \qquad
    \log p[b, t] = z''_{y} - \operatorname{logsumexp}_v z''_v

with ``W`` the ``[V, d]`` head weight (the model's ``lm_head`` / tied
embedding, the *same* Parameter object), ``b`` an optional ``[V]`` bias,
``s`` a logit scale (1 for most models; Cohere, Granite), ``c`` Gemma 2's
``final_logit_softcapping`` and ``tau`` the sampling temperature that RL
frameworks divide the logits by before the log-softmax (TRL, verl, vLLM apply
the model's soft-cap first, then the temperature).

The computation runs in blocks of at most ``chunk_size`` logits (tokens x
vocabulary, the vocabulary in slices of ``vocab_chunk``): the forward keeps a
running log-sum-exp per token, the backward recomputes each block of logits
from the saved ``h`` and the per-token log-sum-exp. Memory beyond the inputs
is ``O(B T)`` plus one block, instead of the ``O(B T V)`` of
``log_softmax(lm_head(h))`` (logits, their float32 copy, the log-softmax and
its gradient). The price is one more ``h W^T`` matmul in the backward (4 head
matmuls instead of 3).

Precision. The output is float32 (float64 when ``h`` or ``W`` is float64)
whatever the hidden dtype. The matmuls run in the *compute dtype*: under
``torch.autocast`` the autocast dtype (like ``nn.Linear`` under autocast),
otherwise the promoted dtype of ``h`` and ``W``. Each block of linear logits
is rounded to that dtype exactly as ``lm_head(h)`` would produce it, then
upcast; scale, soft-cap, temperature, log-sum-exp and the softmax gradient are
computed in float32 (float64). This is the plain path
``log_softmax(lm_head(h).float() / tau)``; where Hugging Face applies the
soft-cap in the logits' own dtype (bfloat16) we apply it in float32, which is
more accurate by about one bfloat16 rounding. In the backward the gradient of
the logits is rounded to the compute dtype (as autograd rounds it at the
``.float()`` cast of the plain path) and the two matmuls run in the compute
dtype; their results are accumulated in float32.

Per-sample gradients with OPOB (:mod:`vcpo_optim.opob`) are supported by a
dedicated rule (``vcpo_optim.opob.rules.lm_head``): hold the head as a
submodule of the model you give OPOB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

__all__ = ["HeadSpec", "TokenLogProbs"]


@dataclass(frozen=True)
class HeadSpec:
    """How one call forms its logits; shared by the forward, the backward and the OPOB rule.

    ``scale`` / ``softcap`` / ``temperature`` as in :class:`TokenLogProbs`;
    ``compute_dtype``: dtype of the matmuls (and of the rounding of the linear
    logits and of their gradient); ``acc_dtype``: float32 or float64, the
    softmax math; ``vocab_chunk`` / ``chunk_size``: block sizes;
    ``entropy``: the call also returned the entropy.
    """

    scale: float
    softcap: float | None
    temperature: float
    compute_dtype: torch.dtype
    acc_dtype: torch.dtype
    vocab_chunk: int
    chunk_size: int
    entropy: bool

    @property
    def rounds(self) -> bool:
        """Whether the compute dtype is narrower than the accumulation dtype."""
        return self.compute_dtype != self.acc_dtype

    def blocks(self, n_tokens: int, vocab: int) -> tuple[int, int]:
        """(token block, vocabulary block) with at most ``chunk_size`` logits per block."""
        vc = max(1, min(vocab, self.vocab_chunk, self.chunk_size))
        tc = max(1, self.chunk_size // vc)
        return min(tc, max(n_tokens, 1)), vc

    def rnd(self, x: Tensor) -> Tensor:
        """Round an accumulation-dtype tensor to the compute dtype (and back)."""
        return x.to(self.compute_dtype).to(self.acc_dtype) if self.rounds else x


# ----------------------------------------------------------------------------- shared math


def linear_logits(hc: Tensor, wc: Tensor, bc: Tensor | None, spec: HeadSpec) -> Tensor:
    """``h W^T + b`` for one block, operands in the compute dtype; result upcast to ``acc_dtype``.

    Rounded to the compute dtype exactly as ``F.linear`` (``nn.Linear`` under
    autocast) returns it.
    """
    z = torch.mm(hc, wc.t()) if bc is None else torch.addmm(bc, hc, wc.t())
    return z.to(spec.acc_dtype)


def transform(z: Tensor, spec: HeadSpec) -> tuple[Tensor, Tensor | float]:
    """``(z'', dz''/dz)`` from linear logits ``z`` (elementwise derivative, or a float).

    Works in place: ``z`` is consumed.
    """
    mult = spec.scale / spec.temperature
    if spec.softcap is None:
        return (z.mul_(mult) if mult != 1.0 else z), mult
    c = spec.softcap
    t = z.mul_(spec.scale / c).tanh_()
    dz = torch.mul(t, t).neg_().add_(1.0).mul_(mult)
    return t.mul_(c / spec.temperature), dz


def softmax_rows(
    z2: Tensor,
    dz: Tensor | float,
    lse: Tensor,
    ent: Tensor | None,
    g: Tensor,
    k: Tensor | None,
) -> Tensor:
    r"""The dense part ``r`` of ``u = dL/dz = g dz_y e_y - r`` for logits ``z2`` (``[..., n]``).

    ``r = (g p + k p (log p + H)) * dz`` with ``p = exp(z2 - lse)``; ``lse``,
    ``ent`` (entropy ``H``), ``g`` (gradient of the log-prob) and ``k``
    (gradient of the entropy) are per row (``[...]``). Works in place: ``z2``
    is consumed.
    """
    logp = z2.sub_(lse.unsqueeze(-1))
    if k is None:
        r = logp.exp_().mul_(g.unsqueeze(-1))
    else:
        assert ent is not None
        p = torch.exp(logp)
        r = p.mul_(logp.add_(ent.unsqueeze(-1)).mul_(k.unsqueeze(-1)).add_(g.unsqueeze(-1)))
    return r.mul_(dz) if isinstance(dz, Tensor) or dz != 1.0 else r


def compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The matmul dtype of a call: the autocast dtype under autocast, else the promoted dtype."""
    dev = hidden.device.type
    if (
        torch.is_autocast_enabled(dev)
        and hidden.dtype != torch.float64
        and weight.dtype != torch.float64
    ):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(hidden.dtype, weight.dtype)


# ----------------------------------------------------------------------------- autograd


def _forward_stats(
    hc: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, spec: HeadSpec
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(log-prob of ``y``, log-sum-exp, entropy or None) per token, by blocks over (vocab, tokens)."""
    n, acc = hc.shape[0], spec.acc_dtype
    vocab = weight.shape[0]
    dev = hc.device
    m = torch.full((n,), -math.inf, dtype=acc, device=dev)
    s1 = torch.zeros(n, dtype=acc, device=dev)
    s2 = torch.zeros(n, dtype=acc, device=dev) if spec.entropy else None
    tgt = torch.zeros(n, dtype=acc, device=dev)
    tc, vc = spec.blocks(n, vocab)
    cdt = spec.compute_dtype
    for v0 in range(0, vocab, vc):
        v1 = min(vocab, v0 + vc)
        wc = weight[v0:v1].to(cdt)
        bc = None if bias is None else bias[v0:v1].to(cdt)
        for t0 in range(0, n, tc):
            t1 = min(n, t0 + tc)
            z2, _ = transform(linear_logits(hc[t0:t1], wc, bc, spec), spec)
            yy = y[t0:t1]
            inside = (yy >= v0) & (yy < v1)
            zt = z2.gather(1, (yy - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)).squeeze(1)
            tgt[t0:t1] = torch.where(inside, zt, tgt[t0:t1])
            mo = m[t0:t1]
            mn = torch.maximum(mo, z2.amax(dim=1))
            a = torch.exp(mo - mn)  # 0 on the first block (mo = -inf)
            zs = z2.sub_(mn.unsqueeze(1))
            e = torch.exp(zs) if s2 is not None else zs.exp_()
            s1_old = s1[t0:t1]
            if s2 is not None:
                # S2 = sum e^{z - m} (z - m), rescaled to the new running max
                d = mo - mn
                prev = torch.where(s1_old > 0, s2[t0:t1] + d * s1_old, s2[t0:t1])
                s1[t0:t1] = a * s1_old + e.sum(dim=1)
                s2[t0:t1] = a * prev + e.mul_(zs).sum(dim=1)
            else:
                s1[t0:t1] = a * s1_old + e.sum(dim=1)
            m[t0:t1] = mn
    log_s1 = torch.log(s1)
    lse = m + log_s1
    ent = None if s2 is None else log_s1 - s2 / s1
    return tgt - lse, lse, ent


def _will_run(ctx: Any, i: int) -> bool:
    """Whether the gradient of input ``i`` is needed by the running backward pass.

    OPOB's single autograd pass stops at the module outputs, so the head
    weight's gradient (one ``V x d x N`` matmul) is not needed there.
    """
    if not ctx.needs_input_grad[i]:
        return False
    node = ctx.next_functions[i][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except Exception:  # a leaf queried inside autograd.grad, or an older torch: compute it
        return True


class _TokenLogProbsFn(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        h2: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        y: Tensor,
        spec: HeadSpec,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        dev = h2.device.type
        with torch.autocast(dev, enabled=False):
            logp, lse, ent = _forward_stats(h2.to(spec.compute_dtype), y, weight, bias, spec)
        ctx.spec = spec
        ctx.save_for_backward(h2, weight, bias, y, lse, ent)
        ctx.mark_non_differentiable(lse)
        return logp, lse, ent

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g_logp: Tensor | None, _g_lse: Any, g_ent: Tensor | None) -> Any:
        h2, weight, bias, y, lse, ent = ctx.saved_tensors
        spec: HeadSpec = ctx.spec
        need_h, need_w = _will_run(ctx, 0), _will_run(ctx, 1)
        need_b = bias is not None and _will_run(ctx, 2)
        if not (need_h or need_w or need_b):
            return None, None, None, None, None
        acc, cdt = spec.acc_dtype, spec.compute_dtype
        n, vocab = h2.shape[0], weight.shape[0]
        dev = h2.device
        g = torch.zeros(n, dtype=acc, device=dev) if g_logp is None else g_logp.to(acc).reshape(n)
        k = None if g_ent is None or not spec.entropy else g_ent.to(acc).reshape(n)
        # positions whose output gradient is zero (prompt, padding) contribute nothing: skip them
        active = g != 0 if k is None else (g != 0) | (k != 0)
        n_act = int(active.sum())
        rows = None
        if n_act < n:
            rows = active.nonzero().squeeze(1)
            h_all = h2
            h2, y, lse, g = h2[rows], y[rows], lse[rows], g[rows]
            ent = None if ent is None else ent[rows]
            k = None if k is None else k[rows]
            n = n_act
        with torch.autocast(dev.type, enabled=False):
            hc = h2.to(cdt)
            gh = torch.zeros(n, h2.shape[1], dtype=acc, device=dev) if need_h else None
            if need_w and n == 0:
                gw = torch.zeros_like(weight)
            else:
                gw = torch.empty_like(weight) if need_w else None
            gb = torch.zeros(vocab, dtype=acc, device=dev) if need_b else None
            tc, vc = spec.blocks(n, vocab)
            for v0 in range(0, vocab if n else 0, vc):
                v1 = min(vocab, v0 + vc)
                wc = weight[v0:v1].to(cdt)
                bc = None if bias is None else bias[v0:v1].to(cdt)
                gw_blk = (
                    torch.zeros(v1 - v0, h2.shape[1], dtype=acc, device=dev) if need_w else None
                )
                for t0 in range(0, n, tc):
                    t1 = min(n, t0 + tc)
                    z2, dz = transform(linear_logits(hc[t0:t1], wc, bc, spec), spec)
                    gg = g[t0:t1]
                    u = softmax_rows(
                        z2,
                        dz,
                        lse[t0:t1],
                        None if ent is None else ent[t0:t1],
                        gg,
                        k[t0:t1] if k is not None else None,
                    ).neg_()
                    yy = y[t0:t1]
                    inside = (yy >= v0) & (yy < v1)
                    col = (yy - v0).clamp(0, v1 - v0 - 1).unsqueeze(1)
                    dzy = dz.gather(1, col).squeeze(1) if isinstance(dz, Tensor) else dz
                    u.scatter_add_(1, col, (gg * dzy * inside.to(acc)).unsqueeze(1))
                    uc = u.to(cdt)
                    if gh is not None:
                        gh[t0:t1] += torch.mm(uc, wc)
                    if gw_blk is not None:
                        gw_blk += torch.mm(uc.t(), hc[t0:t1])
                    if gb is not None:
                        gb[v0:v1] += uc.to(acc).sum(dim=0)
                if gw is not None and gw_blk is not None:
                    gw[v0:v1] = gw_blk
        if gh is not None and rows is not None:
            gh = torch.zeros(h_all.shape, dtype=acc, device=dev).index_copy_(0, rows, gh)
        return (
            None if gh is None else gh.to(h2.dtype),
            gw,
            None if gb is None or bias is None else gb.to(bias.dtype),
            None,
            None,
        )


# ----------------------------------------------------------------------------- module


class TokenLogProbs(nn.Module):
    r"""Log-probabilities of given tokens under an LM head, without ``[B, T, V]`` logits.

    ``forward(hidden, tokens)`` returns ``logp[..] = log softmax(z'')[tokens[..]]``
    (see the module docstring for ``z''``), float32 (float64 for a float64
    model), shaped like ``tokens``. Gradients flow to ``hidden``, ``weight``
    and ``bias`` exactly as through the plain
    ``log_softmax(F.linear(hidden, weight, bias).float() * scale ...)``.

    Args:
        weight: the ``[V, d]`` head weight. Pass the model's own Parameter
            (``model.get_output_embeddings().weight``, tied to the input
            embedding or not): this module registers the same object, so
            optimizers, OPOB and state dicts see one parameter.
        bias: optional ``[V]`` head bias (the same Parameter as the model's).
        temperature: ``tau > 0``; logits are divided by it after the soft-cap
            (default 1.0). Use the sampling temperature for RL log-probs.
        softcap: ``c > 0`` or ``None``: ``z' = c tanh(z / c)`` (Gemma 2's
            ``final_logit_softcapping``). Default ``None``.
        scale: multiplier of ``h W^T + b`` before the soft-cap (default 1.0;
            Cohere's ``logit_scale``, ``1 / logits_scaling`` for Granite).
        vocab_chunk: vocabulary slice per block (default 8192).
        chunk_size: maximum logits per block, tokens x vocabulary slice
            (default ``2**22``, 16 MB in float32).

    ``forward(..., return_entropy=True)`` returns one tensor ``[..., 2]``:
    ``[..., 0]`` the log-probs, ``[..., 1]`` the entropy
    ``H = -sum_v p_v log p_v`` of the same distribution, both differentiable
    (use ``out.unbind(-1)``).

    Token ids must lie in ``[0, V)`` (clamp ignored positions such as labels
    ``-100`` to a valid id and mask their log-probs). The backward is
    ``once_differentiable``.
    """

    def __init__(
        self,
        weight: nn.Parameter,
        bias: nn.Parameter | None = None,
        *,
        temperature: float = 1.0,
        softcap: float | None = None,
        scale: float = 1.0,
        vocab_chunk: int = 8192,
        chunk_size: int = 1 << 22,
    ) -> None:
        super().__init__()
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
            raise TypeError(
                "TokenLogProbs: weight must be the model's [V, d] head nn.Parameter (e.g. "
                f"model.get_output_embeddings().weight), got {type(weight).__name__} "
                f"of shape {tuple(getattr(weight, 'shape', ()))}"
            )
        if bias is not None and (
            not isinstance(bias, nn.Parameter) or tuple(bias.shape) != (weight.shape[0],)
        ):
            raise TypeError(
                f"TokenLogProbs: bias must be an nn.Parameter of shape [{weight.shape[0]}], got "
                f"{type(bias).__name__} of shape {tuple(getattr(bias, 'shape', ()))}"
            )
        self.weight = weight
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias
        self.temperature = _positive("temperature", temperature)
        self.softcap = None if softcap is None else _positive("softcap", softcap)
        self.scale = _finite_nonzero("scale", scale)
        if int(vocab_chunk) < 1 or int(chunk_size) < 1:
            raise ValueError("TokenLogProbs: vocab_chunk and chunk_size must be >= 1")
        self.vocab_chunk = int(vocab_chunk)
        self.chunk_size = int(chunk_size)

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        s = f"vocab={self.vocab_size}, d={self.hidden_size}, bias={self.bias is not None}"
        s += f", temperature={self.temperature}"
        if self.softcap is not None:
            s += f", softcap={self.softcap}"
        if self.scale != 1.0:
            s += f", scale={self.scale}"
        return s

    def spec(self, hidden: Tensor, entropy: bool = False) -> HeadSpec:
        """The :class:`HeadSpec` of a call on ``hidden`` in the current autocast state."""
        cdt = compute_dtype(hidden, self.weight)
        return HeadSpec(
            scale=self.scale,
            softcap=self.softcap,
            temperature=self.temperature,
            compute_dtype=cdt,
            acc_dtype=torch.promote_types(cdt, torch.float32),
            vocab_chunk=self.vocab_chunk,
            chunk_size=self.chunk_size,
            entropy=entropy,
        )

    def forward(self, hidden: Tensor, tokens: Tensor, *, return_entropy: bool = False) -> Tensor:
        """Log-probs ``[*tokens.shape]`` (or ``[*tokens.shape, 2]`` with the entropy)."""
        w = self.weight
        if not isinstance(hidden, Tensor) or not hidden.is_floating_point():
            raise TypeError("TokenLogProbs: hidden must be a floating-point tensor [..., d]")
        if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.is_complex():
            raise TypeError("TokenLogProbs: tokens must be an integer tensor of token ids")
        if tokens.dtype == torch.bool:
            raise TypeError("TokenLogProbs: tokens must be integer token ids, got torch.bool")
        if hidden.dim() < 1 or hidden.shape[-1] != w.shape[1]:
            raise ValueError(
                f"TokenLogProbs: hidden has last dimension {tuple(hidden.shape)[-1:]}, the head "
                f"weight expects d={w.shape[1]}"
            )
        if tuple(hidden.shape[:-1]) != tuple(tokens.shape):
            raise ValueError(
                f"TokenLogProbs: tokens has shape {tuple(tokens.shape)} but hidden is "
                f"{tuple(hidden.shape)}; expected tokens of shape {tuple(hidden.shape[:-1])} "
                "(for next-token log-probs pass hidden[:, :-1] with input_ids[:, 1:])"
            )
        if hidden.device != w.device or tokens.device != w.device:
            raise ValueError(
                f"TokenLogProbs: hidden ({hidden.device}), tokens ({tokens.device}) and the head "
                f"weight ({w.device}) must be on the same device"
            )
        vocab = w.shape[0]
        y = tokens.reshape(-1).long()
        if y.numel() and bool(((y < 0) | (y >= vocab)).any()):
            lo, hi = int(y.min()), int(y.max())
            raise ValueError(
                f"TokenLogProbs: token ids must lie in [0, {vocab}), got values in [{lo}, {hi}]; "
                "clamp ignored positions (e.g. labels == -100) to a valid id and mask them"
            )
        spec = self.spec(hidden, bool(return_entropy))
        h2 = hidden.reshape(-1, w.shape[1])
        logp, lse, ent = _TokenLogProbsFn.apply(h2, w, self.bias, y, spec)
        shape = tuple(tokens.shape)
        out = logp.view(shape) if ent is None else torch.stack([logp, ent], dim=-1).view(*shape, 2)
        # what OPOB's rule needs besides the output gradient (read by opob_inputs)
        saved = (
            h2.detach().view(*shape, w.shape[1]),
            y.view(shape),
            lse.view(shape),
            spec,
            None if ent is None else ent.detach().view(shape),
        )
        out._opob_saved = saved  # type: ignore[attr-defined]
        return out

    def opob_inputs(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> tuple[Any, ...]:
        """What OPOB records for this call: ``(hidden, tokens, lse, spec, entropy)``.

        Hook protocol of :class:`vcpo_optim.opob.tape.Tape`: dimension 0 of the
        first entry is the sample.
        """
        saved = getattr(output, "_opob_saved", None)
        if saved is None:
            raise ValueError(
                "OPOB: TokenLogProbs output carries no record of its forward (was the module's "
                "forward replaced?)"
            )
        return saved

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        *,
        temperature: float = 1.0,
        scale: float | None = None,
        softcap: float | str | None = "config",
        **kwargs: Any,
    ) -> TokenLogProbs:
        """The lean head of a Hugging Face causal LM (duck-typed; ``transformers`` is not imported).

        Reads ``model.get_output_embeddings()`` (its ``weight`` and ``bias``,
        the model's own Parameters, tied or not) and, from ``model.config`` (or
        its text config), ``final_logit_softcapping`` (Gemma 2/3). Models that
        transform their logits in other ways are refused unless you pass the
        transformation: a config ``logit_scale`` (Cohere: logits are
        multiplied by it, pass ``scale=config.logit_scale``) or
        ``logits_scaling`` != 1 (Granite divides by it, pass
        ``scale=1 / config.logits_scaling``; other families multiply). Check
        any new family once with :meth:`check_against`.

        Args:
            model: a model with ``get_output_embeddings()``.
            temperature: the sampling temperature (default 1.0).
            scale: logit multiplier; ``None`` (default): 1, or refuse if the
                config declares a scale.
            softcap: ``"config"`` (default): the config's
                ``final_logit_softcapping``; or an explicit value / ``None``.
            **kwargs: ``vocab_chunk``, ``chunk_size``.
        """
        get = getattr(model, "get_output_embeddings", None)
        head = get() if callable(get) else None
        if head is None or not isinstance(getattr(head, "weight", None), nn.Parameter):
            raise ValueError(
                f"TokenLogProbs.from_model: {type(model).__name__} has no output embedding with a "
                "weight Parameter (get_output_embeddings()); build TokenLogProbs(weight, bias) "
                "from the head's Parameters instead"
            )
        w, bias = head.weight, getattr(head, "bias", None)
        if w.dim() != 2:
            raise ValueError(
                f"TokenLogProbs.from_model: the output embedding {type(head).__name__} has a "
                f"weight of shape {tuple(w.shape)}, not [V, d]"
            )
        extra = [n for n, p in head.named_parameters() if p is not w and p is not bias]
        if extra:
            raise ValueError(
                f"TokenLogProbs.from_model: the output embedding {type(head).__name__} has "
                f"parameters besides weight and bias ({extra[:4]}, e.g. a LoRA adapter on "
                "lm_head) that TokenLogProbs would ignore; leave lm_head out of the adapter's "
                "target modules or merge the adapter first"
            )
        cfgs = _configs(model)
        if softcap == "config":
            cap = _first(cfgs, "final_logit_softcapping")
            softcap = None if cap is None else float(cap)
        if scale is None:
            ls = _first(cfgs, "logit_scale")
            lsc = _first(cfgs, "logits_scaling")
            if ls is not None or (lsc is not None and float(lsc) != 1.0):
                what = f"logit_scale={ls}" if ls is not None else f"logits_scaling={lsc}"
                raise ValueError(
                    f"TokenLogProbs.from_model: the config of {type(model).__name__} declares "
                    f"{what}, a logit transformation whose direction differs between families "
                    "(Cohere multiplies by logit_scale, Granite divides by logits_scaling). Pass "
                    "scale= explicitly (the factor the model multiplies its logits by) and check "
                    "it with head.check_against(model, input_ids)."
                )
            scale = 1.0
        return cls(
            w,
            bias if isinstance(bias, nn.Parameter) else None,
            temperature=temperature,
            softcap=softcap,  # type: ignore[arg-type]
            scale=scale,
            **kwargs,
        )

    @torch.no_grad()
    def check_against(
        self, model: nn.Module, input_ids: Tensor, tol: float = 1e-4, **model_kwargs: Any
    ) -> float:
        """Compare with the model's own logits on ``input_ids``; raise if they disagree.

        Runs ``model(input_ids, **model_kwargs)`` once, captures the input of
        ``model.get_output_embeddings()`` with a forward hook, and compares
        ``self(h, input_ids)`` with ``log_softmax(logits / temperature)`` at
        the same tokens. Returns the largest absolute difference; raises
        ``ValueError`` above ``tol`` (the model computes its logits in a way
        this head does not reproduce: a scale, a cap, a bias). Use float32 or
        float64 and no autocast for a tight check.
        """
        head = model.get_output_embeddings()  # type: ignore[operator]
        seen: list[Tensor] = []
        handle = head.register_forward_hook(lambda m, a, o: seen.append(a[0]))
        try:
            out = model(input_ids, **model_kwargs)
        finally:
            handle.remove()
        logits = out.logits if hasattr(out, "logits") else out[0]
        if not seen or seen[-1].shape[:-1] != logits.shape[:-1]:
            raise ValueError(
                "TokenLogProbs.check_against: could not capture the hidden states of every logit "
                "position (pass logits_to_keep=0 or use a model whose head sees all positions)"
            )
        h = seen[-1]
        if tuple(h.shape[:-1]) != tuple(input_ids.shape):
            raise ValueError(
                "TokenLogProbs.check_against: the head saw hidden states of shape "
                f"{tuple(h.shape)} for input_ids {tuple(input_ids.shape)} (pass logits_to_keep=0)"
            )
        ids = input_ids
        ref = torch.log_softmax(logits.to(self.spec(h).acc_dtype) / self.temperature, dim=-1)
        ref = ref.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        err = float((self(h, ids) - ref).abs().max())
        if not err <= tol:
            raise ValueError(
                f"TokenLogProbs.check_against: log-probs differ from the model's by {err:.3g} "
                f"(> {tol:g}); the model transforms its logits in a way not configured here "
                "(scale, softcap, bias?)"
            )
        return err


def _positive(name: str, v: float) -> float:
    v = float(v)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"TokenLogProbs: {name} must be a finite number > 0, got {v}")
    return v


def _finite_nonzero(name: str, v: float) -> float:
    v = float(v)
    if not (math.isfinite(v) and v != 0):
        raise ValueError(f"TokenLogProbs: {name} must be finite and nonzero, got {v}")
    return v


def _configs(model: nn.Module) -> list[Any]:
    cfg = getattr(model, "config", None)
    if cfg is None:
        return []
    out = [cfg]
    get_text = getattr(cfg, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:
            text = None
        if text is not None and text is not cfg:
            out.append(text)
    return out


def _first(cfgs: list[Any], name: str) -> Any:
    for c in cfgs:
        v = getattr(c, name, None)
        if v is not None:
            return v
    return None
