# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   - install into .venv, then edit the bundled chest radiograph
#   make test   - install into .venv, then run the whole test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PHANTOM_INSTRUCTION := Add the finding of moderate left pleural effusion
INSTRUCTION ?= $(PHANTOM_INSTRUCTION)
MODEL ?= demo
SAMPLE ?= Resources/Samples/phantom_pa.dcm
PHANTOM_TRUTH := Resources/Samples/phantom_pa_truth_moderate_left_effusion.png
# the true lesion is outlined on the figure when the sample and instruction are the phantom's own
REFERENCE ?= $(if $(filter Resources/Samples/phantom_pa.dcm,$(SAMPLE)),$(if $(subst $(PHANTOM_INSTRUCTION),,$(INSTRUCTION)),,$(PHANTOM_TRUTH)))
DEMO_WORK ?= out/demo-model

.PHONY: install demo demo-model test benchmark clean

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
		$(if $(REFERENCE),--reference-mask $(REFERENCE)) -o out/demo-$$(date +%Y%m%d-%H%M%S)

# Rebuild the bundled demo model from nothing (under an hour on 2 CPU cores; its model card,
# InstructX2XLib/src/instructx2x/resources/demo_model/README.md, has the measured figures):
# pure pairs -> autoencoder + UNet + text encoder -> bundle -> acceptance of the bundled model on
# held-out pairs -> bundle again with the figures.
demo-model: $(STAMP)
	@test ! -e $(DEMO_WORK) || { echo "$(DEMO_WORK) exists: remove it or set DEMO_WORK=..."; exit 2; }
	mkdir -p $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json pairs -- \
		$(BIN)/instructx2x-train pure-pairs $(DEMO_WORK)/pairs --pairs 6000 --resolution 128 \
		--seed 0 --validation-fraction 0.005 --workers 2
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json training -- \
		$(BIN)/instructx2x-train train --config Training/configs/demo.yaml \
		--set data.dataset=$(DEMO_WORK)/pairs --set output=$(DEMO_WORK)/run
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json acceptance -- \
		$(BIN)/instructx2x-train evaluate-demo $(DEMO_WORK)/acceptance --model demo --ablation-count 48
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)

test: $(STAMP)
	$(BIN)/python -m pytest -q InstructX2XLib/tests Training/tests Testing

benchmark: $(STAMP)
	$(BIN)/python Testing/benchmarks/benchmark_pipeline.py
	$(BIN)/python Testing/benchmarks/benchmark_dicom.py
	$(BIN)/python Testing/benchmarks/benchmark_dataset.py

clean:
	rm -rf $(VENV) out
