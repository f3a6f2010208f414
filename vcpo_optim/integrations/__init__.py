"""Integrations with training frameworks, one module per framework.

Each submodule imports its framework when it is imported, never before:
``import vcpo_optim`` (and this package) imports no optional dependency.

- :mod:`vcpo_optim.integrations.trl`: ``VCPOGRPOTrainer``, a drop-in
  ``trl.GRPOTrainer``.
- :mod:`vcpo_optim.integrations.verl`: the ``optimizer_impl`` module verl's
  ``build_optimizer`` imports by config (feeds the FSDP engine's log weights).
"""
