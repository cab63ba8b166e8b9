"""``spotocc <command>``: one module per command, each with ``add_arguments(parser)`` and ``main(args)``.

:mod:`spotocc.cli` dispatches to them and imports a command's module only when that command runs.
They parse arguments and call library code (``engine``, ``data``, ``benchmarking``, ...); nothing
outside this package imports them.
"""
