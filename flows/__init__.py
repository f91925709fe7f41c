"""Prefect flows of the seqops pipeline (a package: ``python -m flows.pipeline``)."""
