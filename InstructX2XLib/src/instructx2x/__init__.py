"""InstructX2X: interpretable local editing of chest radiographs (MICCAI 2025).

InstructPix2Pix fine-tuned on MIMIC-EDIT-INSTRUCTION, with Region-Specific Editing:
relevance map x anatomical pseudo mask -> guidance map -> thresholded edit mask.
"""

__version__ = "0.1.0"

from .editor import EditParameters, EditResult, InstructX2XEditor  # noqa: E402
from .dicom import DicomReadError, export_dicom_edit, read_dicom  # noqa: E402  (registers the reader)
from .guidance import RegionMode  # noqa: E402
from .image_io import Radiograph, read_image  # noqa: E402
from .instructions import ParsedInstruction, parse_instruction  # noqa: E402
from .loading import ModelInfo, ModelLoadError, load_pipeline  # noqa: E402
from .pipeline import EditCancelled, InstructX2XPipeline, InstructX2XPipelineOutput  # noqa: E402
from .priors import PriorSelection, PriorSet  # noqa: E402
from .schedulers import make_scheduler  # noqa: E402

__all__ = [
    "DicomReadError", "EditCancelled", "EditParameters", "EditResult", "InstructX2XEditor", "InstructX2XPipeline",
    "InstructX2XPipelineOutput", "ModelInfo", "ModelLoadError", "ParsedInstruction",
    "PriorSelection", "PriorSet", "Radiograph", "RegionMode", "load_pipeline", "make_scheduler",
    "parse_instruction", "read_dicom", "read_image", "export_dicom_edit",
]
