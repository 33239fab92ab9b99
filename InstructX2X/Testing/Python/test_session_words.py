"""The panels' shared words, without a worker or a scene: what the status line says for each
worker event (``status_text``), the line about the loaded model (``WorkerModel.describe``), the
library's advice in the panels' words (``panel_message``) and the lists both panels offer
(``PanelChoice``: a member's label, the labels in order, the member a label names, an unknown
label refused)."""

import pytest

from instructx2x import backends
from instructx2x.errors import InstructX2XError
from InstructX2XModuleLib.scene import SceneError
from InstructX2XModuleLib.session import (
    Backend,
    MaskSource,
    Operation,
    PanelChoice,
    Preset,
    WorkerMode,
    WorkerModel,
    panel_message,
    plan_series,
    status_text,
)

SHARED_READY = {
    "event": "ready",
    "model": {"name": "demo", "trained": True},
    "precision": {"dtype": "bfloat16", "reason": "AMX"},
    "defaults": None,
}


@pytest.mark.parametrize(
    "event,text",
    [
        ({"event": "progress", "step": 3, "total": 20, "eta_s": 12.4}, "Step 3 of 20, about 12 s left"),
        ({"event": "progress", "step": 1, "total": 20, "eta_s": None}, "Step 1 of 20"),
        ({"event": "progress", "step": 20, "total": 20}, "Step 20 of 20"),
        ({"event": "loading"}, "Loading the model…"),
        ({"id": "2", "event": "started"}, "Working…"),
        ({"id": "2", "event": "decode"}, "Decoding…"),
        ({"id": "2", "event": "export"}, "Writing the results…"),
        ({"id": "2", "event": "cancelled"}, "Cancelled: nothing was written."),
        (
            {"id": "2", "event": "error", "message": "out of memory on the device"},
            "Failed: out of memory on the device",
        ),
        ({"event": "error"}, "Failed: the worker failed."),
        ({"event": "error", "message": ""}, "Failed: the worker failed."),
    ],
)
def test_each_worker_event_has_its_status_line(event, text):
    assert status_text(event) == text
    assert status_text(event, shared_worker=True) == text  # only ready depends on the worker


@pytest.mark.parametrize(
    "event",
    [
        {"id": "2", "event": "done", "output": "/tmp/job-002/edit"},  # the session's result_text
        {"id": "2", "event": "queued", "position": 1},  # the session's queue_position
        SHARED_READY,  # a local worker's model is the panel's own choice
        {"event": "jobs"},
        {},
    ],
)
def test_results_places_and_a_local_ready_are_not_said_on_the_status_line(event):
    assert status_text(event) is None


def test_a_shared_workers_ready_names_the_model_it_serves():
    assert (
        status_text(SHARED_READY, shared_worker=True)
        == "Shared worker ready: its model demo (bfloat16, torch)."
    )
    openvino = {**SHARED_READY, "backend": {"name": "openvino"}}
    assert (
        status_text(openvino, shared_worker=True)
        == "Shared worker ready: its model demo (bfloat16, openvino)."
    )
    assert (
        status_text({"event": "ready"}, shared_worker=True) == "Shared worker ready: its model ? (?, torch)."
    )


def test_the_model_line_says_what_runs_it_and_why():
    cache = (
        "converted again for OpenVINO 2026.4.1: the cache held this model converted with openvino 2025.0.0"
    )
    reason = "auto: OpenVINO, measured 1.8x less CPU time on this CPU kind (amx)"
    model = WorkerModel.from_ready(
        {**SHARED_READY, "backend": {"name": "openvino", "reason": reason, "cache": cache}}
    )
    assert (model.backend, model.backend_reason, model.backend_cache) == ("openvino", reason, cache)
    assert model.describe() == (
        "Model demo (bfloat16) runs on OpenVINO: auto: OpenVINO, measured 1.8x less CPU time on this "
        "CPU kind (amx) (converted again for OpenVINO 2026.4.1: the cache held this model converted "
        "with openvino 2025.0.0)."
    )
    torch = WorkerModel.from_ready(
        {**SHARED_READY, "backend": {"name": "torch", "reason": "torch as requested"}}
    )
    assert torch.describe() == "Model demo (bfloat16) runs on PyTorch: torch as requested."
    assert WorkerModel.from_ready({"event": "ready"}).describe() == "Model ? (?) runs on PyTorch."
    later = WorkerModel.from_ready({**SHARED_READY, "backend": {"name": "onnx"}})
    assert later.describe() == "Model demo (bfloat16) runs on onnx."  # a later worker's runtime, by its name


def refusal(call) -> str:
    with pytest.raises(InstructX2XError) as refused:
        call()
    return str(refused.value)


