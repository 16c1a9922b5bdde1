# Everyday loops. `make demo` and `make test` are the README's two set-up commands.
VENV ?= .venv
PY := $(VENV)/bin/python
EXT := python/cppo_native/_native.abi3.so

.PHONY: build-dev venv demo test test-python test-rust lint-rust build-inplace bench bench-pipeline bench-gpu wheel clean

# The test environment (~6.2 GB: CUDA torch, ray, verl's test dependencies; ~3 min on
# a fresh machine) with cppo-native installed editable (maturin builds the Rust
# extension in release mode). Only `make test`, `make bench*` and `make build-dev` need it.
$(VENV)/.deps: pyproject.toml
	@echo "== [1/3] creating $(VENV) (the test environment, ~6.2 GB)"
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@echo "== [2/3] installing the test dependencies and building cppo-native (several minutes)"
	$(PY) -m pip install --progress-bar on -e '.[test,verl-test,trl-test]'
	@echo "== [3/3] installing verl 0.9.1 and openrlhf 0.11.2 without their dependencies"
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
	cargo build --release -p cppo-py
	cp target/release/libcppo_native.so $(EXT)

# The main job's light environment: only the [cli] extra (numpy, pyarrow, tqdm,
# matplotlib; ~370 MB) and cppo-native built from this checkout (non-editable, so it is
# rebuilt when the sources change).
DEMO_VENV ?= .venv-demo
DEMO_SOURCES := pyproject.toml Cargo.toml $(shell find rust python -name '*.rs' -o -name '*.py' -o -name '*.cu' -o -name 'Cargo.toml' 2>/dev/null)

$(DEMO_VENV)/.deps: $(DEMO_SOURCES)
	@echo "== [1/2] creating $(DEMO_VENV) (numpy, pyarrow, tqdm, matplotlib: ~370 MB)"
	test -x $(DEMO_VENV)/bin/python || python3 -m venv $(DEMO_VENV)
	$(DEMO_VENV)/bin/python -m pip install -q --upgrade pip
	@echo "== [2/2] building cppo-native (Rust, release mode; a few minutes the first time) and installing it"
	$(DEMO_VENV)/bin/python -m pip install --progress-bar on '.[cli]'
	touch $@

# Main job: mask built-in sample rollouts with the CLI; writes Parquet, a per-reason
# summary and PNG diagnostics under out/.
demo: $(DEMO_VENV)/.deps
	mkdir -p out
	$(DEMO_VENV)/bin/cppo-mask --sample 2000 --out out/sample_masked.parquet --plot out/plots --force --progress

# The core crate's tests (the workspace's default member; the binding has none).
test-rust:
	cargo test --release

lint-rust:
	cargo clippy --workspace --all-targets -- -D warnings

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

# An abi3 wheel in target/wheels/ (maturin, the build backend, installed into the venv).
wheel: venv
	$(PY) -m pip install -q 'maturin>=1.7,<2'
	$(VENV)/bin/maturin build --release

clean:
	rm -rf target dist $(EXT) $(DEMO_VENV)
