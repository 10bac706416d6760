# rnnlab — every target installs what it needs first, so each works on a fresh clone.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed

# The pipeline's stages call `python -m pipeline...`: put the venv first so DVC and Hydra find it.
export PATH := $(BIN):$(PATH)
export VIRTUAL_ENV := $(CURDIR)/$(VENV)
# Offline machines: use the verified dataset mirror beside the checkout when there is one and none is set.
ifeq ($(origin RNNLAB_DATA_MIRROR),undefined)
ifneq ($(wildcard $(CURDIR)/../shared/datasets/MANIFEST.md),)
export RNNLAB_DATA_MIRROR := $(abspath $(CURDIR)/../shared/datasets)
endif
endif
# No telemetry from MLflow or DVC.
export MLFLOW_DISABLE_TELEMETRY := true
export DVC_NO_ANALYTICS := 1

.DEFAULT_GOAL := help
.PHONY: help setup run results test test-integration test-full lint format ui bench profile server server-stop clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-17s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv and install rnnlab with its pinned dependencies

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] <= (3, 12) else \
		"rnnlab needs Python 3.11 or 3.12 (TensorFlow 2.21); found " + sys.version.split()[0] + \
		": run make with PYTHON=python3.11")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

run: setup ## the main job: the default DVC pipeline (prepare data, train, track in MLflow)
	dvc repro

results: setup ## the published results in docs/results, trained from scratch (STUDY=<name>: one study; hours)
	python -m pipeline.results $(if $(STUDY),results.study=$(STUDY))

test: setup ## the fast tier: unit and small integration tests on the toy data, one worker per core (about 2 minutes)
	pytest -n auto -m "not integration and not slow" --durations=25

test-integration: setup ## the real-data pipeline, presets, team server, sweeps, real processes (two workers, one test file each: about 16 minutes)
	pytest -n 2 --dist loadfile -m "integration and not slow" --durations=25

test-full: setup ## every test: both tiers and the full-size training
	pytest

lint: setup ## ruff lint and format check
	ruff check .
	ruff format --check .

format: setup ## apply ruff's fixes and formatting
	ruff check --fix .
	ruff format .

ui: setup ## the MLflow dashboard on http://127.0.0.1:5000
	python -m pipeline.ui

bench: setup ## benchmark the training path against plain Keras -> reports/bench.{json,md} (after make run)
	python -m pipeline.bench

profile: setup ## where a PTB-small training step's time goes, and the matmul limit -> reports/profile.{json,md}
	python -m pipeline.profile

server: setup ## start the team tracking server: PostgreSQL + MLflow on 127.0.0.1:5001 (state in .team-server/)
	python -m pipeline.server start

server-stop: ## stop the team tracking server
	python -m pipeline.server stop

clean: ## remove generated data, models, runs and the MLflow store (keeps .venv)
	rm -rf data/prepared models outputs multirun mlflow.db mlartifacts .dvc/cache .dvc/tmp
