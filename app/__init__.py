"""olora-serve: the HTTP server (FastAPI) and its engine (`app.engine`, no web framework imports)."""

__version__ = "0.1.0"
