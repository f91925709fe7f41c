# seqops — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# The stamp holds the extras of the last install, and they stay the default: after
# `make install EXTRAS=pipeline,train,serve,dev,gpu` a GPU host keeps onnxruntime-gpu in every
# later target, until an install names other extras (the CPU ones switch it back).
INSTALLED_EXTRAS := $(shell cat $(STAMP) 2>/dev/null)
DEFAULT_EXTRAS   := pipeline,train,serve,dev
EXTRAS := $(or $(INSTALLED_EXTRAS),$(DEFAULT_EXTRAS))
comma  := ,
# onnxruntime (the core's) and onnxruntime-gpu (the `gpu` extra's) are one module in two packages.
ORT_UNWANTED := $(if $(filter gpu,$(subst $(comma), ,$(EXTRAS))),onnxruntime,onnxruntime-gpu)
# Stage commands in dvc.yaml call `seqops`; put the venv first so `dvc repro` finds it.
export PATH := $(CURDIR)/$(BIN):$(PATH)

# Prefect: the demo's ephemeral runs and a local server share one database in the project.
export PREFECT_HOME ?= $(CURDIR)/.prefect
PREFECT_PORT ?= 4200
PREFECT_API  ?= $(or $(PREFECT_API_URL),http://127.0.0.1:$(PREFECT_PORT)/api)
PREFECT_POOL ?= seqops-process
MLFLOW_PORT  ?= 5000
OVERRIDES    ?= {"train.epochs": 3}
SET          ?=

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format test-fast clean images image-train test-containers \
	flow prefect-server work-pool prefect-worker deploy run-deployment mlflow-ui

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

# Other extras than the last install's: install again.
ifneq ($(EXTRAS),$(INSTALLED_EXTRAS))
.PHONY: $(STAMP)
endif
# The two onnxruntime packages share their files, so removing one breaks the other: if the
# unwanted one is here (an old .venv, or a switch between CPU and GPU), both go, and the wanted
# one is installed whole. requirements/deps.py lists the dependencies with only that one (pip
# would add the core's onnxruntime to the gpu extra's), and the package goes in with --no-deps.
$(STAMP): pyproject.toml requirements/constraints.txt requirements/deps.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	! $(BIN)/pip show -q $(ORT_UNWANTED) 2>/dev/null || \
		$(BIN)/pip uninstall -y -q onnxruntime onnxruntime-gpu
	$(BIN)/python requirements/deps.py "$(EXTRAS)" > $(VENV)/requirements.txt
	$(BIN)/pip install -q -c requirements/constraints.txt -r $(VENV)/requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/python -c "import onnxruntime, seqops"
	echo "$(EXTRAS)" > $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned environment (EXTRAS=...,gpu: onnxruntime-gpu)

demo: $(STAMP) ## The pipeline flow end to end on the embedded defaults, then a served prediction
	$(BIN)/python scripts/demo.py

lint: $(STAMP) ## ruff lint and format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP) ## Apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: lint ## Set up, lint, and run every test
	$(BIN)/pytest

test-fast: $(STAMP) ## Tests not marked slow or e2e
	$(BIN)/pytest -m "not slow and not e2e"

# SET's overrides are written into params.yaml (as `dvc exp run -S`) and stay there.
flow: $(STAMP) ## Run the pipeline flow here (SET="train.epochs=3": kept in params.yaml)
	$(BIN)/python -m flows.pipeline $(foreach s,$(SET),--set $(s))

prefect-server: $(STAMP) ## Local Prefect server and UI on http://127.0.0.1:4200 (foreground)
	$(BIN)/prefect server start --host 127.0.0.1 --port $(PREFECT_PORT)

work-pool: $(STAMP)
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect work-pool create $(PREFECT_POOL) --type process --overwrite

prefect-worker: work-pool ## A process worker for seqops-pipeline/local (foreground)
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect worker start --pool $(PREFECT_POOL)

deploy: work-pool ## Create the work pool and the seqops-pipeline/local deployment (prefect.yaml)
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect --no-prompt deploy --name local

run-deployment: $(STAMP) ## Trigger seqops-pipeline/local and wait (OVERRIDES='{"train.epochs": 3}')
	PREFECT_API_URL=$(PREFECT_API) $(BIN)/prefect deployment run 'seqops-pipeline/local' \
		--param overrides='$(OVERRIDES)' --watch

# One worker and no job runner (MLflow's huey consumers serve GenAI jobs this project has no
# use for): on 2 cores the defaults (4 workers, the consumers) took 13.5 s to start.
mlflow-ui: $(STAMP) ## MLflow UI on the embedded store, http://127.0.0.1:5000 (MLFLOW_PORT=...)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db \
		--default-artifact-root ./mlartifacts --host 127.0.0.1 --port $(MLFLOW_PORT) --workers 1

images: ## Build the serve image with buildah (installs the tools, makes a local base; root)
	scripts/container-tools.sh serve

image-train: ## Build the train image (large: torch and the pipeline)
	scripts/container-tools.sh train

test-containers: $(STAMP) ## Build the serve image and check the container answers /predict (root)
	$(BIN)/pytest -m containers tests/test_containers.py

clean: ## Remove caches and local run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs
