"""Build the DICOM objects of one edit with highdicom: strict, synthetic, traceable.

Per edit, in the source's study:

* series A (Modality OT): the counterfactual as a grayscale Secondary Capture at the source's
  rows, columns, bit depth and photometric interpretation (instance 1), and the guidance map
  over the image as an RGB Secondary Capture (instance 2);
* series B (Modality SEG): the binary edit region as a DICOM Segmentation of the source.

A series holds one modality, so the SEG cannot share series A. A progression series
(``build_series_objects``) writes every step's counterfactual as one series, instance numbers in
step order, with the overlay and the SEG of the edit region the steps share. Every object says it is
synthetic (ConversionType SYN, SeriesDescription, ImageComments, a coded derivation) and
carries the provenance manifest in a private block. All three carry the same patient and
study attributes (``patient.apply_patient_policy``).
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import warnings

import highdicom as hd
import numpy as np
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from .. import __version__
from ..errors import InputError
from ..provenance import PRIVATE_CREATOR, PRIVATE_GROUP, PROVENANCE_ELEMENT, read_provenance, to_json
from .patient import apply_patient_policy, patient_study_attributes

__all__ = [
    "EditObjects",
    "SeriesObjects",
    "build_edit_objects",
    "build_series_objects",
    "burned_in_annotation",
    "check_exportable",
    "series_numbers",
    "SERIES_DESCRIPTION",
    "PRIVATE_CREATOR",
    "read_provenance",
]

SERIES_DESCRIPTION = "SYNTHETIC - NOT FOR DIAGNOSIS"
SEG_SERIES_DESCRIPTION = "SYNTHETIC EDIT REGION"
# Person-name attributes copied from the source into every object (Patient and General Study).
PERSON_NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")
# Transfer syntaxes whose compression loses information (PS3.5 section 8 and 10).
LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",
}
MANUFACTURER = "InstructX2X"
# Derivation Code Sequence. CID 7203 "Image Derivation" (PS3.16) has no concept for an image
# made by a generative model; the group is extensible, so a local coding scheme (a "99"
# designator, PS3.16 section 8) states it, declared in every object that uses it.
LOCAL_SCHEME = "99IX2X"
GENERATED_FROM_SOURCE = Code(
    "IX2X-GEN", LOCAL_SCHEME, "Synthesized by a generative model from the source image"
)
GUIDANCE_OVERLAY = Code("IX2X-OVERLAY", LOCAL_SCHEME, "Guidance map blended over the source image")
# The counterfactual keeps the source's pixels outside the edit mask and the generated ones inside.
COUNTERFACTUAL_DERIVATION = (GENERATED_FROM_SOURCE, codes.cid7203.PixelByPixelMask)


@dataclasses.dataclass(frozen=True)
class EditObjects:
    """The three datasets of one edit."""

    counterfactual: Dataset
    overlay: Dataset
    segmentation: Dataset

    def named(self) -> dict[str, Dataset]:
        """File name -> dataset, in writing order."""
        return {
            "counterfactual.dcm": self.counterfactual,
            "guidance_overlay.dcm": self.overlay,
            "edit_region_seg.dcm": self.segmentation,
        }


@dataclasses.dataclass(frozen=True)
class SeriesObjects:
    """The datasets of a progression series: one counterfactual per step (one series), the
    guidance overlay and the SEG of the edit region they share."""

    steps: tuple[Dataset, ...]
    overlay: Dataset
    segmentation: Dataset

    def named(self) -> dict[str, Dataset]:
        """File name -> dataset, in writing order: ``step-01.dcm``, ``step-02.dcm``, ..., then the
        overlay and the SEG."""
        return {
            **{f"step-{number:02d}.dcm": step for number, step in enumerate(self.steps, start=1)},
            "guidance_overlay.dcm": self.overlay,
            "edit_region_seg.dcm": self.segmentation,
        }


def build_edit_objects(
    source: Dataset,
    stored: np.ndarray,
    overlay_rgb: np.ndarray,
    edit_mask: np.ndarray,
    provenance: dict,
    pixel_spacing: tuple[float, float] | None = None,
) -> EditObjects:
    """Build the counterfactual SC, the overlay SC and the edit-region SEG.

    Parameters
    ----------
    source: pydicom.Dataset
        The original radiograph's dataset (pixel data not needed).
    stored: numpy.ndarray
        Counterfactual stored values, the source's shape and dtype (uint8 or uint16).
    overlay_rgb: numpy.ndarray
        uint8 ``(rows, columns, 3)``.
    edit_mask: numpy.ndarray
        bool ``(rows, columns)``.
    provenance: dict
        JSON-ready manifest; stored in every object.
    pixel_spacing: tuple[float, float] | None
        Row and column spacing (mm) for the Secondary Captures, so that measurements on the
        counterfactual match the original's.

    Returns
    -------
    EditObjects

    Raises
    ------
    ValueError
        When shapes or dtypes disagree with the source, or the mask is empty.
    NotImplementedError
        For signed stored values, which Secondary Capture in highdicom does not take.
    """
    _check_arrays(source, [stored], overlay_rgb, edit_mask)
    with warnings.catch_warnings():
        # highdicom's checks of the copied person names quote the name itself in their
        # warnings (SC and SEG alike); patient and physician names must not reach logs.
        warnings.filterwarnings("ignore", message=".*person name", category=UserWarning)
        return _build(source, stored, overlay_rgb, edit_mask, provenance, pixel_spacing)


def build_series_objects(
    source: Dataset,
    stored_steps: list[np.ndarray],
    overlay_rgb: np.ndarray,
    edit_mask: np.ndarray,
    provenances: list[dict],
    region_provenance: dict,
    pixel_spacing: tuple[float, float] | None = None,
) -> SeriesObjects:
    """Build a progression series: one counterfactual SC per step, in one series with instance
    numbers in step order, and the overlay SC and SEG of the edit region the steps share.

    Parameters
    ----------
    source: pydicom.Dataset
        The original radiograph's dataset.
    stored_steps: list[numpy.ndarray]
        Each step's counterfactual stored values, as ``build_edit_objects`` takes one.
    overlay_rgb, edit_mask, pixel_spacing
        As for ``build_edit_objects``; the overlay and mask the steps share.
    provenances: list[dict]
        Each step's manifest (its instruction and its ``series`` entry), stored in its object and
        stated in its ImageComments and DerivationDescription.
    region_provenance: dict
        The manifest of the overlay and the SEG; its ``series`` entry (``ParsedSeries.to_dict``)
        names the series in every SeriesDescription.

    Returns
    -------
    SeriesObjects

    Raises
    ------
    ValueError
        As ``build_edit_objects``, or when the steps and their manifests differ in number.
    NotImplementedError
        As ``build_edit_objects``.
    """
    if len(stored_steps) != len(provenances) or not stored_steps:
        raise ValueError(
            f"{len(stored_steps)} steps' pixels and {len(provenances)} manifests: give one each."
        )
    _check_arrays(source, stored_steps, overlay_rgb, edit_mask)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*person name", category=UserWarning)  # as above
        context = _Context.of(source, pixel_spacing)
        sc_number, overlay_number, seg_number = series_numbers()
        text = _series_text(region_provenance.get("series", {}))
        description = _series_description(SERIES_DESCRIPTION, text)
        series_uid = hd.UID()
        steps = tuple(
            _counterfactual(
                context,
                stored,
                provenance,
                description,
                _summary(provenance) + f" Step {number} of {len(stored_steps)} of a progression series "
                f"({text}); counterfactual image.",
                (series_uid, sc_number, number),
            )
            for number, (stored, provenance) in enumerate(zip(stored_steps, provenances), start=1)
        )
        overlay, segmentation = _region_objects(
            context,
            overlay_rgb,
            edit_mask,
            region_provenance,
            (description, _series_description(SEG_SERIES_DESCRIPTION, text)),
            _summary(region_provenance) + f" The edit region every step of the series ({text}) shares.",
            (overlay_number, seg_number),
        )
        objects = SeriesObjects(steps, overlay, segmentation)
        context.apply_policy(objects.named().values())
        return objects


def _check_arrays(
    source: Dataset, stored_steps: list[np.ndarray], overlay_rgb: np.ndarray, edit_mask
) -> None:
    rows, columns = int(source.Rows), int(source.Columns)
    for stored in stored_steps:
        if stored.shape != (rows, columns):
            raise ValueError(f"stored pixels {stored.shape} must match the source ({rows}, {columns}).")
    if overlay_rgb.shape != (rows, columns, 3) or overlay_rgb.dtype != np.uint8:
        raise ValueError(
            f"overlay must be uint8 ({rows}, {columns}, 3), got {overlay_rgb.dtype} {overlay_rgb.shape}."
        )
    if edit_mask.shape != (rows, columns):
        raise ValueError(f"edit mask {edit_mask.shape} must match the source ({rows}, {columns}).")
    if not edit_mask.any():
        raise ValueError("the edit mask is empty: there is no edit region to export.")
    if int(source.get("PixelRepresentation", 0)) == 1:
        raise NotImplementedError("signed stored values cannot be written as Secondary Capture.")
    for stored in stored_steps:
        if stored.dtype not in (np.uint8, np.uint16):
            raise ValueError(f"stored pixels must be uint8 or uint16, got {stored.dtype}.")


@dataclasses.dataclass(frozen=True)
class _Context:
    """What every object of one edit or series takes from the source."""

    source: Dataset
    attributes: Dataset  # the patient and study attributes of the policy
    reference: Dataset  # the source header as the builders see it
    orientation: tuple[str, str] | None
    coordinates: dict

    @classmethod
    def of(cls, source: Dataset, pixel_spacing: tuple[float, float] | None) -> _Context:
        attributes = patient_study_attributes(source)
        orientation = _patient_orientation(source)
        coordinates: dict = (
            {"coordinate_system": "PATIENT", "patient_orientation": orientation}
            if orientation
            else {"coordinate_system": None}
        )
        if pixel_spacing is not None:
            coordinates["pixel_spacing"] = tuple(float(v) for v in pixel_spacing)
        return cls(source, attributes, _reference_dataset(source, attributes), orientation, coordinates)

    def apply_policy(self, datasets) -> None:
        for dataset in datasets:  # the SCs take fewer attributes than the policy
            apply_patient_policy(dataset, self.attributes)


def _build(source, stored, overlay_rgb, edit_mask, provenance, pixel_spacing) -> EditObjects:
    context = _Context.of(source, pixel_spacing)
    sc_number, overlay_number, seg_number = series_numbers()
    instruction = _instruction_text(provenance)
    description = _series_description(SERIES_DESCRIPTION, instruction)
    text = _summary(provenance)
    counterfactual = _counterfactual(
        context, stored, provenance, description, text + " Counterfactual image.", (hd.UID(), sc_number, 1)
    )
    overlay, segmentation = _region_objects(
        context,
        overlay_rgb,
        edit_mask,
        provenance,
        (description, _series_description(SEG_SERIES_DESCRIPTION, instruction)),
        text,
        (overlay_number, seg_number),
    )
    objects = EditObjects(counterfactual, overlay, segmentation)
    context.apply_policy(objects.named().values())
    return objects


def _counterfactual(
    context: _Context,
    stored: np.ndarray,
    provenance: dict,
    description: str,
    comments: str,
    placement: tuple[str, int, int],
) -> Dataset:
    """The counterfactual SC at ``placement`` (series UID, series number, instance number)."""
    series_uid, series_number, instance_number = placement
    counterfactual = hd.sc.SCImage.from_ref_dataset(
        context.reference,
        stored,
        str(context.source.PhotometricInterpretation),
        stored.dtype.itemsize * 8,
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        **context.coordinates,
    )
    _mark_synthetic_derivative(
        counterfactual, context.source, provenance, description, comments, COUNTERFACTUAL_DERIVATION
    )
    _copy_grayscale_presentation(counterfactual, context.source)
    return counterfactual


def _region_objects(
    context: _Context,
    overlay_rgb: np.ndarray,
    edit_mask: np.ndarray,
    provenance: dict,
    descriptions: tuple[str, str],
    text: str,
    numbers: tuple[int, int],
) -> tuple[Dataset, Dataset]:
    """The guidance overlay SC and the edit-region SEG, each a series of its own: a viewer (3D
    Slicer's scalar-volume loader among them) stacks the files of one series into one volume,
    and a grayscale and an RGB image do not stack."""
    overlay_description, seg_description = descriptions
    overlay_number, seg_number = numbers
    overlay = hd.sc.SCImage.from_ref_dataset(
        context.reference,
        overlay_rgb,
        "RGB",
        8,
        series_instance_uid=hd.UID(),
        series_number=overlay_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        **context.coordinates,
    )
    _mark_synthetic_derivative(
        overlay,
        context.source,
        provenance,
        overlay_description,
        text + " Guidance map over the image.",
        (GUIDANCE_OVERLAY,),
    )
    segmentation = hd.seg.Segmentation(
        source_images=[context.reference],
        pixel_array=edit_mask[None].astype(bool),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label="InstructX2X edit region",
                segmented_property_category=codes.cid7150.SpatialAndRelationalConcept,
                segmented_property_type=codes.DCM.ImageRegion,
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="InstructX2X Region-Specific Editing",
                    version=__version__,
                    family=codes.cid7162.ArtificialIntelligence,
                ),
            )
        ],
        series_instance_uid=hd.UID(),
        series_number=seg_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name="InstructX2X",
        software_versions=__version__,
        device_serial_number="none",
        series_description=seg_description,
    )
    if context.orientation:
        segmentation.PatientOrientation = list(context.orientation)  # General Image, Type 2C
    segmentation.ContentDescription = "Region the counterfactual edit was allowed to change"
    _add_provenance(segmentation, provenance)
    return overlay, segmentation


def series_numbers(now: datetime.datetime | None = None) -> tuple[int, int, int]:
    """Series numbers of one edit: day, hour, minute and second, then 1 (the counterfactual),
    2 (the guidance overlay) or 3 (SEG).

    Repeated edits of one study get different numbers (and the instruction in their
    descriptions), so a viewer's series list tells them apart and sorts them in time.
    """
    stamp = int((now or datetime.datetime.now()).strftime("%d%H%M%S"))
    return stamp * 10 + 1, stamp * 10 + 2, stamp * 10 + 3


def check_exportable(source: Dataset, name: str) -> None:
    """Refuse, before any edit, a source whose derived objects could not be built.

    Builds the three objects once from a blank image and a full mask (about a second for
    a large film), so every rule highdicom enforces is checked with the real builder.

    Raises
    ------
    InputError
        Naming the file and the attribute (never its value).
    """
    for keyword in PERSON_NAME_KEYWORDS:
        element = source.get(keyword)
        if element is not None and source[keyword].VM > 1:
            raise InputError(
                f"{name}: {keyword} holds {source[keyword].VM} values; the derived "
                "objects take one person name. Correct the source first."
            )
    if int(source.get("PixelRepresentation", 0)) == 1:
        raise InputError(
            f"{name}: signed stored values cannot be written as a Secondary "
            "Capture; export the radiograph unsigned first."
        )
    rows, columns = int(source.Rows), int(source.Columns)
    dtype = np.uint8 if int(source.BitsAllocated) <= 8 else np.uint16
    try:
        build_edit_objects(
            source,
            np.zeros((rows, columns), dtype),
            np.zeros((rows, columns, 3), np.uint8),
            np.ones((rows, columns), bool),
            {},
        )
    except (ValueError, TypeError, AttributeError, KeyError, NotImplementedError) as error:
        raise InputError(
            f"{name}: the derived DICOM objects cannot be built from this "
            f"source ({type(error).__name__}: {_without_values(str(error))})."
        ) from None


def _reference_dataset(source: Dataset, attributes: Dataset) -> Dataset:
    """The source header as the builders see it: its patient and study attributes those of
    the policy (``attributes``, Type 2 ones present even where the source lacks them), and
    without values that would make derived objects invalid.

    Some CR writers put 0\\0 in PixelSpacing (RG1_UNCR.dcm does); a zero spacing is no
    spacing, so it is dropped rather than copied into the SEG's pixel measures.
    """
    reference = copy.deepcopy(source)  # a shallow copy shares its elements' dict with the source
    apply_patient_policy(reference, attributes)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if keyword in reference and not all(float(v) > 0 for v in reference[keyword].value):
            del reference[keyword]
    return reference


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    value = source.get("PatientOrientation")
    if value is None or len(value) != 2 or not all(value):
        return None
    return str(value[0]), str(value[1])


def _summary(provenance: dict) -> str:
    parameters = provenance.get("parameters", {})
    model = provenance.get("model", {})
    return (
        f"SYNTHETIC image made by InstructX2X {__version__}, NOT FOR DIAGNOSIS. "
        f"Instruction: {parameters.get('instruction', '')!s}. Model {model.get('name', '')} "
        f"sha256 {str(model.get('sha256', ''))[:16]}; seed {parameters.get('seed')}, "
        f"steps {parameters.get('num_inference_steps')}, tau {parameters.get('tau')}."
    )


def _instruction_text(provenance: dict) -> str:
    return str(provenance.get("parameters", {}).get("instruction", "") or "")


def _series_text(series: dict) -> str:
    """A progression series in a few words, the finding first (a long one leaves the levels
    to be cut by the 64 characters of a description): "left pneumothorax small to large"."""
    levels = list(series.get("levels") or [])
    side = series.get("laterality")
    finding = f"{side} {series.get('finding', '')}" if side else str(series.get("finding", ""))
    return f"{finding} {levels[0]} to {levels[-1]}" if levels else finding


def _series_description(prefix: str, text: str) -> str:
    """The fixed synthetic marking plus the instruction, within LO's 64 characters.

    The template words ("the finding of", "the level of") are dropped so that the finding
    itself fits: "SYNTHETIC - NOT FOR DIAGNOSIS - Add left pleural effusion".
    """
    for words in ("the finding of ", "the findings of ", "the level of "):
        text = text.replace(words, "")
    text = f"{prefix} - {text}" if text else prefix
    return text if len(text) <= 64 else text[:63] + "~"


def _without_values(message: str) -> str:
    """An error message cut before any quoted value, which may be a patient attribute."""
    return message.split('"')[0].split("'")[0].strip() or "invalid attribute"


def _mark_synthetic_derivative(
    dataset: Dataset,
    source: Dataset,
    provenance: dict,
    series_description: str,
    description: str,
    derivation: tuple[Code, ...],
) -> None:
    """Attributes highdicom's SCImage leaves out or sets otherwise, by module."""
    # SC Equipment: a synthetic image, not a digitised one (highdicom writes DI)
    dataset.ConversionType = hd.sc.ConversionTypeValues.SYN.value
    dataset.SecondaryCaptureDeviceManufacturer = MANUFACTURER
    dataset.SecondaryCaptureDeviceManufacturerModelName = "InstructX2X"
    dataset.SecondaryCaptureDeviceSoftwareVersions = __version__
    # General Series
    dataset.SeriesDescription = series_description
    dataset.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    # General Image: derived from the source, synthetic, with the source's burned-in text
    dataset.ImageType = ["DERIVED", "SECONDARY"]
    dataset.ImageComments = description
    dataset.BurnedInAnnotation = burned_in_annotation(source)
    _carry_lossy_compression(dataset, source)
    # General Reference: how and from what it was derived
    dataset.DerivationDescription = description[:1024]
    dataset.DerivationCodeSequence = [hd.sr.CodedConcept.from_code(code) for code in derivation]
    source_item = Dataset()
    source_item.ReferencedSOPClassUID = source.SOPClassUID
    source_item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    dataset.SourceImageSequence = [source_item]
    # SOP Common: the local coding scheme of the derivation codes
    dataset.CodingSchemeIdentificationSequence = [
        CodingSchemeIdentificationItem(
            LOCAL_SCHEME, name="InstructX2X local codes", responsible_organization=MANUFACTURER
        )
    ]
    _add_provenance(dataset, provenance)


def burned_in_annotation(source: Dataset) -> str:
    """BurnedInAnnotation of an image that shows the source's pixels: the source's own "NO"
    only when it says so; "YES" when it says "YES", says nothing or says something else,
    since text burned into its pixels outside the edit region is still there."""
    said = str(source.get("BurnedInAnnotation", "") or "").strip().upper()
    return "NO" if said == "NO" else "YES"


def _carry_lossy_compression(dataset: Dataset, source: Dataset) -> None:
    """General Image: once lossy, always lossy (PS3.3 C.7.6.1.1.5), with ratio and method."""
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    lossy = str(source.get("LossyImageCompression", "") or "") == "01" or syntax in LOSSY_TRANSFER_SYNTAXES
    dataset.LossyImageCompression = "01" if lossy else "00"
    if not lossy:
        return
    for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
        if keyword in source:
            dataset[keyword] = source[keyword]
    if "LossyImageCompressionMethod" not in dataset and syntax in LOSSY_TRANSFER_SYNTAXES:
        dataset.LossyImageCompressionMethod = LOSSY_TRANSFER_SYNTAXES[syntax]


def _copy_grayscale_presentation(dataset: Dataset, source: Dataset) -> None:
    """Image Pixel bit depth, modality and VOI LUTs of the source, so the result displays
    and measures alike (the stored values were composited in the source's stored domain)."""
    dataset.BitsStored = int(source.BitsStored)
    dataset.HighBit = int(source.BitsStored) - 1
    for keyword in (
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "WindowCenterWidthExplanation",
        "VOILUTSequence",
        "ModalityLUTSequence",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
    ):
        if keyword in source:
            dataset[keyword] = source[keyword]
    if "RescaleSlope" in dataset and "RescaleType" not in dataset:
        dataset.RescaleType = "US"  # SC Image module: Type 1C when rescale is present


def _add_provenance(dataset: Dataset, provenance: dict) -> None:
    block = dataset.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    block.add_new(PROVENANCE_ELEMENT, "UT", to_json(provenance, indent=None, sort_keys=True))
