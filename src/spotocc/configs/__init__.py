"""Presets: one module per published setting, each with ``config() -> Config``.

``spotocc.config.get_config(name)`` loads them by module name.
"""
