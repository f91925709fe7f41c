"""The HTTP service around the predictor: ``seqops serve``.

``create_app(settings)`` builds the FastAPI app (simple API, KServe v2, health, metrics);
``ServeSettings`` holds what ``seqops serve``'s flags set.
"""

from serve.app import create_app
from serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
