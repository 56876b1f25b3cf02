# loraflow: `make demo` runs the whole loop, `make test` runs the suite. Both set up what they need.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
VLLM_VENV := .venv-vllm
K8S_VENV := .venv-k8s
# CPU build by default; on a CUDA host: make vllm-env VLLM_REQUIREMENTS=requirements/vllm-gpu.txt
VLLM_REQUIREMENTS ?= requirements/vllm-cpu.txt
VLLM_CONSTRAINTS ?= $(VLLM_REQUIREMENTS:.txt=.lock)
# The pip index mirror on the reference machines prints one warning per missing package; hide only those.
QUIET_PIP := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: demo demo-drift test env vllm-env test-env clean-runs up down
demo: env vllm-env
	$(VENV)/bin/loraflow demo

# The feedback loop after the demo: drifted traffic, corrections, drift-triggered retrain, new champion.
demo-drift: env vllm-env
	$(VENV)/bin/loraflow demo --drift

test: test-env vllm-env
	$(VENV)/bin/python -m pytest -v --durations=15

env: $(VENV)/.installed
$(VENV)/.installed: requirements/pipeline.txt requirements/pipeline.lock pyproject.toml
	@echo "== creating $(VENV) (pipeline environment: torch CPU, TRL, peft, Prefect, MLflow, DVC, Evidently)"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -r requirements/pipeline.txt -c requirements/pipeline.lock -q 2>&1 | $(QUIET_PIP)
	$(VENV)/bin/pip install -q --no-deps -e . 2>&1 | $(QUIET_PIP)
	touch $@

test-env: env $(VENV)/.installed-test $(K8S_VENV)/.installed
$(VENV)/.installed-test: requirements/test.txt
	$(VENV)/bin/pip install -q -r requirements/test.txt 2>&1 | $(QUIET_PIP)
	touch $@

# The offline Kubernetes checks (kubernetes-validate, checkov) in their own environment: checkov's pins.
$(K8S_VENV)/.installed: requirements/k8s-tools.txt
	$(PYTHON) -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install -q -r requirements/k8s-tools.txt 2>&1 | $(QUIET_PIP)
	touch $@

vllm-env: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: $(VLLM_REQUIREMENTS)
	@echo "== creating $(VLLM_VENV) (vLLM in its own environment: its pins conflict with Prefect's)"
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -r $(VLLM_REQUIREMENTS) $(if $(wildcard $(VLLM_CONSTRAINTS)),-c $(VLLM_CONSTRAINTS)) -q 2>&1 | $(QUIET_PIP)
	# The registry only has CUDA builds of these; importing them breaks vLLM's CPU torch.
	$(VLLM_VENV)/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | $(QUIET_PIP)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	touch $@

# The platform (Prefect server, MLflow server with UI + webhooks, a worker, the endpoint) in the background.
up: env vllm-env
	$(VENV)/bin/loraflow up
down:
	$(VENV)/bin/loraflow down

# Forget local run state (MLflow store, Prefect home, DVC outputs and cache); data/raw stays.
clean-runs:
	@if [ -d .loraflow/run ] && ls .loraflow/run/*.json >/dev/null 2>&1; then \
	  echo "the platform is running: make down first"; exit 1; fi
	rm -rf mlflow/mlflow.db mlflow/artifacts .prefect reports data/clean data/augmented data/serving \
	       artifacts .dvc/cache .dvc/tmp .dvc-storage
