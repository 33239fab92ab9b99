"""DICOM in and out: read radiographs, write synthetic Secondary Capture + SEG, push to PACS.

Importing this package registers the DICOM reader with ``instructx2x.image_io``.
"""

from .export import export_dicom_edit
from .read import DicomReadError, read_dicom

__all__ = ["DicomReadError", "export_dicom_edit", "read_dicom"]
