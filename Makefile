# Two commands: `make test` and `make demo`. Both create .venv on first use and install with the pinned
# constraints; later runs skip the install unless pyproject.toml or constraints.txt changed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

export RAY_USAGE_STATS_ENABLED = 0
export DS_BUILD_OPS = 0
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: install test demo clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	@# DeepSpeed JIT-compiles its shared-memory CPU comm op on first use (~1 min, cached in ~/.cache/torch_extensions):
	@# do it here, once, rather than inside the first training run (app.ds_ops also clears a lock a killed process left).
	$(PY) -m app.ds_ops
	@rm -f $(VENV)/.installed-*
	@touch $@

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

demo: install
	$(PY) -m app demo

clean:
	rm -rf runs .pytest_cache
