# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   - install into .venv, then edit the bundled chest radiograph
#   make test   - install into .venv, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
INSTRUCTION ?= Add the finding of left pleural effusion
MODEL ?= untrained-tiny
SAMPLE ?= Resources/Samples/chest_pa.png

.PHONY: install demo test benchmark clean

$(STAMP): constraints.txt InstructX2XLib/pyproject.toml Training/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages on CPU machines
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e "InstructX2XLib[test]" -e "Training[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/instructx2x edit $(SAMPLE) --model $(MODEL) -i "$(INSTRUCTION)" \
		-o out/demo-$$(date +%Y%m%d-%H%M%S)

test: $(STAMP)
	$(BIN)/python -m pytest -q InstructX2XLib/tests Training/tests Testing

benchmark: $(STAMP)
	$(BIN)/python Testing/benchmarks/benchmark_pipeline.py
	$(BIN)/python Testing/benchmarks/benchmark_dicom.py
	$(BIN)/python Testing/benchmarks/benchmark_dataset.py

clean:
	rm -rf $(VENV) out
