# seqops — `make help` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
EXTRAS := pipeline,train,serve,dev
# Stage commands in dvc.yaml call `seqops`; put the venv first so `dvc repro` finds it.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install demo test lint format test-fast clean images image-train test-containers

help: ## List the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2}'

$(STAMP): pyproject.toml requirements/constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements/constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

install: $(STAMP) ## Create .venv and install the pinned environment (requirements/constraints.txt)

demo: $(STAMP) ## Run the pipeline end to end on the embedded defaults
	$(BIN)/dvc repro prepare
	$(BIN)/seqops data stats data/prepared

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

images: ## Build the serve image with buildah (installs the tools, makes a local base; root)
	scripts/container-tools.sh serve

image-train: ## Build the train image (large: torch and the pipeline)
	scripts/container-tools.sh train

test-containers: $(STAMP) ## Build the serve image and check the container answers /predict (root)
	$(BIN)/pytest -m containers tests/test_containers.py

clean: ## Remove caches and local run outputs (keeps .venv)
	rm -rf .pytest_cache .ruff_cache outputs
