# syntax=docker/dockerfile:1
# An MLflow tracking server for the compose stack: Postgres backend, S3 (MinIO) artifacts.
# The mlflow version is the lock's, so clients and server agree.
# psycopg (3), not psycopg2: SQLAlchemy 2.1 reads a postgresql:// URL with it.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
COPY requirements/constraints.txt /tmp/constraints.txt
RUN --mount=type=secret,id=pip_cert \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install --no-cache-dir -c /tmp/constraints.txt mlflow "psycopg[binary]" boto3
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 5000
HEALTHCHECK --interval=10s --timeout=5s --retries=12 \
    CMD python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"
CMD ["sh", "-c", "exec mlflow server --host 0.0.0.0 --port 5000 --backend-store-uri \"$MLFLOW_BACKEND_STORE_URI\" --artifacts-destination \"$MLFLOW_ARTIFACTS_DESTINATION\" --serve-artifacts"]
