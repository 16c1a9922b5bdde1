# Everyday loops. `make demo` and `make test` are the README's two set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python
EXT := python/cppo_native/_native.abi3.so

.PHONY: build-dev venv demo test test-python test-rust build-inplace bench bench-pipeline bench-gpu wheel clean

# A virtual environment with the test/bench dependencies and cppo-native installed
# (editable: maturin builds the Rust extension in release mode).
$(VENV)/.deps: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,verl-test]'
	$(PY) -m pip install -q --no-deps 'verl==0.9.1'  # the real verl, without its heavy deps
	# The real OpenRLHF for tests/test_openrlhf.py, without its deps (its loss module needs
	# only torch). 0.11.2 has wheels for CPython 3.10-3.12 only; elsewhere the test skips.
	if $(PY) -c 'import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 12))'; then \
		$(PY) -m pip install -q --no-deps 'openrlhf==0.11.2'; \
	else echo "openrlhf 0.11.2 has no wheel for this Python: tests/test_openrlhf.py will be skipped"; fi
	touch $@

venv: $(VENV)/.deps

# Rebuild the extension after Rust changes (editable installs do not rebuild on import).
build-dev: venv
	$(PY) -m pip install -q --no-deps -e .

# Build the extension into the source tree (for worktrees that share one venv:
# run with PYTHONPATH=python).
build-inplace:
	cargo build --release --features python
	cp target/release/libcppo_native.so $(EXT)

# Main job: mask built-in sample rollouts with the CLI; writes Parquet, a per-reason
# summary and PNG diagnostics under out/.
demo: build-dev
	mkdir -p out
	$(VENV)/bin/cppo-mask --sample 2000 --out out/sample_masked.parquet --plot out/plots --force

test-rust:
	cargo test --release

test-python: build-dev
	$(PY) -m pytest -q

test: test-rust test-python

bench: build-dev
	$(PY) bench/cpu.py

# cppo-mask on a generated ~1 GB Parquet file vs pyarrow's read (SIZE_MB=200 for a quick run).
SIZE_MB ?= 1024
bench-pipeline: build-dev
	$(PY) bench/pipeline.py --size-mb $(SIZE_MB)
	$(PY) bench/pipeline.py --size-mb $(SIZE_MB) --dataset with-text --out bench/results/pipeline_with_text.json

# On a CUDA machine with CuPy installed (pip install -e '.[cuda12]' or '.[cuda13]').
bench-gpu: build-dev
	$(PY) bench/gpu.py

wheel:
	maturin build --release

clean:
	rm -rf target dist $(EXT)
