"""The one policy for the patient and study attributes of every object an edit writes.

The counterfactual SC, the overlay SC and the SEG join the source's study, so they carry what
identifies the patient and the study (the keys a PACS files them by), copied from the source,
and nothing else of the Patient, Clinical Trial Subject, General Study, Patient Study and
Clinical Trial Study modules: no comments, other IDs or names, age, size, weight, history,
alerts or trial data. highdicom's SCImage copies a fixed few of these and its Segmentation
copies every one present, so ``apply_patient_policy`` runs on all three objects after they
are built and leaves them identical in these modules.

De-identification is carried only when it is true of the source: PatientIdentityRemoved
"YES" with the method that removed it (DeidentificationMethod or its code sequence). A
source that says "NO", or "YES" without a method, gives objects that claim neither.
"""

from __future__ import annotations

import copy
import functools

from pydicom import Dataset

__all__ = [
    "COPIED",
    "COPIED_IF_PRESENT",
    "DEIDENTIFICATION",
    "patient_study_attributes",
    "apply_patient_policy",
    "patient_and_study_keywords",
]

# Type 2 in the Patient and General Study modules: present in every object, empty when the
# source has no value.
COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
# Copied when the source has them: the study's identity and what qualifies the IDs above.
COPIED_IF_PRESENT = (
    "StudyInstanceUID",
    "IssuerOfPatientID",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
)
# Copied together, and only when the source says its identity was removed and how.
DEIDENTIFICATION = ("PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence")
# The modules of the Patient and Study information entities of every image IOD we read or write.
PATIENT_AND_STUDY_MODULES = (
    "patient",
    "clinical-trial-subject",
    "general-study",
    "patient-study",
    "clinical-trial-study",
)


@functools.lru_cache(maxsize=1)
def patient_and_study_keywords() -> frozenset[str]:
    """Keywords of the top-level attributes of the Patient and Study modules (PS3.3 C.7.1, C.7.2).

    Read from highdicom's tables of the standard, the ones its Segmentation copies by, so that
    the policy removes exactly what highdicom could have copied.
    """
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    return frozenset(
        str(item["keyword"])
        for module in PATIENT_AND_STUDY_MODULES
        for item in table[module]
        if len(item["path"]) == 0
    )


def _deidentified(source: Dataset) -> bool:
    said = str(source.get("PatientIdentityRemoved", "") or "").strip().upper() == "YES"
    return said and bool(
        source.get("DeidentificationMethod") or source.get("DeidentificationMethodCodeSequence")
    )


def patient_study_attributes(source: Dataset) -> Dataset:
    """The policy's attributes, as the derived objects carry them, taken from ``source``.

    Parameters
    ----------
    source: pydicom.Dataset
        The radiograph the edit derives from.

    Returns
    -------
    pydicom.Dataset
        Copies of the source's elements: every ``COPIED`` keyword (empty when the source has
        none), the ``COPIED_IF_PRESENT`` ones it has, and ``DEIDENTIFICATION`` when true.
    """
    attributes = Dataset()
    present = list(COPIED_IF_PRESENT) + (list(DEIDENTIFICATION) if _deidentified(source) else [])
    for keyword in COPIED:
        if keyword in source:
            attributes[keyword] = copy.deepcopy(source[keyword])
        else:
            setattr(attributes, keyword, None)
    for keyword in present:
        if keyword in source:
            attributes[keyword] = copy.deepcopy(source[keyword])
    return attributes


def apply_patient_policy(dataset: Dataset, attributes: Dataset) -> None:
    """Remove every Patient and Study module attribute from ``dataset``, then add ``attributes``.

    Parameters
    ----------
    dataset: pydicom.Dataset
        A derived object (SC or SEG), changed in place.
    attributes: pydicom.Dataset
        From ``patient_study_attributes`` of the source.
    """
    keywords = patient_and_study_keywords()
    for keyword in [k for k in dataset.dir() if k in keywords]:
        del dataset[keyword]
    for element in attributes:
        dataset[element.tag] = copy.deepcopy(element)
