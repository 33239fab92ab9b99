"""The page: a toolbar with the SYNTHETIC banner, a drawer with the inputs, the mask tools, the
run controls and the results, and the slice view; each button calls its component's method,
each field is bound to a state key (``controls.WRITABLE_STATE`` lists those a page may write)."""

from __future__ import annotations

from typing import Any

from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from .controls import Controls
from .exports import ResultExports
from .jobs import PageJobs
from .loading import UPLOAD_TRIGGER, RadiographLoader

__all__ = ["build_page"]


def build_page(
    server: Any,
    layout_manager: Any,
    controls: Controls,
    loader: RadiographLoader,
    jobs: PageJobs,
    exports: ResultExports,
) -> SinglePageWithDrawerLayout:
    """Register the page's triggers (upload chunks, downloads) and build its layout on
    ``server``, the slice view from ``layout_manager``'s grid."""
    server.trigger(UPLOAD_TRIGGER)(loader.receive_chunk)
    server.trigger("download_dicom")(lambda: server.protocol.addAttachment(exports.result_archive("dicom")))
    server.trigger("download_png")(lambda: server.protocol.addAttachment(exports.result_archive("png")))
    upload = f"error = window.instructx2x_upload($event, '{UPLOAD_TRIGGER}', max_upload_mb)"
    with SinglePageWithDrawerLayout(server, full_height=True) as layout:
        layout.title.set_text("InstructX2X")
        with layout.toolbar:
            v3.VSpacer()
            v3.VChip(
                "SYNTHETIC counterfactual - NOT FOR DIAGNOSIS",
                color="error",
                variant="flat",
                v_show="has_result && show_after",
                raw_attrs=['data-testid="synthetic-banner"'],
                classes="mr-2",
            )
            html.Span("{{ description }}", classes="text-caption mr-4")
        with layout.drawer as drawer:
            drawer.width = 400
            with v3.VContainer(classes="pa-3"):
                _inputs(upload, controls)
                _mask()
                _run(jobs)
                _results(exports)
        with layout.content:
            with html.Div(
                style="position: relative; width: 100%; height: calc(100vh - 64px);",
                raw_attrs=['data-testid="slice-view"'],
            ):
                layout_manager.initialize_layout_grid(layout)
    return layout


def _inputs(upload: str, controls: Controls) -> None:
    v3.VAlert(
        "{{ error }}",
        v_if="error",
        type="error",
        density="compact",
        closable=True,
        raw_attrs=['data-testid="error"'],
        classes="mb-2",
        click_close="error = ''",
    )
    with v3.VRow(dense=True):
        with v3.VCol():
            v3.VFileInput(
                label="Open radiograph (DICOM, PNG)",
                multiple=True,
                density="compact",
                prepend_icon="mdi-file-upload",
                change=upload,
                hide_details=True,
                accept=".dcm,.dicom,.png,.jpg,.jpeg,application/dicom,image/png,image/jpeg",
                raw_attrs=['data-testid="open-file"'],
            )
        with v3.VCol(cols="auto"):
            v3.VFileInput(
                label="Folder",
                density="compact",
                prepend_icon="mdi-folder-upload",
                change=upload,
                hide_input=True,
                hide_details=True,
                raw_attrs=["webkitdirectory", 'data-testid="open-folder"'],
            )
    v3.VCombobox(
        v_model=("instruction",),
        items=("completions",),
        label="Instruction",
        density="compact",
        hide_details=True,
        classes="mt-3",
        raw_attrs=['data-testid="instruction"'],
    )
    html.Div("{{ parsed }}", classes="text-caption mt-1 mb-2", raw_attrs=['data-testid="parsed"'])
    with v3.VExpansionPanels(classes="mb-2"):
        with v3.VExpansionPanel(title="Compose an instruction"):
            with v3.VExpansionPanelText():
                for key, label, items in (
                    ("compose_operation", "Operation", "operations"),
                    ("compose_finding", "Finding", "findings"),
                    ("compose_side", "Side", "sides"),
                    ("compose_zone", "Lung zone (focal opacity)", "zones"),
                    ("compose_from", "From level (change)", "levels"),
                    ("compose_to", "To level (change; add: level)", "levels"),
                ):
                    v3.VSelect(
                        v_model=(key,),
                        items=(items,),
                        label=label,
                        density="compact",
                        hide_details=True,
                        classes="mb-1",
                    )
                v3.VBtn(
                    "Use this instruction",
                    click=controls.compose,
                    block=True,
                    raw_attrs=['data-testid="compose"'],
                )


