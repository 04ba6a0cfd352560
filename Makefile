# mlsae: `make all` reproduces the default run from nothing; `make test` runs the test suite.
# Both set up .venv themselves (pinned by constraints.txt, so set-up takes about a minute).

PROFILE ?= default
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
RUN     := runs/$(PROFILE)
OUT     := out/$(PROFILE)
TRAIN_ARGS ?=

.PHONY: all setup test fetch train eval clean help

help:
	@echo "make all     fetch the embedded default model and corpus, train and evaluate the MLSAE"
	@echo "make test    run the test suite"

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

setup: $(STAMP)

test: setup
	$(PY) -m pytest

fetch: setup
	$(PY) -m mlsae.fetch

# Training resumes from its last checkpoint if it was interrupted.
$(RUN)/.done: $(STAMP) | fetch
	$(PY) -m mlsae.train --out_dir $(RUN) $(if $(wildcard $(RUN)/checkpoint),--resume) $(TRAIN_ARGS)
	touch $@

train: $(RUN)/.done

$(OUT)/.done: $(RUN)/.done
	for dir in $(RUN)/mlsae-*/; do $(PY) -m mlsae.test --repo_id $$dir --out_dir $(OUT) || exit 1; done
	touch $@

eval: $(OUT)/.done

all: eval
	@echo "results: $(OUT)"

clean:
	rm -rf runs out