def test_the_librarys_advice_is_said_with_the_panels_controls(monkeypatch, tmp_path):
    """The worker's messages name command-line options and pip; a panel says its own controls
    and how it gets OpenVINO (the messages are the library's own, raised here)."""
    monkeypatch.setattr(backends, "openvino_available", lambda: False)
    missing = refusal(lambda: backends.check_backend("openvino"))
    assert backends.OPENVINO_EXTRA in missing and "--backend torch" in missing
    hint = "press Preview with Backend: OpenVINO to add it"
    assert panel_message(missing, hint) == (
        "Backend: OpenVINO needs the OpenVINO runtime, which is not installed (or does not import): "
        "press Preview with Backend: OpenVINO to add it (or choose Backend: PyTorch)."
    )
    assert backends.OPENVINO_EXTRA in panel_message(missing)  # no hint: the pip command stays
    monkeypatch.undo()
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    unwritable = panel_message(refusal(lambda: backends.check_cache_folder(blocked)), hint)
    assert unwritable.startswith(f"the OpenVINO cache folder {blocked} is not writable")
    assert unwritable.endswith(f"set {backends.CACHE_ENV} to a writable folder, or use Backend: PyTorch.")
    on_gpu = panel_message(refusal(lambda: backends.check_backend("openvino", "cuda")), hint)
    assert on_gpu.endswith("not on 'cuda': choose Device: cpu (or auto), or Backend: PyTorch.")
    for text in (missing, unwritable, on_gpu):
        assert "--" not in panel_message(text, hint)


def test_the_backend_choice_names_the_workers_option():
    assert [member.option for member in Backend] == list(backends.BACKENDS)
    for member in Backend:
        assert Backend.from_option(member.option) is member
    with pytest.raises(SceneError, match="unknown backend 'onnx'; choose one of auto, PyTorch, OpenVINO"):
        Backend.from_option("onnx")


CHOICES = {
    MaskSource: ["anatomical prior", "painted segment", "painted segment and prior"],
    Preset: ["fast (device default)", "paper (DDIM 100 steps)"],
    Backend: ["auto", "PyTorch", "OpenVINO"],
    Operation: ["Add", "Remove", "Change the level of"],
    WorkerMode: ["local", "shared socket"],
}


@pytest.mark.parametrize("choice", CHOICES)
def test_each_choice_lists_its_labels_in_order_and_finds_each_member_by_its_label(choice):
    assert choice.labels() == CHOICES[choice]
    assert [member.label for member in choice] == CHOICES[choice]
    for member in choice:
        assert choice.from_label(member.label) is member


def test_the_members_the_panels_name_carry_their_labels():
    assert MaskSource.PRIOR.label == "anatomical prior" and MaskSource.PAINTED.label == "painted segment"
    assert MaskSource.PAINTED_AND_PRIOR.label == "painted segment and prior"
    assert (Preset.FAST.label, Preset.PAPER.label) == ("fast (device default)", "paper (DDIM 100 steps)")
    assert (Operation.ADD.label, Operation.REMOVE.label) == ("Add", "Remove")
    assert Operation.CHANGE_LEVEL.label == "Change the level of"
    assert (WorkerMode.LOCAL.label, WorkerMode.SHARED.label) == ("local", "shared socket")


@pytest.mark.parametrize(
    "choice,label",
    [
        (MaskSource, "painted"),  # a prefix of a label is not the label
        (MaskSource, "Anatomical prior"),  # labels are compared exactly
        (Preset, "paper"),
        (Operation, "add"),
        (Operation, "Local"),
        (WorkerMode, "shared"),
        (Backend, "openvino"),  # the worker's option is not the label
        (WorkerMode, "Add"),  # another choice's label
        (WorkerMode, ""),
        (Preset, None),
    ],
)
def test_an_unknown_label_is_refused_with_the_choices_named(choice, label):
    with pytest.raises(SceneError) as refused:
        choice.from_label(label)
    assert str(refused.value) == f"unknown choice {label!r}; choose one of {', '.join(CHOICES[choice])}."


def test_every_panel_choice_is_tested_here():
    assert set(PanelChoice.__subclasses__()) == set(CHOICES)


@pytest.mark.parametrize(
    "instruction, series, job",
    [
        (
            "Change the level of left pleural effusion from small to large",
            "moderate, large",
            ("Change the level of left pleural effusion from small to {level}", ("moderate", "large")),
        ),
        (
            "Add the finding of moderate edema",
            "mild; moderate\nsevere",
            ("Add the finding of {level} edema", ("mild", "moderate", "severe")),
        ),
        (
            "Add the finding of left lower zone consolidation",
            "severe, mild",  # a falling series
            ("Add the finding of {level} left lower zone consolidation", ("severe", "mild")),
        ),
        (
            "Add the finding of {level} right pneumothorax",
            "small,large",
            ("Add the finding of {level} right pneumothorax", ("small", "large")),
        ),
        (
            "ignored when the steps are instructions",
            "Change the level of edema from mild to moderate\nChange the level of edema from mild to severe",
            (
                "Change the level of edema from mild to moderate",
                (
                    "Change the level of edema from mild to moderate",
                    "Change the level of edema from mild to severe",
                ),
            ),
        ),
    ],
)
def test_a_series_field_becomes_the_workers_instruction_and_steps(instruction, series, job):
    """Levels fill the instruction's level: the one it changes to, the one it adds, or before
    the finding it adds; instructions are the steps themselves."""
    assert plan_series(instruction, series) == job