def _mask() -> None:
    v3.VSelect(
        v_model=("mask_source",),
        items=("mask_sources",),
        label="Region to edit",
        density="compact",
        hide_details=True,
        raw_attrs=['data-testid="mask-source"'],
    )
    with v3.VBtnToggle(
        v_model=("tool",), mandatory=True, density="compact", classes="mt-2", disabled=("!loaded",)
    ):
        v3.VBtn(icon="mdi-cursor-default", value="none", raw_attrs=['data-testid="tool-none"'])
        v3.VBtn(icon="mdi-brush", value="paint", raw_attrs=['data-testid="tool-paint"'])
        v3.VBtn(icon="mdi-eraser", value="erase", raw_attrs=['data-testid="tool-erase"'])
        v3.VBtn(icon="mdi-content-cut", value="scissors", raw_attrs=['data-testid="tool-scissors"'])
    with v3.VBtnToggle(v_model=("segment",), mandatory=True, density="compact", classes="mt-2 ml-2"):
        v3.VBtn("Edit", value="edit", raw_attrs=['data-testid="segment-edit"'])
        v3.VBtn("Keep", value="keep", raw_attrs=['data-testid="segment-keep"'])
    v3.VSlider(
        v_model=("brush_mm",),
        min=2,
        max=80,
        step=1,
        label="Brush (mm)",
        density="compact",
        hide_details=True,
        thumb_label=True,
        classes="mt-2",
        raw_attrs=['data-testid="brush"'],
    )
    v3.VCheckbox(
        v_model=("scissors_fill",),
        label="Scissors fill inside (else erase inside)",
        density="compact",
        hide_details=True,
    )


def _run(jobs: PageJobs) -> None:
    with v3.VRow(dense=True, classes="mt-2"):
        with v3.VCol():
            v3.VBtn(
                "Preview guidance",
                block=True,
                click=lambda: jobs.submit("preview"),
                disabled=("!loaded || running",),
                raw_attrs=['data-testid="preview"'],
            )
        with v3.VCol():
            v3.VBtn(
                "{{ running ? 'Cancel' : 'Apply' }}",
                block=True,
                color="primary",
                click=jobs.apply_or_cancel,
                disabled=("!loaded",),
                raw_attrs=['data-testid="apply"'],
            )
    with v3.VRow(dense=True, classes="mt-1"):
        with v3.VCol(cols=8):
            v3.VTextField(
                v_model=("series",),
                label="Series: levels (small, moderate, large) or instructions (;)",
                density="compact",
                hide_details=True,
                raw_attrs=['data-testid="series"'],
            )
        with v3.VCol(cols=4):
            v3.VBtn(
                "Apply series",
                block=True,
                click=lambda: jobs.submit("series"),
                disabled=("!loaded || running",),
                raw_attrs=['data-testid="apply-series"'],
            )
    v3.VSlider(
        v_model=("tau",),
        min=0,
        max=1,
        step=0.01,
        label="tau",
        thumb_label=True,
        density="compact",
        hide_details=True,
        classes="mt-2",
        raw_attrs=['data-testid="tau"'],
    )
    v3.VProgressLinear(
        model_value=("progress",),
        height=18,
        color="primary",
        classes="mt-1",
        raw_attrs=['data-testid="progress"'],
    )
    html.Div(
        "{{ progress }} % {{ progress_text }}",
        classes="text-caption",
        raw_attrs=['data-testid="progress-text"'],
    )
    html.Div("{{ queue_text }}", classes="text-caption", raw_attrs=['data-testid="queue"'])
    html.Div("{{ status }}", classes="text-body-2 mt-1", raw_attrs=['data-testid="status"'])
    with v3.VExpansionPanels(classes="mt-2"):
        with v3.VExpansionPanel(title="Advanced"):
            with v3.VExpansionPanelText():
                v3.VSelect(v_model=("preset",), items=("presets",), label="Quality", density="compact")
                v3.VSelect(
                    v_model=("backend",),
                    items=("backends",),
                    label="Backend",
                    density="compact",
                    disabled=("shared_worker",),
                    hint="auto: OpenVINO where it measured faster (a large model on an AMX CPU), "
                    "else PyTorch; with a shared worker, the worker's own",
                    persistent_hint=True,
                    raw_attrs=['data-testid="backend"'],
                )
                html.Div(
                    "{{ worker_status }}",
                    classes="text-caption mb-2",
                    raw_attrs=['data-testid="worker-status"'],
                )
                v3.VTextField(
                    v_model_number=("steps",),
                    type="number",
                    label="Steps (0: default)",
                    density="compact",
                )
                v3.VTextField(v_model_number=("seed",), type="number", label="Seed", density="compact")
                v3.VCheckbox(
                    v_model=("model_guidance",),
                    label="Model's guidance scales (its card's s_T, s_I)",
                    density="compact",
                    update_modelValue=(jobs.show_model_defaults, "[$event]"),
                    raw_attrs=['data-testid="model-guidance"'],
                )
                v3.VTextField(
                    v_model_number=("guidance_scale",),
                    type="number",
                    label="Text guidance s_T",
                    density="compact",
                    disabled=("model_guidance",),
                    raw_attrs=['data-testid="guidance-scale"'],
                )
                v3.VTextField(
                    v_model_number=("image_guidance_scale",),
                    type="number",
                    label="Image guidance s_I",
                    density="compact",
                    disabled=("model_guidance",),
                    raw_attrs=['data-testid="image-guidance-scale"'],
                )
                v3.VCheckbox(v_model=("verify",), label="Verify the edit with classifiers", density="compact")
                v3.VCheckbox(
                    v_model=("include_demographics",),
                    disabled=("!verify",),
                    density="compact",
                    label="Include the classifiers' age, sex and race estimates in the report "
                    "(model estimates, not the patient's data)",
                    raw_attrs=['data-testid="include-demographics"'],
                )


