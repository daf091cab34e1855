# The two set-up commands (see README): `make lab` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The install stamp is named after a hash of pyproject.toml's content, not compared by date: a
# fresh clone gives every file the clone's time, so a date rule could not tell what changed. The
# venv is (re)installed when pyproject.toml's content changes, and only then.
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml 2>/dev/null | cksum | cut -d' ' -f1)
# JupyterLab's settings for this venv: no "Would you like to receive official Jupyter news?" prompt,
# no update check (the course is offline-friendly). The venv's python3 kernel is bnviz.kernel
# (ipykernel reporting no Python version), so opening a chapter does not mark it modified.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json
START_PAGE := notebooks/00_start_here.ipynb

.PHONY: lab test install bench test-fast clean

# One install step for everything: the package with its front ends and test extras, then d2l
# without its ancient pins (d2l==1.0.3 pins numpy 1.23 / pandas 2.0; its imports are our dependencies).
$(STAMP):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e ".[lab,test]"
	$(PIP) install --quiet --no-deps "d2l==1.0.3"
	$(PY) -c "from d2l import torch as d2l; import bnviz; print('installed bnviz', bnviz.__version__)"
	mkdir -p $(dir $(LAB_OVERRIDES))
	printf '%s\n' '{"@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": false}}' > $(LAB_OVERRIDES)
	$(PY) -c "import json, sys; from bnviz.kernel import kernel_json; json.dump(kernel_json(sys.executable), sys.stdout, indent=1)" > $(VENV)/share/jupyter/kernels/python3/kernel.json
	rm -f $(VENV)/.installed $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

# Install everything, then open JupyterLab at the course's start page (the URL it prints opens it too).
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. $$([ "$$(id -u)" = 0 ] && echo --allow-root) \
		--LabApp.default_url=/lab/tree/$(START_PAGE)

# Install everything, then run all tests (notebooks in fast mode, browser tests in Chromium).
test: $(STAMP)
	@command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || \
	  echo "note: no chromium found: the browser tests will be skipped (apt-get install chromium)"
	BNVIZ_FAST=1 $(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/throughput.py

clean:
	rm -rf $(VENV) dist test-artifacts .pytest_cache _build

# ---- classroom assignment (otter-grader; see notebooks/assignments/batch_norm/README.md)
ASSIGNMENT ?= batch_norm
ASSIGNMENT_SOURCE ?= notebooks/assignments/$(ASSIGNMENT)/$(ASSIGNMENT).ipynb
ASSIGNMENT_DIST ?= dist/$(ASSIGNMENT)
SUBMISSIONS ?= submissions
GRADES ?= grades
GRADE_TIMEOUT ?= 300
GRADE_JOBS ?= 1
GRADE_FLAGS ?=

.PHONY: assignment grade site feedback gradescope

# the course as a static web site: _build/site/index.html (chapters executed at this machine's sizes,
# unchanged ones reused from _build/site-cache; BNVIZ_FAST=1 for a quick build; see README)
site: $(STAMP)
	$(PY) site/build.py build --out _build/site

# otter assign: student notebook + tests, autograder zip; fails if the solution fails a test.
# VARIANT=<secret>: this class's own conventions, derived from the secret (bnviz/grading/variants.py);
# the secret reaches the command through the environment, so make does not echo it.
VARIANT ?=
export VARIANT
assignment: $(STAMP)
	$(PY) -m bnviz.grading build --source $(ASSIGNMENT_SOURCE) --out $(ASSIGNMENT_DIST) $${VARIANT:+--variant "$$VARIANT"}

# grade every .ipynb / .zip in $(SUBMISSIONS): each submission runs in a bubblewrap sandbox, the
# scores are computed outside it (needs `apt-get install bubblewrap`; GRADE_FLAGS=--allow-forbidden,
# --memory-gb 8, --sandbox docker --docker-image IMAGE, ...; see the assignment's README)
grade: $(STAMP)
	@test -d "$(SUBMISSIONS)" || { echo "usage: make grade SUBMISSIONS=folder-of-notebooks"; exit 2; }
	@test -f $(ASSIGNMENT_DIST)/assignment.json || $(MAKE) assignment
	$(PY) -m bnviz.grading grade "$(SUBMISSIONS)" --dist $(ASSIGNMENT_DIST) --out $(GRADES) \
		--timeout $(GRADE_TIMEOUT) --jobs $(GRADE_JOBS) $(GRADE_FLAGS)
	@echo "gradebook: $(GRADES)/gradebook.csv"

# one HTML page per student in $(GRADES)/feedback/ (+ feedback.zip): scores, visible tests' messages,
# manual points, rubric, comments; no flags, no other student. FEEDBACK_FLAGS=--release-hidden shows
# the hidden tests' messages (after the deadline).
FEEDBACK_FLAGS ?=
feedback: $(VENV)/.installed
	$(PY) -m bnviz.grading feedback "$(GRADES)" --dist $(ASSIGNMENT_DIST) $(FEEDBACK_FLAGS)

# a Gradescope autograder zip ($(ASSIGNMENT_DIST)/gradescope_autograder.zip) that runs this grader's worker and
# trusted checker on each upload (bnviz/grading/gradescope.py; the assignment's README, "Grading on Gradescope")
gradescope: $(STAMP)
	@test -f $(ASSIGNMENT_DIST)/assignment.json || $(MAKE) assignment
	$(PY) -m bnviz.grading gradescope --dist $(ASSIGNMENT_DIST)
