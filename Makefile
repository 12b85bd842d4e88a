# The two commands (each sets up .venv on first use):
#   make demo   - the main job, end to end on the built-in default
#   make test   - the test suite (what .ci/run calls)
PY      ?= python3
VENV    ?= .venv
EXTRAS  ?= eval,onnx,openvino,interop,kernels,dev
STAMP   := $(VENV)/.moe2edge-installed
# A second venv WITHOUT torch: proves a compiled engine runs with only the [runtime] extra.
RTVENV  ?= .venv-runtime
RTSTAMP := $(RTVENV)/.moe2edge-installed

.PHONY: demo test setup clean

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	# torch first: the local CPU wheel (any other torch spec pulls a multi-GB CUDA build)
	$(VENV)/bin/python -m pip install -q torch==2.13.0
	$(VENV)/bin/python -m pip install -q -e '.[$(EXTRAS)]'
	touch $(STAMP)

$(RTSTAMP): pyproject.toml
	test -x $(RTVENV)/bin/python || $(PY) -m venv $(RTVENV)
	$(RTVENV)/bin/python -m pip install -q --upgrade pip
	$(RTVENV)/bin/python -m pip install -q numpy==2.4.6 tokenizers==0.22.2 onnxruntime==1.32.0
	$(RTVENV)/bin/python -m pip install -q --no-deps -e .
	touch $(RTSTAMP)

setup: $(STAMP) $(RTSTAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/moe2edge

test: $(STAMP) $(RTSTAMP)
	HF_HUB_OFFLINE=1 MOE2EDGE_RUNTIME_VENV=$(abspath $(RTVENV)) $(VENV)/bin/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
