# Two commands a new user needs: `make demo` and `make test`.
# Each creates .venv from the lock (requirements-lock.txt: the exact versions CI runs) when it is missing or stale.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test espeak chromium clean

$(VENV)/.installed: requirements-lock.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements-lock.txt
	touch $@

# espeak-ng synthesizes the demo corpus and test fixtures (Debian/Ubuntu package).
espeak:
	@command -v espeak-ng >/dev/null || { \
	  echo "installing espeak-ng (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq espeak-ng >/dev/null; }

# PASSIVE: idle OpenMP threads sleep instead of spinning (sklearn/faiss slow down badly on a busy machine).
# Then the tests that compare numbers once more on torch's generic CPU kernels: a tolerance that holds only on
# some CPUs fails on every machine, not just on some (tests/numerics.py).
# Debian's chromium: the report page is checked in a real headless browser (tests/browser.py).
chromium:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
	  echo "installing chromium (apt)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

test: $(VENV)/.installed espeak chromium
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q
	ATEN_CPU_CAPABILITY=default OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest -q -m numerics

demo: $(VENV)/.installed
	$(PY) tools/demo.py

clean:
	rm -rf $(VENV) .pytest_cache
