"""Factored per-sample gradients and the rule registry.

A *rule* is a pure function ``rule(module, inputs, grad_output) -> {name: factor}``.
``inputs`` are the (detached) tensor arguments the module was called with:
the positional ones in order, then the keyword ones in the order given
(non-tensor arguments are left out; a rule that needs them reads them from the
module). ``grad_output`` is the gradient of ``sum_i l_i`` with respect to the
module's output. Dimension 0 of ``inputs[0]`` and of ``grad_output`` is the
sample index ``i``; OPOB checks it for ``inputs[0]``, the rule for the others. The rule
returns, for each of the module's own trainable parameters (keyed by local
name, e.g. ``"weight"``), the per-sample gradient of that parameter in one of
these factored forms:

* :class:`Outer` -- ``G_i = sum_t g[i, t]^T a[i, t]`` (Linear, convolution
  after im2col), optionally block-diagonal over ``nb`` blocks (grouped conv);
* :class:`Rows` -- ``G_i[v] = sum_t [idx[i, t] == v] g[i, t]`` (Embedding);
* :class:`Dense` -- the materialised ``[B, *param.shape]`` tensor (norms,
  biases, the vmap fallback);
* :class:`Softmax` -- ``G_i = sum_t u[i, t]^T h[i, t]`` for the weight of the
  memory-lean LM head (:class:`vcpo_optim.lm_head.TokenLogProbs`), with ``u``
  recomputed in vocabulary blocks, never stored.

The norm engine (:mod:`vcpo_optim.opob.engine`) turns these into per-sample
squared norms -- summing the factors of a parameter used several times before
the norm, so tied weights are exact -- and into the reweighted gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

__all__ = [
    "RULES",
    "Dense",
    "Factor",
    "Outer",
    "Rows",
    "Rule",
    "Softmax",
    "get_rule",
    "register_rule",
]


@dataclass
class Outer:
    """``G_i = sum_t g[i, t, j]^T a[i, t, j]`` for each block ``j``.

    ``a``: ``[B, T, nb, k]``, ``g``: ``[B, T, nb, m]``; the parameter viewed as
    ``[nb, m, k]`` receives ``G_i``.
    """

    a: Tensor
    g: Tensor

    @property
    def batch(self) -> int:
        return self.g.shape[0]


@dataclass
class Rows:
    """``G_i[v, :] = sum_t [idx[i, t] == v] g[i, t, :]`` for a ``[V, d]`` parameter.

    ``idx``: ``[B, T]`` (int64), ``g``: ``[B, T, d]``. Positions that must not
    contribute (``padding_idx``) have ``g`` set to zero by the rule.
    """

    idx: Tensor
    g: Tensor
    num_rows: int

    @property
    def batch(self) -> int:
        return self.g.shape[0]


@dataclass
class Dense:
    """The materialised per-sample gradient, ``G``: ``[B, *param.shape]``."""

    G: Tensor

    @property
    def batch(self) -> int:
        return self.G.shape[0]


@dataclass
class Softmax:
    """``G_i = sum_t u[i, t]^T h[i, t]`` for the ``[V, d]`` weight of a log-softmax LM head.

    ``u[i, t] = dL/dz[i, t]`` is the gradient of the head's linear logits, a
    dense ``V``-vector that is never stored: it is recomputed in vocabulary
    blocks from the hidden states ``h`` (``[B, T, d]``), the token ids ``y``,
    the per-token log-sum-exp ``lse`` (and entropy ``ent``), the gradients of
    the log-prob ``g`` and of the entropy ``k`` (all ``[B, T]``; positions
    with ``g = k = 0`` contribute nothing), the detached ``weight`` / ``bias``
    and the call's :class:`vcpo_optim.lm_head.HeadSpec` (``spec``). Produced by
    :class:`vcpo_optim.lm_head.TokenLogProbs`; the norm math is in
    :mod:`vcpo_optim.opob.rules.lm_head`.
    """

    h: Tensor
    y: Tensor
    lse: Tensor
    ent: Tensor | None
    g: Tensor
    k: Tensor | None
    weight: Tensor
    bias: Tensor | None
    spec: Any

    @property
    def batch(self) -> int:
        return self.g.shape[0]


Factor = Outer | Rows | Dense | Softmax
Rule = Callable[[nn.Module, tuple[Tensor, ...], Tensor], dict[str, Factor]]

RULES: dict[type[nn.Module], Rule] = {}


def register_rule(*module_types: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Register ``rule`` as the per-sample gradient rule for ``module_types``.

    Lookup is by exact type (a subclass with its own ``forward`` must register
    its own rule), like Opacus's ``register_grad_sampler``::

        @register_rule(MyLinear)
        def my_linear(module, inputs, grad_output):
            ...
            return {"weight": Outer(a, g)}
    """

    def decorator(fn: Rule) -> Rule:
        for t in module_types:
            RULES[t] = fn
        return fn

    return decorator


def get_rule(module: nn.Module) -> Rule | None:
    """The rule registered for ``type(module)`` (exact type), or ``None``."""
    return RULES.get(type(module))
