# Two commands do all set-up on a fresh machine (see README.md):
#   make demo   - install into .venv, then edit the bundled chest radiograph (the main job)
#   make test   - install into .venv (and .venv-eval, .venv-web), then run the whole test suite
# Beyond set-up, `make web` serves the browser panel on http://127.0.0.1:8080/ (demo model).
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
# the focal stage's pairs (Training/configs/demo-focal.yaml): the five other findings once, the three
# focal opacities 8 times; with --operations add add add add remove, two pairs in three add a focal opacity
FOCAL_OPACITIES := consolidation pneumonia "lung opacity"
FOCAL_STAGE_FINDINGS := "pleural effusion" cardiomegaly pneumothorax edema atelectasis \
	$(foreach _,1 2 3 4 5 6 7 8,$(FOCAL_OPACITIES))

EVAL_VENV := .venv-eval
EVAL_STAMP := $(EVAL_VENV)/.installed

EVALUATION_WORK ?= out/evaluation-demo

WEB_VENV := .venv-web
WEB_STAMP := $(WEB_VENV)/.installed
WEB_PORT ?= 8080

.PHONY: install demo demo-model demo-model-estimate classifiers evaluation web test lint test-eval test-web \
	test-slicer-packages benchmark clean

# torch==2.13.0 takes the build pip finds (on the machines here, a local CPU wheel). PyPI's Linux
# torch is the CUDA build; for the CPU build elsewhere run
# PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make install (2.13.0+cpu meets the pin).
$(STAMP): constraints.txt InstructX2XLib/pyproject.toml Training/pyproject.toml InstructX2XLib/src/instructx2x/_version.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls gigabytes of CUDA packages on CPU machines
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e "InstructX2XLib[test,openvino]" -e "Training[test]"
	touch $(STAMP)

install: $(STAMP)

# The evaluation's torchxrayvision back-end needs torchvision, which the CPU torch of .venv can't
# take (docs/evaluation.md): a second environment with the matched pair of constraints-eval.txt.
$(EVAL_STAMP): constraints-eval.txt InstructX2XLib/pyproject.toml Training/pyproject.toml InstructX2XLib/src/instructx2x/_version.py
	$(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_VENV)/bin/python -m pip install -q --upgrade pip
	$(EVAL_VENV)/bin/python -m pip install -q -c constraints-eval.txt torch torchvision
	$(EVAL_VENV)/bin/python -m pip install -q -c constraints-eval.txt -e "InstructX2XLib[eval,test]" -e "Training[test]"
	touch $(EVAL_STAMP)

# The browser panel needs trame-slicer, which pins an older slicer-core than .venv's: its own
# environment (constraints-web.txt), with Playwright for its browser tests (Debian's chromium)
# and OpenVINO for the page's Backend choice.
$(WEB_STAMP): constraints-web.txt InstructX2XLib/pyproject.toml InstructX2X/pyproject.toml InstructX2XLib/src/instructx2x/_version.py
	$(PYTHON) -m venv $(WEB_VENV)
	$(WEB_VENV)/bin/python -m pip install -q --upgrade pip
	$(WEB_VENV)/bin/python -m pip install -q -c constraints-web.txt torch==2.13.0
	$(WEB_VENV)/bin/python -m pip install -q -c constraints-web.txt -e "InstructX2XLib[test,openvino]" -e "InstructX2X[web,test]"
	touch $(WEB_STAMP)

web: $(WEB_STAMP)
	$(WEB_VENV)/bin/instructx2x-web --model $(MODEL) --port $(WEB_PORT)

demo: $(STAMP)
	$(BIN)/instructx2x edit $(SAMPLE) --model $(MODEL) -i "$(INSTRUCTION)" \
		$(if $(REFERENCE),--reference-mask $(REFERENCE)) -o out/demo-$$(date +%Y%m%d-%H%M%S)