def _results(exports: ResultExports) -> None:
    with html.Div(v_if="series_count > 1", classes="mt-3"):
        v3.VSlider(
            v_model=("series_step",),
            min=1,
            max=("series_count",),
            step=1,
            show_ticks="always",
            label="Series step",
            density="compact",
            hide_details=True,
            raw_attrs=['data-testid="series-step"'],
        )
        html.Div("{{ series_text }}", classes="text-caption", raw_attrs=['data-testid="series-text"'])
    v3.VSlider(
        v_model=("opacity",),
        min=0,
        max=1,
        step=0.05,
        label="Guidance overlay",
        density="compact",
        hide_details=True,
        classes="mt-3",
        raw_attrs=['data-testid="opacity"'],
    )
    v3.VSwitch(
        v_model=("show_after",),
        label="After (counterfactual) / before (input)",
        density="compact",
        hide_details=True,
        disabled=("!has_result",),
        raw_attrs=['data-testid="before-after"'],
    )
    with v3.VRow(dense=True):
        with v3.VCol():
            v3.VBtn(
                "DICOM series",
                block=True,
                prepend_icon="mdi-download",
                disabled=("!has_result || !has_dicom",),
                raw_attrs=['data-testid="download-dicom"'],
                click="utils.download('instructx2x-dicom.zip', trigger('download_dicom'), 'application/zip')",
            )
        with v3.VCol():
            v3.VBtn(
                "PNGs",
                block=True,
                prepend_icon="mdi-download",
                disabled=("!has_result",),
                raw_attrs=['data-testid="download-png"'],
                click="utils.download('instructx2x-png.zip', trigger('download_png'), 'application/zip')",
            )
    html.Pre(
        "{{ verification }}",
        v_if="verification",
        classes="text-caption mt-2",
        style="white-space: pre-wrap;",
        raw_attrs=['data-testid="verification"'],
    )
    with v3.VExpansionPanels(classes="mt-2"):
        with v3.VExpansionPanel(title="Send to PACS (C-STORE)"):
            with v3.VExpansionPanelText():
                v3.VSelect(
                    v_model=("pacs_target",),
                    items=("pacs_names",),
                    label="PACS (the server's list)",
                    density="compact",
                    no_data_text="The server names no PACS (--pacs).",
                    raw_attrs=['data-testid="pacs-target"'],
                )
                v3.VBtn(
                    "Test connection",
                    click=lambda: exports.pacs("echo"),
                    classes="mr-2",
                    raw_attrs=['data-testid="pacs-echo"'],
                )
                v3.VBtn(
                    "Send",
                    click=lambda: exports.pacs("send"),
                    disabled=("!has_result || !has_dicom",),
                    raw_attrs=['data-testid="pacs-send"'],
                )
                html.Div(
                    "{{ pacs_message }}",
                    classes="text-caption mt-1",
                    raw_attrs=['data-testid="pacs-message"'],
                )
