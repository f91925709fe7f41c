# syntax=docker/dockerfile:1
# The seqops serving image: `seqops serve` on onnxruntime, no torch (docs/architecture.md, principle 6).
#
#   docker build -f docker/serve.Dockerfile -t seqops-serve .                 # model from MLflow
#   docker build -f docker/serve.Dockerfile --build-arg EXTRAS=serve,gpu \
#       -t seqops-serve:cuda .                                               # CUDA provider
#   docker run -p 8000:8000 -e MLFLOW_TRACKING_URI=http://mlflow:5000 seqops-serve
#   docker build -f docker/serve.Dockerfile --target baked \
#       --build-arg MODEL_DIR=models/onnx -t seqops-serve:baked .            # model baked in
#   docker run -p 8000:8000 -v "$PWD/models/onnx:/models/seqops:ro" \
#       -e SEQOPS_MODEL=/models/seqops seqops-serve                           # model mounted
#
# On this machine (no Docker engine) `scripts/container-tools.sh serve` builds it with buildah
# on a locally made Debian base; see that script for the flags.
#
# Build arguments:
#   BASE_IMAGE      any Debian/Ubuntu-like image with python3 >= 3.11 and venv
#   EXTRAS          the package's extras: `serve` (default) is the slim CPU image (onnxruntime);
#                   `serve,gpu` swaps in onnxruntime-gpu with NVIDIA's CUDA/cuDNN pip wheels, for
#                   the CUDA provider on GPU hosts (requirements/deps.py: never both packages).
#   MODEL_DIR       (target `baked` only) an exported model directory inside the build context
#                   (encoder.onnx, step.onnx, model.json).
# Secret (optional): `pip_cert`, a CA bundle for pip when PyPI sits behind a TLS proxy; it is
# mounted only while pip runs and never stored in a layer.

ARG BASE_IMAGE=python:3.11-slim-bookworm

# --- deps: the dependencies in a venv, from pyproject + the lock only (cached until they change)
FROM ${BASE_IMAGE} AS deps
ARG EXTRAS=serve
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/constraints.txt requirements/deps.py requirements/
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/python requirements/deps.py "${EXTRAS}" > /tmp/requirements.txt; \
    /opt/venv/bin/pip install -c requirements/constraints.txt -r /tmp/requirements.txt

# --- wheel: the library (seqops) and the HTTP service (serve) as one wheel ------------------
FROM deps AS wheel
COPY LICENSE ./
COPY seqops ./seqops
COPY serve ./serve
COPY flows ./flows
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    /opt/venv/bin/pip wheel --no-deps -c requirements/constraints.txt -w /wheels .

# --- runtime: the base image, the venv, the package, a non-root user -------------------------
FROM ${BASE_IMAGE} AS runtime
LABEL org.opencontainers.image.title="seqops-serve" \
      org.opencontainers.image.description="seqops: count objects one at a time; HTTP serving on onnxruntime"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/seqops \
    SEQOPS_PORT=8000
# A fixed uid, so volume permissions can be planned; no login shell, no password.
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/seqops \
        --shell /usr/sbin/nologin seqops
# The big dependency layer first and on its own: a code change then rebuilds only the small
# layer below, not a second copy of onnxruntime.
COPY --from=deps /opt/venv /opt/venv
COPY --from=wheel /wheels /tmp/wheels
RUN set -eu; \
    /opt/venv/bin/pip install --no-deps --no-index /tmp/wheels/*.whl; \
    rm -rf /tmp/wheels; \
    /opt/venv/bin/python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch must not be in the serve image'"
USER seqops
WORKDIR /home/seqops
EXPOSE 8000
# Ready = model loaded and warmed (the server answers 200 on /v2/health/ready only then).
# Python's urllib, since the slim base has no curl; any non-2xx or refusal exits non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD python3 -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('SEQOPS_PORT', '8000'), timeout=4)"
# A shell only to expand the variables, then exec: `seqops serve` is PID 1 and gets SIGTERM
# (graceful shutdown). Arguments after the image name are appended (e.g. --workers 2).
ENTRYPOINT ["/bin/sh", "-c", "exec seqops serve --host 0.0.0.0 --port \"$SEQOPS_PORT\" --model \"$SEQOPS_MODEL\" \"$@\"", "seqops-serve"]
CMD []

# --- baked: the same image with an exported model copied in ----------------------------------
FROM runtime AS baked
ARG MODEL_DIR=models/onnx
COPY --chown=seqops:seqops ${MODEL_DIR} /models/seqops
ENV SEQOPS_MODEL=/models/seqops

# --- the default target: the model named by SEQOPS_MODEL at start -----------------------------
# The registry's champion (set MLFLOW_TRACKING_URI), or a mounted directory (-e SEQOPS_MODEL=...).
FROM runtime AS serve
ENV SEQOPS_MODEL=models:/seqops@champion
