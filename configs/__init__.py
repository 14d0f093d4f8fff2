"""Experiment configs: one ``get_config(arg)`` per file (see ``default.py`` for every key)."""
