# syntax=docker/dockerfile:1
# The seqops training image: the whole pipeline (DVC stages, MLflow, Prefect) with CUDA torch.
#
#   docker build -f docker/train.Dockerfile -t seqops-train .
#   docker run --gpus all -v "$PWD:/workspace" seqops-train                 # dvc repro
#   docker run --gpus all -v "$PWD:/workspace" -e MLFLOW_TRACKING_URI=http://mlflow:5000 \
#       seqops-train seqops train --set train.epochs=3                     # one stage by hand
#   docker run -v "$PWD:/workspace" seqops-train python -m flows.pipeline   # the Prefect flow
#
# Where CUDA comes from: `pip install torch==2.13.0` from PyPI is the CUDA build on Linux and
# brings CUDA and cuDNN as NVIDIA's pip wheels (nvidia-*). So the base needs no CUDA toolkit:
# the default is a plain Python 3.11 image, and the GPU driver comes from the host through the
# NVIDIA container toolkit (`--gpus all`, or CDI `--device nvidia.com/gpu=all` with podman),
# which the NVIDIA_* variables below ask for. An nvidia/cuda:*-cudnn-runtime base would only
# add a second copy of the same libraries (several GB) and lacks Python; pytorch/pytorch ships
# its own torch, which pip would replace. Any Debian/Ubuntu base works (python3 >= 3.11 is
# installed if missing), e.g. --build-arg BASE_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04.
#
# Build arguments:
#   BASE_IMAGE            Debian/Ubuntu-like image (python3 >= 3.11 is installed if missing)
#   EXTRAS                the package's extras: `pipeline,train` (default; onnxruntime on the
#                         CPU for evaluation), `pipeline,train,gpu` for onnxruntime-gpu with the
#                         CUDA provider (requirements/deps.py: never both onnxruntime packages)
#   PIP_EXTRA_INDEX_URL   e.g. https://download.pytorch.org/whl/cu128 for a given CUDA build
#   PIP_FIND_LINKS        a wheel directory mounted at build time (this machine: the CPU torch
#                         wheel, so its test build does not download several GB of CUDA)
# Secret (optional): `pip_cert`, a CA bundle for pip behind a TLS proxy (never stored).
#
# The image holds a copy of the project as a git + DVC workspace in /workspace, so
# `dvc repro` runs as is; mount a checkout over /workspace to run on it (outputs, DVC cache
# and MLflow store then land in the checkout). The package is installed editable from
# /workspace, so a mounted checkout's code is the code that runs.

ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS train
ARG EXTRAS=pipeline,train
ARG PIP_EXTRA_INDEX_URL
ARG PIP_FIND_LINKS
LABEL org.opencontainers.image.title="seqops-train" \
      org.opencontainers.image.description="seqops: the training pipeline (DVC, MLflow, Prefect, torch)"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INPUT=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# git: DVC tracks the workspace through it. python3 + venv only where the base lacks them.
RUN set -eu; \
    export DEBIAN_FRONTEND=noninteractive; \
    pkgs="git ca-certificates"; \
    command -v python3 >/dev/null || pkgs="$pkgs python3"; \
    python3 -c "import ensurepip, venv" 2>/dev/null || pkgs="$pkgs python3-venv"; \
    apt-get update -qq; \
    apt-get install -y -qq --no-install-recommends $pkgs >/dev/null; \
    rm -rf /var/lib/apt/lists/*; \
    python3 -c "import sys; assert sys.version_info >= (3, 11), 'seqops needs Python >= 3.11, the base has ' + sys.version"; \
    git config --system safe.directory '*'; \
    python3 -m venv /opt/venv
WORKDIR /workspace
# Dependencies first, from pyproject + the lock only, so editing code does not reinstall them.
COPY pyproject.toml README.md LICENSE ./
COPY requirements/constraints.txt requirements/deps.py requirements/
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    python3 requirements/deps.py "${EXTRAS}" > /tmp/requirements.txt; \
    pip install -c requirements/constraints.txt -r /tmp/requirements.txt; \
    rm /tmp/requirements.txt
# The workspace: code and the pipeline's definition (a name in [] is optional: copied if present).
COPY seqops ./seqops
COPY serve ./serve
COPY flows ./flows
COPY params.yaml dvc.yaml dvc.loc[k] prefect.yam[l] .dvcignore .gitignore ./
COPY .dvc/config .dvc/.gitignore ./.dvc/
RUN --mount=type=secret,id=pip_cert \
    --mount=type=cache,target=/root/.cache/pip,sharing=locked \
    set -eu; \
    if [ -s /run/secrets/pip_cert ]; then export PIP_CERT=/run/secrets/pip_cert; fi; \
    pip install --no-deps -c requirements/constraints.txt -e .; \
    mkdir -p data/raw; \
    touch data/raw/.gitkeep; \
    git init -q; \
    git add -A; \
    git -c user.name=seqops -c user.email=seqops@localhost commit -qm "seqops image workspace"; \
    python3 -c "import torch, seqops; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
CMD ["dvc", "repro"]
