# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefleet-installed

.PHONY: demo test install mosquitto lint bench clean

demo: $(STAMP)
	$(BIN)/edgefleet demo

test: $(STAMP) mosquitto
	$(BIN)/pytest -q

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[all]'
	touch $(STAMP)

# The test suite starts its own Mosquitto processes; install the binary if it is missing.
mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then exit 0; fi; \
	echo "mosquitto not found: installing it with apt-get"; \
	SUDO=""; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	if command -v apt-get >/dev/null 2>&1 && $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto; then \
		command -v systemctl >/dev/null 2>&1 && $$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true; \
	else \
		echo "error: could not install mosquitto; install it (apt-get install mosquitto, brew install mosquitto) and rerun"; \
		exit 1; \
	fi

# ruff, then mypy (settings in pyproject.toml) and the layer contracts (import-linter). Those two
# find modules by walking folders and cannot follow pyproject's package-dir mapping, so they
# read the source through TREE: links laid out as installed (edgefleet/agent -> agent/, ...).
TREE := $(VENV)/edgefleet-tree

lint: $(STAMP)
	$(BIN)/ruff check .
	rm -rf $(TREE) && mkdir -p $(TREE)/edgefleet
	ln -s $(CURDIR)/edgefleet/__init__.py $(TREE)/edgefleet/__init__.py
	for side in agent control_plane shared; do ln -s $(CURDIR)/$$side $(TREE)/edgefleet/$$side; done
	MYPYPATH=$(abspath $(TREE)) $(BIN)/mypy -p edgefleet
	@# From inside TREE: import-linter puts the working directory first on the import path.
	cd $(TREE) && $(abspath $(BIN))/lint-imports --no-cache $(CURDIR)/pyproject.toml

bench: $(STAMP)
	$(BIN)/python bench/transfer.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
