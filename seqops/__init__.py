"""seqops: count objects one at a time, and the MLOps pipeline around the network."""

__version__ = "0.1.0"  # the one place: pyproject.toml reads it (dynamic version)
