"""InstructX2X: interpretable local editing of chest radiographs (MICCAI 2025).

InstructPix2Pix fine-tuned on MIMIC-EDIT-INSTRUCTION, with Region-Specific Editing:
relevance map x anatomical pseudo mask -> guidance map -> thresholded edit mask.

``import instructx2x`` is light: the instruction parser, vocabulary, errors, job schema and
provenance reader load without torch; the model classes are imported on first use (PEP 562),
so a Slicer panel or a browser front end can parse and validate before any model is needed.
"""

from __future__ import annotations

import importlib

from ._version import __version__ as __version__

# public name -> module that defines it; imported on first attribute access
_LAZY = {
    "EditParameters": "parameters",
    "RegionMode": "parameters",
    "EditResult": "editor",
    "InstructX2XEditor": "editor",
    "DicomReadError": "dicom.read",
    "read_dicom": "dicom.read",
    "export_dicom_edit": "dicom.export",
    "read_provenance": "provenance",
    "Radiograph": "image_io",
    "read_image": "image_io",
    "ParsedInstruction": "instructions",
    "parse_instruction": "instructions",
    "ModelInfo": "loading",
    "load_pipeline": "loading",
    "InstructX2XPipeline": "pipeline",
    "InstructX2XPipelineOutput": "pipeline",
    "PriorSelection": "priors",
    "PriorSet": "priors",
    "make_scheduler": "schedulers",
    "EditJob": "jobs",
    "InstructX2XError": "errors",
    "InputError": "errors",
    "ParameterError": "errors",
    "EmptyEditRegionError": "errors",
    "ModelLoadError": "errors",
    "ResourceError": "errors",
    "PacsError": "errors",
    "EditCancelled": "errors",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'instructx2x' has no attribute {name!r}")
    module = importlib.import_module(f".{_LAZY[name]}", __name__)
    if _LAZY[name].startswith("dicom") or name == "read_image":
        importlib.import_module(".dicom.read", __name__)  # registers the DICOM reader
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
