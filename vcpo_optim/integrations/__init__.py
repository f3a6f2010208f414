"""Integrations with training frameworks.

Each submodule imports its framework lazily (only when the submodule itself is
imported); this package imports nothing.
"""
