# mlsae: `make all` reproduces the paper book from nothing; `make test` runs the test suite.
# Both set up .venv themselves (pinned by constraints.txt, so set-up takes about a minute).
# `make all PROFILE=smoke` runs the whole pipeline on a tiny model in a minute or two;
# PROFILE=gemma runs it on Gemma 3 270M (with a chapter setting it beside the default model,
# whose runs it makes too where `make all` has not); PROFILE=paper is the paper's setup (Pythia-70m-deduped
# + the Pile; needs the hub and a GPU).

PROFILE ?= default
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
RUN     := runs/$(PROFILE)
OUT     := out/$(PROFILE)
PROFILE_FILE := profiles/$(PROFILE).yaml
NB_OUT  := $(OUT)/notebooks
BOOK    := $(OUT)/book/_build/html/index.html
# The book's notebooks, in book order (book/build.py NOTEBOOKS); the model-size chapter only under
# profiles with a compare: section (book/build.py NEEDS_SECTION).
NOTEBOOKS := train evaluation residual_geometry layer_distributions examples prompt_heatmaps \
             decoder_geometry baselines tuned_lens $(if $(shell grep -s '^compare:' $(PROFILE_FILE)),model_size) performance
EXECUTED  := $(NOTEBOOKS:%=$(NB_OUT)/%.ipynb)
# What the notebooks' results depend on: the library (the ipywidgets app aside), the book's
# Python package (book/*.py) and the profile.
PKG_SRC := $(filter-out mlsae/explorer/app.py,$(shell find mlsae -name '*.py' -not -path '*/__pycache__/*')) $(wildcard book/*.py)

.PHONY: all setup test fetch train eval notebooks book clean help

help:
	@echo "make all      set up, fetch, run every notebook under PROFILE ($(PROFILE)) and build the book"
	@echo "make book     build the HTML book (running the notebooks that are out of date)"
	@echo "make test     run the test suite"
	@echo "make bench    side-by-side training-step benchmark vs sparsify and SAELens (own venv; BENCH_ARGS=--quick)"
	@echo "PROFILE=default|smoke|gemma|paper (profiles/*.yaml)"

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,book]'
	touch $@

setup: $(STAMP)

# The explorer's browser test drives Debian's chromium (a Playwright browser download fails
# offline): installed here where apt-get can (as root), else a one-line error saying what to run.
CHROMIUM ?= /usr/bin/chromium

$(CHROMIUM):
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian's chromium for the browser test (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "error: the browser test needs chromium at $(CHROMIUM): run 'sudo apt-get install -y chromium', or make test CHROMIUM=/path/to/chromium" >&2; \
		exit 1; \
	fi

test: setup $(CHROMIUM)
	MLSAE_CHROMIUM=$(CHROMIUM) $(PY) -m pytest

# What the profile needs: the embedded model and corpus, a tiny random model, or nothing (hub).
$(OUT)/.fetched: $(STAMP) $(PROFILE_FILE)
	$(PY) -m book fetch --profile $(PROFILE)
	@mkdir -p $(OUT) && touch $@

fetch: $(OUT)/.fetched

# The time budget: training plans its steps to let the book finish within the profile's
# performance.budget_minutes of make's start (book.stages.ensure_trained); FULL_RECIPE=1 trains the
# profile's whole recipe, however long that takes.
BUILD_START := $(if $(FULL_RECIPE),,$(shell date +%s))

# Each notebook executed by papermill under the profile. Inside, training, evaluation and the
# analysis passes are skipped when their outputs were made with the same options (training
# resumes from its last checkpoint if it was interrupted).
$(NB_OUT)/%.ipynb: notebooks/%.ipynb $(PROFILE_FILE) $(PKG_SRC) $(OUT)/.fetched
	MLSAE_BUILD_START=$(BUILD_START) $(PY) -m book run $* --profile $(PROFILE)

# What each notebook reads from the notebooks before it.
$(NB_OUT)/evaluation.ipynb $(NB_OUT)/layer_distributions.ipynb $(NB_OUT)/prompt_heatmaps.ipynb \
	$(NB_OUT)/decoder_geometry.ipynb $(NB_OUT)/residual_geometry.ipynb: $(NB_OUT)/train.ipynb
$(NB_OUT)/layer_distributions.ipynb: $(NB_OUT)/residual_geometry.ipynb $(NB_OUT)/evaluation.ipynb
$(NB_OUT)/examples.ipynb $(NB_OUT)/decoder_geometry.ipynb $(NB_OUT)/prompt_heatmaps.ipynb: $(NB_OUT)/layer_distributions.ipynb
$(NB_OUT)/baselines.ipynb: $(NB_OUT)/evaluation.ipynb
$(NB_OUT)/tuned_lens.ipynb: $(NB_OUT)/layer_distributions.ipynb
$(NB_OUT)/model_size.ipynb: $(NB_OUT)/layer_distributions.ipynb
$(NB_OUT)/performance.ipynb: $(NB_OUT)/evaluation.ipynb $(NB_OUT)/layer_distributions.ipynb $(wildcard out/bench.json)

train: $(NB_OUT)/train.ipynb
eval: $(NB_OUT)/evaluation.ipynb
notebooks: $(EXECUTED)

$(BOOK): $(EXECUTED) _config.yml _toc.yml $(wildcard book/*.md) $(PKG_SRC)
	$(PY) -m book build --profile $(PROFILE)

book: $(BOOK)

all: book
	@echo "book: $(abspath $(BOOK))"

clean:
	rm -rf runs out

# The prompt explorer as a local web app (Voila, bound to 127.0.0.1). MODEL=<MLSAE folder or hub id>
# picks another MLSAE than the one `make all` trained; EXPLORE_PORT picks the port.
EXPLORE_PORT ?= 8866
.PHONY: explore
explore: setup
	@echo "explorer: http://127.0.0.1:$(EXPLORE_PORT)/  (Ctrl-C stops it)"
	MLSAE_EXPLORER_SAE="$(MODEL)" MLSAE_CACHE="$${MLSAE_CACHE:-$(CURDIR)/cache}" $(VENV)/bin/voila notebooks/explorer.ipynb \
		--no-browser --Voila.ip=127.0.0.1 --port=$(EXPLORE_PORT)

# The side-by-side training-step benchmark (benchmarks/README.md) in its own venv, with the
# competitors (eai-sparsify, sae-lens) pinned by benchmarks/constraints.txt; `make test` never
# installs them. Writes out/bench.json (read by the performance notebook). BENCH_ARGS=--quick
# for a one-minute run; the default also runs the end-to-end sweep on the default model.
BENCH_VENV  := .venv-bench
BENCH_PY    := $(BENCH_VENV)/bin/python
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_ARGS  ?= --sweep
.PHONY: bench
$(BENCH_STAMP): pyproject.toml constraints.txt benchmarks/constraints.txt
	python3 -m venv $(BENCH_VENV)
	$(BENCH_PY) -m pip install -q --upgrade pip
	$(BENCH_PY) -m pip install -q -c constraints.txt -c benchmarks/constraints.txt -e . eai-sparsify sae-lens
	touch $@

bench: $(BENCH_STAMP)
	$(if $(findstring --sweep,$(BENCH_ARGS)),$(BENCH_PY) -m mlsae.fetch)
	$(BENCH_PY) benchmarks/bench.py --json out/bench.json $(BENCH_ARGS)
