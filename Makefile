# Two entry points, each sets itself up on a fresh machine:
#   make demo   build a YOLOv5s checkpoint from Ultralytics' own yolov5s.yaml and run surgeon on it
#   make test   run the whole test suite (installs the test extras, including the classic yolov5 package)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
DEMO := demo

.PHONY: demo test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[test,classic]'
	touch $@

demo: $(VENV)/.installed
	PATH=$(CURDIR)/$(BIN):$$PATH sh examples/demo.sh $(DEMO)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q
