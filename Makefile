# Two entry points, each sets itself up on a fresh machine:
#   make demo   build a YOLOv5s checkpoint from Ultralytics' own yolov5s.yaml and run surgeon on it
#   make test   run the whole test suite (installs the test extras, including the classic yolov5 package)
#   make fuzz   the generated hostile inputs at 1000 examples each (CI runs 25)
#   make wheel-check   build the wheel, install it in a fresh venv, run the README's and docs' commands with it (CI)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

WHEEL_VENV := .venv-wheel

.PHONY: demo test fuzz wheel-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,classic]'
	$(BIN)/pip install -q --no-deps yolov7detect==1.0.1  # reference code of the YOLOv7 tests (see setup.cfg)
	touch $@

demo: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH sh examples/demo.sh $(DEMO)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

fuzz: $(VENV)/.installed-test
	HYPOTHESIS_PROFILE=long $(BIN)/python -m pytest -q tests/test_generated_inputs.py

# What a user gets from `pip install`: a wheel in a fresh virtual environment (not editable), and the
# README's commands run with its console script and Python (tests/test_readme.py). It needs no .venv,
# so CI can drop that one first and hold one PyTorch install on disk at a time. pytest runs from its
# console script, which does not put the source tree on sys.path: the test's own imports are the wheel's.
wheel-check:
	rm -rf dist $(WHEEL_VENV)
	$(PYTHON) -m venv $(WHEEL_VENV)
	$(WHEEL_VENV)/bin/pip wheel -q --no-deps -w dist .
	$(WHEEL_VENV)/bin/pip install -q "$$(ls dist/yolo_surgeon-*.whl)[export,test,classic]"
	SURGEON_BIN=$(CURDIR)/$(WHEEL_VENV)/bin/surgeon SURGEON_PYTHON=$(CURDIR)/$(WHEEL_VENV)/bin/python \
		$(WHEEL_VENV)/bin/pytest -q -p no:cacheprovider tests/test_readme.py
