# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Torch comes first and pinned: an unpinned `torch` would pull the newest release.
TORCH := torch==2.14.1 torchvision==0.29.1
SHARED ?= $(abspath ../shared/data)
CACHE ?= $(abspath .cache)

.PHONY: venv demo test bench lint data clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/epic demo --out runs/demo

# Builds the CIFAR-10 copy from ../shared/data once (tests that need it skip when it is absent),
# and a copy whose first 2,500 training images are the true pixels (for
# configs/cpu-cifar10-transfer-lossless.yaml).
data: venv
	@if [ -f "$(SHARED)/cifar10/build.py" ] && [ ! -f "$(CACHE)/cifar10/cifar-10-batches-py/test_batch" ]; then \
		mkdir -p "$(CACHE)/cifar10" && $(BIN)/python "$(SHARED)/cifar10/build.py" "$(CACHE)/cifar10"; \
	fi
	@if [ -f "$(SHARED)/cifar10/cifar10-exact-subset.npz" ] && [ -f "$(CACHE)/cifar10/cifar-10-batches-py/test_batch" ] \
		&& [ ! -d "$(CACHE)/cifar10-lossless" ]; then \
		$(BIN)/python tools/cifar10_lossless.py --source "$(CACHE)/cifar10" --shared "$(SHARED)" \
			--out "$(CACHE)/cifar10-lossless"; \
	fi

test: venv data
	EPIC_SHARED_DATA="$(SHARED)" EPIC_CACHE="$(CACHE)" $(BIN)/python -m pytest -q

bench: venv data
	EPIC_SHARED_DATA="$(SHARED)" EPIC_CACHE="$(CACHE)" $(BIN)/python benchmarks/selection.py

lint: venv
	$(BIN)/ruff check src tests benchmarks tools

clean:
	rm -rf $(VENV) .cache runs
