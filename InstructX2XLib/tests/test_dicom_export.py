import json
from typing import Any

import numpy as np
import pydicom
import pytest
from dicom_factory import dciodvfy_errors, make_radiograph, pydicom_data_file, write

from instructx2x import EditParameters, InstructX2XEditor, read_dicom
from instructx2x.dicom import export_dicom_edit
from instructx2x.dicom.write import SERIES_DESCRIPTION, build_edit_objects, read_provenance
from instructx2x.loading import ModelInfo

INFO = ModelInfo("untrained-tiny", "untrained", "a" * 64, False)


@pytest.fixture(scope="module")
def editor(tiny_pipe):
    return InstructX2XEditor(tiny_pipe, INFO, device="cpu", dtype="fp32")


def params(**kwargs):
    return EditParameters(
        "Add the finding of left pleural effusion", num_inference_steps=2, resolution=64, **kwargs
    )


@pytest.fixture(scope="module")
def real_cr_export(editor, tmp_path_factory):
    image = read_dicom(pydicom_data_file("RG1_UNCR.dcm"))
    result = editor.edit(image, params(tau=0.2))
    out = tmp_path_factory.mktemp("export") / "edit"
    return image, result, export_dicom_edit(image, result, out, feather_px=6)


def test_every_object_passes_dciodvfy(real_cr_export):
    _, _, paths = real_cr_export
    for name in ("counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm"):
        assert dciodvfy_errors(paths[name]) == [], name


def test_counterfactual_keeps_geometry_depth_photometric_and_pixels_outside(real_cr_export):
    image, result, paths = real_cr_export
    source = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    sc = pydicom.dcmread(paths["counterfactual.dcm"])
    assert (sc.Rows, sc.Columns, sc.BitsStored, sc.PhotometricInterpretation) == (
        1955,
        1841,
        15,
        "MONOCHROME1",
    )
    out = sc.pixel_array
    assert np.array_equal(out[~result.edit_mask], source.pixel_array[~result.edit_mask])
    assert not np.array_equal(out[result.edit_mask], source.pixel_array[result.edit_mask])
    assert (sc.WindowCenter, sc.WindowWidth) == (source.WindowCenter, source.WindowWidth)


def test_series_is_synthetic_in_the_same_study_with_provenance(real_cr_export):
    image, result, paths = real_cr_export
    source = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    sc = pydicom.dcmread(paths["counterfactual.dcm"])
    overlay = pydicom.dcmread(paths["guidance_overlay.dcm"])
    seg = pydicom.dcmread(paths["edit_region_seg.dcm"])
    for ds in (sc, overlay, seg):
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.SOPInstanceUID != source.SOPInstanceUID
        provenance = read_provenance(ds)
        assert provenance["input"]["sop_instance_uid"] == source.SOPInstanceUID
        assert provenance["model"]["sha256"] == "a" * 64
        assert provenance["prior"]["categories"] == ["Pleural Effusion"]
    # one series each: Slicer's scalar-volume loader stacks a series' files into one volume
    assert len({sc.SeriesInstanceUID, overlay.SeriesInstanceUID, seg.SeriesInstanceUID}) == 3
    assert (overlay.SeriesNumber, seg.SeriesNumber) == (sc.SeriesNumber + 1, sc.SeriesNumber + 2)
    for ds in (sc, overlay):
        assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription.startswith(SERIES_DESCRIPTION) and "NOT FOR DIAGNOSIS" in ds.ImageComments
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert "BurnedInAnnotation" not in source and ds.BurnedInAnnotation == "YES"  # unknown: YES
        assert ds.BodyPartExamined == "CHEST"
        assert "left pleural effusion" in ds.DerivationDescription
    assert overlay.PhotometricInterpretation == "RGB" and overlay.SamplesPerPixel == 3
    assert seg.Modality == "SEG" and np.array_equal(seg.pixel_array.astype(bool), result.edit_mask)
    sidecar = json.loads(paths["provenance.json"].read_text())
    assert sidecar["parameters"]["tau"] == 0.2 and sidecar["native"]["feather_px"] == 6
    assert set(sidecar["objects"]) == {"counterfactual.dcm", "guidance_overlay.dcm", "edit_region_seg.dcm"}


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "DX", "photometric": "MONOCHROME2", "bits_stored": 12},
        {"kind": "CR", "bits_stored": 8, "window": None},
        {"kind": "SC", "rescale": (1.0, -1024.0), "bits_stored": 16, "window": (0.0, 4000.0)},
    ],
)
def test_generated_sources_export_valid_objects(editor, tmp_path, kwargs):
    path = write(make_radiograph(**kwargs), tmp_path / "source.dcm")
    image = read_dicom(path)
    result = editor.edit(image, params(aspect="pad"))
    paths = export_dicom_edit(image, result, tmp_path / "out")
    for name, file in paths.items():
        if name.endswith(".dcm"):
            assert dciodvfy_errors(file) == [], (name, kwargs)
    sc = pydicom.dcmread(paths["counterfactual.dcm"])
    original = image.dicom.stored
    assert sc.pixel_array.dtype == original.dtype
    assert np.array_equal(sc.pixel_array[~result.edit_mask], original[~result.edit_mask])
    provenance = json.loads(paths["provenance.json"].read_text())
    assert provenance["geometry"]["aspect_ratio"] == "pad"
    if kwargs["kind"] == "DX":  # only ImagerPixelSpacing: recorded and carried to the SC
        assert provenance["native"]["pixel_spacing"] == {
            "attribute": "ImagerPixelSpacing",
            "row_mm": 0.2,
            "column_mm": 0.2,
        }
        assert [float(v) for v in sc.PixelSpacing] == [0.2, 0.2]


