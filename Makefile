# Run `make` (or `make help`) for the targets. EXP=<preset in conf/experiment/> ARGS="<hydra overrides>".
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:
MAKEFLAGS += --no-builtin-rules

EXP ?= demo
ARGS ?=
TORCH ?= torch==2.13.0
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The virtual environment is a file target: every command that runs Python depends on it, so a fresh
# clone sets itself up on first use, and a changed pyproject.toml reinstalls.
INSTALLED := $(VENV)/.installed
OUTPUTS ?= outputs
DATA := $(or $(PIPELINE_DATA_DIR),../shared/data)
OUT := $(OUTPUTS)/$(EXP)
STAGE = $(PY) -m pipeline
MLFLOW_PORT ?= 5000
MLFLOW_HOST ?= 127.0.0.1

# Every stage gets the preset, the outputs folder (when not the default) and the user's overrides.
STAGE_ARGS = experiment=$(EXP) $(if $(filter-out outputs,$(OUTPUTS)),paths.outputs_dir=$(abspath $(OUTPUTS))) $(ARGS)

# What every stage's output depends on: the shared config, the preset, the contract and tracking code.
COMMON := conf/config.yaml $(wildcard conf/tracking/*.yaml) conf/experiment/$(EXP).yaml \
          pipeline/cli.py pipeline/config.py pipeline/contract.py pipeline/sweep.py $(wildcard pipeline/tracking/*.py)

# ARGS are part of a stage's inputs: $(OUT)/.args/<stage> changes (and triggers a rebuild) only when they do.
define args_stamp
$(OUT)/.args/$(1): FORCE
	@mkdir -p $$(@D); [ -f $$@ ] && [ "$$$$(cat $$@)" = "$$(ARGS)" ] || printf '%s' "$$(ARGS)" > $$@
endef

ifneq ($(filter name=%,$(ARGS)),)
$(error ARGS sets name=: choose the experiment with EXP=<preset> instead, so Make finds outputs/<EXP>/)
endif

.PHONY: help setup test all filter inspect-filter dedup dedup-eval tokenize pretrain cpt sft inspect-sft dpo merge evaluate sweep \
	scaling generate bench clean mlflow-ui mlflow-server FORCE

help: ## Show the targets
	@echo "usage: make <target> [EXP=$(EXP)] [ARGS='key=value ...']"
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sed -e 's/$$(TORCH)/$(TORCH)/' -e 's/$$(MLFLOW_PORT)/$(MLFLOW_PORT)/' -e 's/$$(MLFLOW_HOST)/$(MLFLOW_HOST)/' -e 's/$$(EXP)/$(EXP)/' \
		| awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(INSTALLED): pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed, found " + sys.version'
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install '$(TORCH)'
	$(VENV)/bin/pip install -e '.[dev]'
	touch $@

setup: ## Reinstall .venv: torch ($(TORCH)) first, then the project with its dev tools (other targets set it up when missing)
	rm -f $(INSTALLED)
	$(MAKE) --no-print-directory $(INSTALLED)

test: $(INSTALLED) ## Run the whole test suite, slow tests included (what CI runs; sets up .venv first if missing)
	$(PY) -m pytest --runslow -q --durations=25

all: filter dedup tokenize pretrain cpt sft dpo merge evaluate ## Run the demo pipeline, skipping what is up to date (sweep and scaling are separate)

filter: $(OUT)/filter/manifest.json ## Extract, language-filter, quality-filter and redact the crawl

$(eval $(call args_stamp,filter))
$(OUT)/filter/manifest.json: $(OUT)/.args/filter $(COMMON) conf/filter.yaml $(wildcard conf/filter/*.yaml) \
		$(wildcard conf/filter/wordlists/*) $(wildcard $(DATA)/wordlists/ldnoobw/*) pipeline/stages/filter.py \
		$(wildcard pipeline/filter/*.py)
	$(STAGE) filter $(STAGE_ARGS)

inspect-filter: $(INSTALLED) ## Print a few rejected documents per rule (N=3, RULE=prefix) to judge the thresholds
	$(PY) -m pipeline.filter.inspect $(OUT)/filter -n $(or $(N),3) $(if $(RULE),--rule $(RULE))

dedup: $(OUT)/dedup/manifest.json ## Remove URL, exact and near-duplicate documents and boilerplate lines

DEDUP_DEPS := $(COMMON) conf/dedup.yaml $(wildcard conf/dedup/*.yaml) $(wildcard pipeline/dedup/*.py) pipeline/data/sources.py
$(eval $(call args_stamp,dedup))
$(OUT)/dedup/manifest.json: $(OUT)/filter/manifest.json $(OUT)/.args/dedup $(DEDUP_DEPS) pipeline/stages/dedup.py
	$(STAGE) dedup $(STAGE_ARGS)

dedup-eval: $(OUT)/dedup-eval/manifest.json ## Measure near-duplicate precision/recall (planted copies, true Jaccard)

$(eval $(call args_stamp,dedup-eval))
$(OUT)/dedup-eval/manifest.json: $(OUT)/filter/manifest.json $(OUT)/.args/dedup-eval $(DEDUP_DEPS) \
		pipeline/stages/dedup_eval.py
	$(STAGE) dedup-eval $(STAGE_ARGS)

tokenize: $(OUT)/tokenize/manifest.json ## Train the tokenizer and encode the corpus into token shards

$(eval $(call args_stamp,tokenize))
$(OUT)/tokenize/manifest.json: $(OUT)/dedup/manifest.json $(OUT)/.args/tokenize $(COMMON) conf/tokenize.yaml \
		$(wildcard conf/tokenizer/*.yaml) pipeline/stages/tokenize.py $(wildcard pipeline/tokenizer/*.py) \
		$(wildcard pipeline/data/*.py)
	$(STAGE) tokenize $(STAGE_ARGS)

MODEL_DEPS := $(COMMON) $(wildcard conf/tokenizer/*.yaml) $(wildcard pipeline/model/*.py) $(wildcard pipeline/tokenizer/*.py) \
	$(wildcard pipeline/data/*.py)
TRAIN_DEPS := $(MODEL_DEPS) $(wildcard conf/model/*.yaml) $(wildcard conf/trainer/*.yaml) $(wildcard pipeline/train/*.py)

pretrain: $(OUT)/pretrain/manifest.json ## Train the model (conf/model/) on the token shards; after a kill it resumes

$(eval $(call args_stamp,pretrain))
$(OUT)/pretrain/manifest.json: $(OUT)/tokenize/manifest.json $(OUT)/.args/pretrain $(TRAIN_DEPS) conf/pretrain.yaml \
		pipeline/stages/pretrain.py
	$(STAGE) pretrain $(STAGE_ARGS)

cpt: $(OUT)/cpt/manifest.json ## Continue pretraining on the domain corpus; adaptation and forgetting in MLflow

$(eval $(call args_stamp,cpt))
$(OUT)/cpt/manifest.json: $(OUT)/pretrain/manifest.json $(OUT)/.args/cpt $(TRAIN_DEPS) conf/cpt.yaml conf/tokenize.yaml \
		pipeline/stages/cpt.py
	$(STAGE) cpt $(STAGE_ARGS)

sft: $(OUT)/sft/manifest.json ## Fine-tune the cpt model on instruction data with LoRA; base vs tuned in MLflow

$(eval $(call args_stamp,sft))
$(OUT)/sft/manifest.json: $(OUT)/cpt/manifest.json $(OUT)/.args/sft $(TRAIN_DEPS) conf/sft.yaml pipeline/stages/sft.py \
		$(wildcard pipeline/sft/*.py)
	$(STAGE) sft $(STAGE_ARGS)

inspect-sft: $(INSTALLED) ## Print N=2 rendered conversations per source (SOURCE=name), trained tokens marked (after make cpt)
	$(PY) -m pipeline.tools.inspect_sft -n $(or $(N),2) $(if $(SOURCE),--source $(SOURCE)) $(STAGE_ARGS)

dpo: $(OUT)/dpo/manifest.json ## Tune the sft model on human preference pairs (DPO, LoRA); SFT vs DPO in MLflow

$(eval $(call args_stamp,dpo))
$(OUT)/dpo/manifest.json: $(OUT)/sft/manifest.json $(OUT)/.args/dpo $(TRAIN_DEPS) conf/dpo.yaml pipeline/stages/dpo.py \
		$(wildcard pipeline/sft/*.py) $(wildcard pipeline/dpo/*.py)
	$(STAGE) dpo $(STAGE_ARGS)

# merge folds sft's adapter, or dpo's with ARGS='merge.adapter=dpo'
MERGE_ADAPTER := $(if $(filter merge.adapter=dpo,$(ARGS)),dpo,sft)
merge: $(OUT)/merge/manifest.json ## Fold the LoRA adapter into the model: model.pt and a transformers directory (hf/)

$(eval $(call args_stamp,merge))
$(OUT)/merge/manifest.json: $(OUT)/$(MERGE_ADAPTER)/manifest.json $(OUT)/.args/merge $(MODEL_DEPS) conf/sft.yaml \
		conf/dpo.yaml pipeline/stages/merge.py $(wildcard pipeline/sft/*.py) $(wildcard pipeline/dpo/*.py)
	$(STAGE) merge $(STAGE_ARGS)

evaluate: $(OUT)/evaluate/manifest.json ## pretrain, cpt, sft, dpo: perplexity, prompting, harness agreement, TL;DR, bias, task head

$(eval $(call args_stamp,evaluate))
$(OUT)/evaluate/manifest.json: $(OUT)/merge/manifest.json $(OUT)/dpo/manifest.json $(OUT)/cpt/manifest.json \
		$(OUT)/pretrain/manifest.json $(OUT)/.args/evaluate $(MODEL_DEPS) \
		conf/evaluate.yaml $(wildcard conf/harness/*.yaml) pipeline/stages/evaluate.py $(wildcard pipeline/evaluate/*.py) \
		$(wildcard pipeline/sft/*.py)
	$(STAGE) evaluate $(STAGE_ARGS)

SWEEP ?= demo
# How the jobs run (not what they compute, so not part of the stamp): LAUNCHER=basic (one after another), joblib
# (side by side, JOBS at once, default all cores), submitit_local or slurm; all but basic write to an MLflow server.
LAUNCHER ?= basic
JOBS ?=
LAUNCH = hydra/launcher=$(LAUNCHER) $(if $(filter-out basic,$(LAUNCHER)),tracking=server) \
	$(if $(and $(JOBS),$(filter joblib,$(LAUNCHER))),hydra.launcher.n_jobs=$(JOBS))
sweep: $(OUT)/.sweep/$(SWEEP) ## Pretrain sweep over model sizes and token budgets (SWEEP=demo, LAUNCHER=basic|joblib|slurm); rerun resumes

$(eval $(call args_stamp,sweep))
$(OUT)/.sweep/$(SWEEP): $(OUT)/tokenize/manifest.json $(OUT)/.args/sweep $(TRAIN_DEPS) conf/pretrain.yaml \
		conf/sweep/$(SWEEP).yaml pipeline/stages/pretrain.py pipeline/sweep.py
	$(STAGE) pretrain -m +sweep=$(SWEEP) $(LAUNCH) $(STAGE_ARGS)
	@mkdir -p $(@D); touch $@

scaling: $(OUT)/scaling/manifest.json ## Fit Kaplan and Chinchilla scaling laws to the latest sweep (after make sweep)

$(eval $(call args_stamp,scaling))
$(OUT)/scaling/manifest.json: $(OUT)/.sweep/$(SWEEP) $(OUT)/.args/scaling $(COMMON) conf/scaling.yaml \
		pipeline/stages/scaling.py $(wildcard pipeline/scaling/*.py)
	$(STAGE) scaling $(STAGE_ARGS)

generate: $(INSTALLED) ## Continue PROMPT="..." with the newest model of MODEL=pretrain|cpt|merge (GEN_ARGS="--chat auto" for merge)
	$(PY) -m pipeline.model.generate $(OUT)/$(or $(MODEL),pretrain) --prompt "$(PROMPT)" $(GEN_ARGS)

bench: $(INSTALLED) ## Benchmarks against baselines measured in the same run (outputs/bench/*.json)
	$(PY) -m pipeline.bench

mlflow-ui: $(INSTALLED) ## Serve the MLflow dashboard on http://127.0.0.1:$(MLFLOW_PORT)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(abspath $(OUTPUTS))/mlflow.db --host 127.0.0.1 --port $(MLFLOW_PORT)

mlflow-server: $(INSTALLED) ## Run an MLflow server on http://$(MLFLOW_HOST):$(MLFLOW_PORT) for tracking=server (parallel sweeps)
	$(PY) -m pipeline.tracking.server --store sqlite:///$(abspath $(OUTPUTS))/mlflow.db \
		--artifacts $(abspath $(OUTPUTS))/mlartifacts --host $(MLFLOW_HOST) --port $(MLFLOW_PORT)

# One experiment's folder and nothing else: EXP must be a plain name (not empty, no '/' or '..') of a folder in
# $(OUTPUTS)/ that a run wrote (Hydra's logs/ or multirun/, Make's .args/ or .sweep/ inside), so neither the MLflow
# store, the cache beside it nor anything outside goes. The values reach bash as environment variables, never
# spliced into the script.
clean: export CLEAN_EXP = $(EXP)
clean: export CLEAN_OUTPUTS = $(OUTPUTS)
clean: ## Remove outputs/$(EXP), one experiment's folder (the MLflow store and the cache in outputs/ are kept)
	@dir="$$CLEAN_OUTPUTS/$$CLEAN_EXP"; \
	if [[ ! "$$CLEAN_EXP" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$$ || "$$CLEAN_EXP" == *..* ]]; then \
		echo "make clean: EXP='$$CLEAN_EXP' is not an experiment name (letters, digits, _ - .; not empty," \
			"no / or ..): nothing removed" >&2; exit 2; \
	fi; \
	if [[ ! -d "$$dir/logs" && ! -d "$$dir/multirun" && ! -d "$$dir/.args" && ! -d "$$dir/.sweep" ]]; then \
		echo "make clean: $$dir is not an experiment folder (a run leaves logs/, multirun/ or .args/ in one):" \
			"nothing removed" >&2; exit 2; \
	fi; \
	rm -rf -- "$$dir"; echo "removed $$dir"

# Every stage needs the environment, but a reinstall alone does not make its output stale (order-only).
$(foreach s,filter dedup dedup-eval tokenize pretrain cpt sft merge evaluate scaling,$(OUT)/$(s)/manifest.json) \
	$(OUT)/.sweep/$(SWEEP): | $(INSTALLED)

FORCE:
