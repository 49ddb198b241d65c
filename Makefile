# saber_pl — every target creates .venv and installs the package into it on first use.
#   make train                      saber_full at scale mini on the embedded data set (CPU, minutes)
#   make test                       the test suite (what CI runs)
#   make train EXP=saber_full SCALE=14B WAN_DIR=/ckpt/Wan2.1-T2V-14B-Diffusers SHARDS='/data/shards-{000000..000999}.tar'
#   make ablate EXP=ellipse_only    saber_full + the ablation's delta, at SCALE (default mini)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
EXP ?= saber_full
SCALE ?= mini
WAN_DIR ?=
SHARDS ?=
VAL_SHARDS ?=
ARGS ?=
EMBEDDED := data/embedded/.complete

TRAIN_FLAGS = --exp $(EXP) --scale $(SCALE) $(if $(WAN_DIR),--wan-dir '$(WAN_DIR)') \
	$(if $(SHARDS),--shards '$(SHARDS)') $(if $(VAL_SHARDS),--val-shards '$(VAL_SHARDS)') $(ARGS)

.PHONY: install train ablate test test-all data tensorboard export generate eval bench bench-mini dry-run plan clean \
	precompute-text cache-latents

# An editable install of the package (pyproject.toml: setuptools; setup.cfg: metadata, dependencies,
# package data) with the test extra, the standard `pip install -e` route a GPU user takes too. torch is
# held at the CPU build on this disk (constraints.txt), so a CPU machine never pulls a CUDA build.
$(STAMP): pyproject.toml setup.cfg constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0 -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

$(EMBEDDED): saber_pl/synthetic.py data/make_embedded.py | $(STAMP)
	$(PY) data/make_embedded.py --out data/embedded

# make data ARGS='--motions all --backgrounds all --max-subjects 2' (see python data/make_embedded.py --help)
data: $(STAMP)
	$(PY) data/make_embedded.py --out data/embedded $(ARGS)

# The embedded data set is built on first use when no SHARDS are given (tiny/mini scales).
train: $(STAMP) $(if $(SHARDS),,$(EMBEDDED))
	$(PY) -m saber_pl.train $(TRAIN_FLAGS)

ablate: $(STAMP) $(if $(SHARDS),,$(EMBEDDED))
	$(PY) -m saber_pl.train $(TRAIN_FLAGS)

dry-run: $(STAMP)
	$(PY) -m saber_pl.train $(TRAIN_FLAGS) --dry-run

# Will it fit? Memory per rank, FLOPs per step, step time and a verdict (docs/plan.md); no GPU needed.
#   make plan EXP=saber_full SCALE=14B GPUS=64 GPU_MEM=80 [ARGS='--mfu 0.4 --json key.sub=value']
GPUS ?=
GPU_MEM ?= 80
plan: $(STAMP)
	$(PY) -m saber_pl.plan --exp $(EXP) --scale $(SCALE) $(if $(GPUS),--gpus $(GPUS)) --gpu-mem $(GPU_MEM) $(ARGS)

# Only the DiT on the training GPUs (docs/data.md): umT5 embeddings and first-window VAE latents, once, as sidecar
# shards; then train with data.text=precomputed data.text_sidecars=DIR / data.latents=cached data.latent_sidecars=DIR.
#   make precompute-text SCALE=14B WAN_DIR=... SHARDS=... ARGS='--out /data/text'   (torchrun: shards dealt out)
TOOL_FLAGS = --exp $(EXP) --scale $(SCALE) $(if $(WAN_DIR),--wan-dir '$(WAN_DIR)') $(if $(SHARDS),--shards '$(SHARDS)') $(ARGS)
precompute-text: $(STAMP)
	$(PY) data/precompute_text.py $(TOOL_FLAGS)

cache-latents: $(STAMP)
	$(PY) data/cache_latents.py $(TOOL_FLAGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

tensorboard: $(STAMP)
	$(VENV)/bin/tensorboard --logdir runs --bind_all

export: $(STAMP)
	$(PY) -m saber_pl.export --run runs/$(EXP)-$(SCALE) $(ARGS)

generate: $(STAMP)
	$(PY) -m saber_pl.generate $(ARGS)

eval: $(STAMP)
	$(PY) -m saber_pl.eval $(ARGS)

bench: $(STAMP)
	$(PY) benchmarks/masks.py
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/data.py

# Saber-mini: trains saber_full, t2v_baseline and the ablations at scale mini, evaluates, writes
# runs/bench-mini/results.md (resumable: finished runs are not trained again).
bench-mini: $(STAMP) $(EMBEDDED)
	$(PY) -m saber_pl.eval.mini $(ARGS)

clean:
	rm -rf $(VENV) runs data/embedded
