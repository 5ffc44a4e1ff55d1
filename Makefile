# omni-export: set up, demo, test. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# CI disks can be small: pip's wheel cache would hold a second copy of torch's multi-GB files.
export PIP_NO_CACHE_DIR := 1
DEMO := demo
REF_ENV := build/ref-transformers-4.57.3

.PHONY: setup ref-env demo test runtime-check hosts clean

setup: $(VENV)/.installed $(REF_ENV)/.installed

# torch==2.14.1 / torchvision==0.29.1 are taken from the machine's local wheel store;
# any other torch request would download a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml runtime/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e "./runtime[cpu]" -e ".[dev]"
	touch $@

# transformers 4.57.3, the oracle for the talker's generation (docs/reference-versions.md), beside
# .venv's 5.23: only it and the two packages whose ranges differ, into their own directory; the
# tests run it in a subprocess with that directory first on PYTHONPATH, so torch is .venv's.
ref-env: $(REF_ENV)/.installed

$(REF_ENV)/.installed: $(VENV)/.installed
	rm -rf $(REF_ENV)
	$(BIN)/pip install -q --target $(REF_ENV) --no-deps transformers==4.57.3 'huggingface-hub<1.0,>=0.34' \
		'tokenizers>=0.22,<0.23'
	PYTHONPATH=$(REF_ENV) $(BIN)/python -c "import transformers; assert transformers.__version__ == '4.57.3'; \
	from transformers import Qwen2_5OmniForConditionalGeneration"
	touch $@

# Build a bundle from the embedded random-weight tiny model and chat with it.
demo: setup
	rm -rf $(DEMO)
	$(BIN)/omni-export tiny $(DEMO)/model
	$(BIN)/omni-export build --model $(DEMO)/model --recipe fp32 --out $(DEMO)/bundle
	$(BIN)/omni-export inspect $(DEMO)/bundle
	$(BIN)/omni-export run $(DEMO)/bundle --prompt "Tell me about the sea." --max-new-tokens 24 --sample --seed 0
	$(BIN)/omni-export run $(DEMO)/bundle --prompt "Tell me about the sea." --max-new-tokens 8 --greedy --json
	$(BIN)/omni-export run $(DEMO)/bundle --prompt "Say hello." --max-new-tokens 8 --greedy --wav $(DEMO)/reply.wav --max-speech-seconds 3
	$(BIN)/omni-export build --model $(DEMO)/model --recipe awq --out $(DEMO)/bundle-awq
	$(BIN)/omni-export verify $(DEMO)/bundle-awq --model $(DEMO)/model
	$(BIN)/omni-export run $(DEMO)/bundle-awq --prompt "Tell me about the sea." --max-new-tokens 8 --greedy

# The C++ and C# hosts (runtime/cpp, runtime/csharp, docs/hosts.md) in build/hosts/: ONNX Runtime
# headers from npm, the wheel's libonnxruntime.so (the Python runtime's), g++/cmake,
# nlohmann-json3-dev, libssl-dev, mono-mcs.
HOSTS := build/hosts

hosts: $(VENV)/.installed
	runtime/cpp/fetch_deps.sh $(HOSTS) $(BIN)/python
	cmake -S runtime/cpp -B $(HOSTS)/cmake -DORT_INCLUDE_DIR=$(abspath $(HOSTS))/include \
		-DORT_LIBRARY=$(abspath $(HOSTS))/libonnxruntime.so.1 >/dev/null
	cmake --build $(HOSTS)/cmake -j 2
	cp $(HOSTS)/cmake/omni-host $(HOSTS)/omni-host.partial && mv $(HOSTS)/omni-host.partial $(HOSTS)/omni-host
	@# the C# host (mono's mcs): OrtApi slot indices generated from the header by a C program
	@if command -v mcs >/dev/null && command -v mono >/dev/null; then \
		cc -I$(HOSTS)/include runtime/csharp/gen_slots.c -o $(HOSTS)/gen_slots && \
		$(HOSTS)/gen_slots > $(HOSTS)/OrtSlots.cs.partial && mv $(HOSTS)/OrtSlots.cs.partial $(HOSTS)/OrtSlots.cs && \
		mcs -nologo -langversion:7 -optimize+ -r:System.Core -out:$(HOSTS)/OmniHost.exe \
			runtime/csharp/*.cs $(HOSTS)/OrtSlots.cs && \
		cp runtime/csharp/OmniHost.exe.config $(HOSTS)/OmniHost.exe.config; \
	else echo "mcs/mono not found: OmniHost.exe not built (apt-get install mono-mcs)"; fi

test: setup
	$(BIN)/python -m pytest -q

# The runtime installs on its own (no torch, no transformers) and runs the demo bundle with its
# own command line.
runtime-check:  # after `make demo`
	rm -rf .venv-runtime
	$(PYTHON) -m venv .venv-runtime
	.venv-runtime/bin/pip install -q "./runtime[cpu]"
	.venv-runtime/bin/python -c "import importlib.util as u; \
	assert u.find_spec('torch') is None and u.find_spec('transformers') is None, 'runtime venv has torch'"
	.venv-runtime/bin/omni-runtime --version
	.venv-runtime/bin/omni-runtime run $(DEMO)/bundle --prompt Hello --max-new-tokens 4 --json

clean:
	rm -rf $(DEMO) .pytest_cache .venv-runtime