def test_refusals_write_nothing(editor, tmp_path):
    image = read_dicom(write(make_radiograph(), tmp_path / "s.dcm"))
    preview = editor.preview(image, params())
    with pytest.raises(ValueError, match="preview"):
        export_dicom_edit(image, preview, tmp_path / "a")
    result = editor.edit(image, params())
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        export_dicom_edit(image, result, tmp_path / "exists")
    assert list((tmp_path / "exists").iterdir()) == []
    signed = read_dicom(write(make_radiograph(signed=True), tmp_path / "signed.dcm"))
    with pytest.raises(NotImplementedError, match="signed"):
        export_dicom_edit(signed, editor.edit(signed, params()), tmp_path / "b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "s.dcm", "signed.dcm"]


def test_builder_checks_its_arguments():
    source = make_radiograph()
    good: dict[str, Any] = dict(
        stored=np.zeros((72, 64), np.uint16),
        overlay_rgb=np.zeros((72, 64, 3), np.uint8),
        edit_mask=np.ones((72, 64), bool),
        provenance={},
    )
    for key, bad, match in [
        ("stored", np.zeros((10, 10), np.uint16), "stored pixels"),
        ("overlay_rgb", np.zeros((72, 64), np.uint8), "overlay"),
        ("edit_mask", np.zeros((72, 64), bool), "empty"),
        ("stored", np.zeros((72, 64), np.float32), "uint8 or uint16"),
    ]:
        with pytest.raises(ValueError, match=match):
            build_edit_objects(source, **{**good, key: bad})


def export(editor, ds, tmp_path, name="edit", **kwargs):
    path = write(ds, tmp_path / f"{name}.dcm")
    image = read_dicom(path)
    result = editor.edit(image, params(tau=0.0, **kwargs))
    return image, export_dicom_edit(image, result, tmp_path / name)


def test_lossy_source_stays_marked_lossy(editor, tmp_path):
    ds = make_radiograph()
    ds.LossyImageCompression = "01"
    ds.LossyImageCompressionRatio = 8.5
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    _, paths = export(editor, ds, tmp_path, "lossy")
    sc = pydicom.dcmread(paths["counterfactual.dcm"])
    assert sc.LossyImageCompression == "01" and float(sc.LossyImageCompressionRatio) == 8.5
    assert sc.LossyImageCompressionMethod == "ISO_10918_1"
    assert dciodvfy_errors(paths["counterfactual.dcm"]) == []
    _, clean = export(editor, make_radiograph(), tmp_path, "clean")
    assert pydicom.dcmread(clean["counterfactual.dcm"]).LossyImageCompression == "00"


def test_modality_lut_sequence_is_honoured_in_the_counterfactual(editor, tmp_path):
    """The SC must map its stored values like the source: same modality LUT, so that
    values outside the edit mean the same thing."""
    from pydicom.pixels import apply_modality_lut

    ds = make_radiograph(bits_stored=12)
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "OD"
    item.add_new(0x00283006, "US", [int(15 * v + 100) for v in range(4096)])  # LUTData
    ds.ModalityLUTSequence = [item]
    _, paths = export(editor, ds, tmp_path, "mlut")
    sc = pydicom.dcmread(paths["counterfactual.dcm"])
    assert "ModalityLUTSequence" in sc
    source = pydicom.dcmread(tmp_path / "mlut.dcm")
    seg = pydicom.dcmread(paths["edit_region_seg.dcm"]).pixel_array.astype(bool)
    outside = ~seg
    assert np.array_equal(
        apply_modality_lut(sc.pixel_array, sc)[outside],
        apply_modality_lut(source.pixel_array, source)[outside],
    )
    assert dciodvfy_errors(paths["counterfactual.dcm"]) == []


def test_repeated_edits_in_one_study_are_told_apart(editor, tmp_path, monkeypatch):
    import datetime

    from instructx2x.dicom import write as writer

    ds = make_radiograph()
    times = iter([datetime.datetime(2026, 11, 30, 8, 0, 0), datetime.datetime(2026, 11, 30, 8, 0, 5)])
    real = writer.series_numbers
    monkeypatch.setattr(writer, "series_numbers", lambda: real(next(times)))
    _, first = export(editor, ds, tmp_path, "first")
    image = read_dicom(tmp_path / "first.dcm")
    result = editor.edit(
        image, EditParameters("Remove the finding of edema", num_inference_steps=2, resolution=64, tau=0.0)
    )
    second = export_dicom_edit(image, result, tmp_path / "second")
    a, b = (pydicom.dcmread(p["counterfactual.dcm"]) for p in (first, second))
    assert a.StudyInstanceUID == b.StudyInstanceUID
    assert a.SeriesNumber != b.SeriesNumber and a.SeriesDescription != b.SeriesDescription
    assert "pleural effusion" in a.SeriesDescription and "edema" in b.SeriesDescription
    assert a.SeriesDescription.startswith("SYNTHETIC - NOT FOR DIAGNOSIS")
    seg = pydicom.dcmread(first["edit_region_seg.dcm"])
    assert seg.SeriesNumber == a.SeriesNumber + 2


def test_monochrome1_display_matches_pydicoms_reference_chain():
    """RG1 (MONOCHROME1): our display values are pydicom's modality + VOI output, inverted."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    path = pydicom_data_file("RG1_UNCR.dcm")
    ds = pydicom.dcmread(path)
    image = read_dicom(path)
    values = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
    reference = values / (2 ** int(ds.BitsStored) - 1)  # pydicom windows onto the stored range
    assert ds.PhotometricInterpretation == "MONOCHROME1" and "WindowCenter" in ds
    assert np.abs(image.pixels - (1.0 - reference)).max() < 1e-3


def test_a_progression_series_is_one_synthetic_series_in_step_order(editor, tmp_path):
    from instructx2x.dicom.export import write_dicom_series
    from instructx2x.instructions import parse_series

    source_path = write(make_radiograph(kind="DX", rows=96, columns=80), tmp_path / "source.dcm")
    image = read_dicom(source_path)
    template = "Add the finding of {level} left pneumothorax"
    series = parse_series(["small", "moderate", "large"], template)
    result = editor.edit_series(
        image, series, EditParameters(template, num_inference_steps=2, resolution=64, tau=0.2, seed=2)
    )
    folder = tmp_path / "series"
    folder.mkdir()
    names = write_dicom_series(folder, image, result, feather_px=2)
    assert names == [
        "step-01.dcm",
        "step-02.dcm",
        "step-03.dcm",
        "guidance_overlay.dcm",
        "edit_region_seg.dcm",
        "provenance.json",
    ]
    for name in names[:-1]:
        assert dciodvfy_errors(folder / name) == [], name
    source = pydicom.dcmread(source_path)
    steps = [pydicom.dcmread(folder / f"step-0{n}.dcm") for n in (1, 2, 3)]
    overlay = pydicom.dcmread(folder / "guidance_overlay.dcm")
    seg = pydicom.dcmread(folder / "edit_region_seg.dcm")
    assert len({ds.SeriesInstanceUID for ds in steps}) == 1 and len({ds.SeriesNumber for ds in steps}) == 1
    assert [ds.InstanceNumber for ds in steps] == [1, 2, 3]
    assert len({ds.SOPInstanceUID for ds in steps}) == 3
    assert steps[0].SeriesDescription == f"{SERIES_DESCRIPTION} - left pneumothorax small to large"
    assert (overlay.SeriesNumber, seg.SeriesNumber) == (steps[0].SeriesNumber + 1, steps[0].SeriesNumber + 2)
    assert len({steps[0].SeriesInstanceUID, overlay.SeriesInstanceUID, seg.SeriesInstanceUID}) == 3
    original = image.dicom_source().stored
    for number, (ds, instruction) in enumerate(zip(steps, series.instructions), start=1):
        assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
        assert ds.ConversionType == "SYN" and list(ds.ImageType) == ["DERIVED", "SECONDARY"]
        assert ds.SeriesDescription.startswith(SERIES_DESCRIPTION)
        assert "NOT FOR DIAGNOSIS" in ds.ImageComments
        assert f"Instruction: {instruction}." in ds.ImageComments
        assert f"Step {number} of 3 of a progression series" in ds.ImageComments
        assert instruction in ds.DerivationDescription
        provenance = read_provenance(ds)
        assert provenance["parameters"]["instruction"] == instruction
        assert provenance["series"]["step"] == number and provenance["parameters"]["seed"] == 2
        assert np.array_equal(ds.pixel_array[~result.edit_mask], original[~result.edit_mask])
    assert not np.array_equal(steps[0].pixel_array, steps[2].pixel_array)
    for ds in (overlay, seg):
        assert read_provenance(ds)["series"]["instructions"] == list(series.instructions)
        assert "left pneumothorax small to large" in ds.SeriesDescription
    assert np.array_equal(seg.pixel_array.astype(bool), result.edit_mask)
    sidecar = json.loads((folder / "provenance.json").read_text())
    assert sidecar["kind"] == "edit_series" and len(sidecar["steps"]) == 3
    assert set(sidecar["objects"]) == set(names[:-1])
    assert sidecar["objects"]["step-02.dcm"]["sop_instance_uid"] == steps[1].SOPInstanceUID