# Rebuild the bundled demo model from nothing: pure pairs -> autoencoder + UNet + text encoder
# (Training/configs/demo.yaml) -> the focal stage (pairs that mostly add a focal opacity in a named
# zone, 600 steps from the first stage's model: Training/configs/demo-focal.yaml) -> bundle ->
# guidance scales, then relevance draws on validation pairs, both measuring the final model (each
# followed by a bundle that takes the choice; the scales do not enter the relevance map, so the
# draws need not be chosen first) -> acceptance on held-out pairs -> bundle with the figures.
# Pairs and training of both stages took 57.9 min on 2 idle AMD AVX2-only cores, the slowest kind
# (fp32, 2026-12-02: the bundled model is that run's output); the sweeps take about 21 min more
# there and the acceptance about 11. Its model card, InstructX2XLib/src/instructx2x/resources/demo_model/README.md, has the
# figures; `make demo-model-estimate` projects pairs and training on the machine at hand.
demo-model: $(STAMP)
	@test ! -e $(DEMO_WORK) || { echo "$(DEMO_WORK) exists: remove it or set DEMO_WORK=..."; exit 2; }
	mkdir -p $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json pairs -- \
		$(BIN)/instructx2x-train pure-pairs $(DEMO_WORK)/pairs --pairs 6000 --resolution 128 \
		--seed 0 --validation-fraction 0.005 --workers 2
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json training -- \
		$(BIN)/instructx2x-train train --config Training/configs/demo.yaml \
		--set data.dataset=$(DEMO_WORK)/pairs --set output=$(DEMO_WORK)/run
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json focal_pairs -- \
		$(BIN)/instructx2x-train pure-pairs $(DEMO_WORK)/focal-pairs --pairs 1800 --resolution 128 \
		--seed 0 --validation-fraction 0 --workers 2 --findings $(FOCAL_STAGE_FINDINGS) \
		--operations add add add add remove
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json focal_training -- \
		$(BIN)/instructx2x-train train --config Training/configs/demo-focal.yaml \
		--set data.dataset=$(DEMO_WORK)/focal-pairs --set model.base=$(DEMO_WORK)/run/model \
		--set output=$(DEMO_WORK)/focal-run
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json guidance_sweep -- \
		$(BIN)/python Training/scripts/guidance_sweep.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json relevance_sweep -- \
		$(BIN)/python Training/scripts/relevance_draws_sweep.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)
	$(BIN)/python Training/scripts/timed.py $(DEMO_WORK)/timing.json acceptance -- \
		$(BIN)/instructx2x-train evaluate-demo $(DEMO_WORK)/acceptance --model demo --ablation-count 48
	$(BIN)/python Training/scripts/bundle_demo_model.py $(DEMO_WORK)

# Retrain the bundled synthetic-cohort classifiers (14.4-16.5 minutes on 2 AMX cores: docs/benchmarks.md,
# section 11). Their card,
# InstructX2XLib/src/instructx2x/resources/cohort_classifiers/classifiers.json, has the held-out figures.
classifiers: $(STAMP)
	rm -rf out/cohort-classifiers
	$(BIN)/instructx2x-train train-classifiers out/cohort-classifiers --films 6000 --held-out 500 \
		--steps 2000 --workers 2
	rm -rf InstructX2XLib/src/instructx2x/resources/cohort_classifiers
	cp -r out/cohort-classifiers InstructX2XLib/src/instructx2x/resources/cohort_classifiers

# The demo model's evaluation in docs/evaluation-demo.md: CMIG / KL / FID and the region-mode
# ablation on 160 held-out pure pairs (seed 1000, never used in training) at 256 px.
evaluation: $(STAMP)
	@test ! -e $(EVALUATION_WORK) || { echo "$(EVALUATION_WORK) exists: remove it or set EVALUATION_WORK=..."; exit 2; }
	$(BIN)/instructx2x-train pure-pairs $(EVALUATION_WORK)/pairs --pairs 160 --resolution 256 --seed 1000 \
		--split test --other-finding-probability 0 --workers 2
	$(BIN)/instructx2x-train evaluate $(EVALUATION_WORK)/report --model demo --dataset $(EVALUATION_WORK)/pairs
	cp $(EVALUATION_WORK)/report/evaluation.md docs/evaluation-demo.md
	cp $(EVALUATION_WORK)/report/ablation.png docs/figures/evaluation-demo-ablation.png

test: lint test-eval test-web
	$(BIN)/python -m pytest -q

# ruff's lint rules and formatting and mypy's type check (the root pyproject.toml) on the whole
# tree; `make test` runs it first. The conftest.py files share one module name: mypy takes each alone.
CONFTESTS := $(wildcard conftest.py */conftest.py */tests/conftest.py */Testing/Python/conftest.py)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	for file in $(CONFTESTS); do $(BIN)/mypy --no-warn-unused-configs $$file || exit 1; done

# the desktop module's worker package set, built on a stand-in for Slicer 5.10's Python (pyenv's
# 3.12.1 with Slicer's pinned packages; a few minutes, torch with its CUDA libraries from PyPI);
# also part of `make test`
test-slicer-packages: $(STAMP)
	$(BIN)/python -m pytest -q InstructX2X/Testing/Python/test_slicer_package_set.py

# the torchxrayvision back-end, in its own environment
test-eval: $(EVAL_STAMP)
	$(EVAL_VENV)/bin/python -m pytest -q -m xrv Testing/test_xrv_classifiers.py

# the browser panel, in its own environment: without a browser, against hostile clients, then in
# Debian's chromium
test-web: $(WEB_STAMP)
	$(WEB_VENV)/bin/python -m pytest -q -m web Testing/test_web_access.py Testing/test_web_panel.py \
		Testing/test_web_hostile.py Testing/test_web_browser.py

# how long `make demo-model`'s pairs and training would take on this CPU, from a sample of a minute or two
demo-model-estimate: $(STAMP)
	$(BIN)/python Testing/benchmarks/benchmark_training.py --sections demo --steps 8

benchmark: $(STAMP)
	$(BIN)/python Testing/benchmarks/benchmark_pipeline.py
	$(BIN)/python Testing/benchmarks/benchmark_dicom.py
	$(BIN)/python Testing/benchmarks/benchmark_dataset.py

clean:
	rm -rf $(VENV) $(EVAL_VENV) $(WEB_VENV) out
