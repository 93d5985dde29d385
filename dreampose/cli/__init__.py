"""``python -m dreampose``: one module per command; :mod:`~dreampose.cli.main` dispatches. The only layer
allowed function-local imports (``--help`` stays instant)."""
