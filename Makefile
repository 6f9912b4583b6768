# Two entry points for a fresh machine (README.md):
#   make run   installs everything, then runs the main job on its default
#   make test  installs everything, then runs the whole test suite (what CI runs)
# Both are idempotent: a second run skips the installs (stamp files) and starts in seconds.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.lottery-installed
FASHION_DIR ?= /usr/share/datasets/fashion-mnist

.PHONY: run test install data clean-venv

run: install data
	$(VENV)/bin/lottery search cs --preset fashion_lenet --out runs

test: install
	$(PY) -m pytest -q

install: $(STAMP)

# torch is installed first and pinned: an unpinned torch pulled in by a dependency would fetch the
# newest build with gigabytes of CUDA packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[dev,ray,regroup,tensorboard,onnx]'
	touch $(STAMP)

# Fashion-MNIST from Debian's package when it is missing and apt is there; otherwise say where to
# put the files (lottery also downloads them itself when it has internet).
data:
	@if [ -f $(FASHION_DIR)/train-images-idx3-ubyte.gz ] || [ -n "$$LOTTERY_DATA" ]; then \
	  true; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null \
	  && echo "installed Fashion-MNIST (Debian package dataset-fashion-mnist)"; \
	elif command -v sudo >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
	  sudo apt-get install -y -q dataset-fashion-mnist >/dev/null || echo "could not install dataset-fashion-mnist; lottery will try to download Fashion-MNIST"; \
	else \
	  echo "Fashion-MNIST not found in $(FASHION_DIR). Put the four files train-images-idx3-ubyte.gz," \
	       "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz in a folder and" \
	       "set LOTTERY_DATA=that-folder (or let lottery download them, which needs internet)."; \
	fi

clean-venv:
	rm -rf $(VENV)
