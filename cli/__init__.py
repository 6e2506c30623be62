"""The ``radflow`` command: thin callers of flows and of the core library (``cli.main``)."""
