# Two commands a newcomer needs: `make demo` (the main job) and `make test` (the whole suite).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test sync check-outputs nbtest pytest browser-deps readme export clean bench lessons book

$(STAMP): setup.py settings.ini
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip 'setuptools>=64' wheel
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

## The main job: synthetic data -> LR finder -> one-cycle training -> evaluation -> predictions -> report
demo: $(STAMP)
	$(BIN)/segtutor demo --out demo_out

## The whole test suite: notebooks/library sync, fresh stored outputs, every lesson under nbdev_test, then pytest tests/
test: $(STAMP) browser-deps sync check-outputs nbtest pytest

## Execute every lesson (or ONLY="05_fcn 07_unet") on a fresh kernel at full settings and store the outputs
ONLY ?=
LESSON_TIMEOUT ?= 900
lessons: $(STAMP)
	env -u IN_TEST PYTHONHASHSEED=0 $(BIN)/python tests/run_lessons.py --timeout $(LESSON_TIMEOUT) $(ONLY)

# every lesson's stored outputs come from a full-settings run of its current source (reads JSON only: fast)
check-outputs: $(STAMP)
	$(BIN)/python tests/check_outputs.py

## The course as a static HTML book with the stored outputs: _book/index.html
book: $(STAMP)
	$(BIN)/python tests/build_book.py --out _book

# Debian's chromium drives the real-browser JupyterLab test (never `playwright install`)
browser-deps:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
	  echo "chromium not installed: the browser test will be skipped"

readme: $(STAMP)
	$(BIN)/python tests/render_readme.py

export: $(STAMP)
	$(BIN)/nbdev_export

sync: $(STAMP)
	$(BIN)/nbdev_clean
	$(BIN)/nbdev_export
	$(BIN)/python tests/render_readme.py
	@out=$$(git status --porcelain --untracked-files=all); if [ -n "$$out" ]; then \
	  echo "Notebooks, library and README are out of sync (or files are uncommitted):"; echo "$$out"; \
	  git --no-pager diff --stat; exit 1; fi; echo "sync: notebooks, library and README match"

# two notebooks at a time, one torch thread each: two threads per process on two cores would oversubscribe them
nbtest: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/nbdev_test --n_workers 2 --timing

pytest: $(STAMP)
	$(BIN)/python -m pytest tests -v -rs --durations=15

bench: $(STAMP)
	$(BIN)/segtutor bench

clean:
	rm -rf demo_out _proc _docs _book .pytest_cache
