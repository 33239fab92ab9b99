"""Stored pixel values <-> display values in [0, 1], both ways (PS3.3 C.11).

The model sees what a radiologist sees: modality LUT (or rescale), then the VOI window or
VOI LUT, then MONOCHROME1 inversion. The result must go back into the *stored* values of the
original object, so every step here has an inverse. pydicom applies these transforms forward
only (``pydicom.pixels.apply_modality_lut`` / ``apply_voi_lut``) and to the stored bit range,
not to [0, 1]; the pair of directions is kept together here so that they cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pydicom import Dataset

__all__ = ["IntensityMapping", "LookupTable", "Window", "mapping_from_dataset", "VOI_CHOICES"]

VOI_CHOICES = ("first", "minmax", "percentile")
_EPSILON = 1e-6


@dataclasses.dataclass(frozen=True)
class LookupTable:
    """A DICOM LUT: input ``first_mapped + i`` maps to ``values[i]`` (ends extended)."""

    first_mapped: int
    values: np.ndarray

    def forward(self, x: np.ndarray) -> np.ndarray:
        index = np.clip(np.rint(x).astype(np.int64) - self.first_mapped, 0, len(self.values) - 1)
        return self.values[index].astype(np.float64)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        monotone = np.maximum.accumulate(self.values.astype(np.float64))
        inputs = self.first_mapped + np.arange(len(self.values), dtype=np.float64)
        return np.interp(y, monotone, inputs)


@dataclasses.dataclass(frozen=True)
class Window:
    """A VOI window (center, width, function) mapped onto [0, 1]."""

    center: float
    width: float
    function: str = "LINEAR"

    def __post_init__(self) -> None:
        if self.function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
            raise NotImplementedError(f"VOI LUT function {self.function!r} is not supported.")
        minimum = 1.0 if self.function == "LINEAR" else 0.0
        if not self.width > minimum:
            raise ValueError(f"window width must be > {minimum:g} for {self.function}, got {self.width}.")

    def forward(self, x: np.ndarray) -> np.ndarray:
        c, w = self.center, self.width
        if self.function == "LINEAR":
            y = (x - (c - 0.5)) / (w - 1) + 0.5
        elif self.function == "LINEAR_EXACT":
            y = (x - c) / w + 0.5
        else:
            y = 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        return np.clip(y, 0.0, 1.0)

    def inverse(self, y: np.ndarray) -> np.ndarray:
        c, w = self.center, self.width
        if self.function == "LINEAR":
            return (y - 0.5) * (w - 1) + c - 0.5
        if self.function == "LINEAR_EXACT":
            return (y - 0.5) * w + c
        y = np.clip(y, _EPSILON, 1 - _EPSILON)
        return c - w / 4.0 * np.log(1.0 / y - 1.0)


@dataclasses.dataclass(frozen=True)
class IntensityMapping:
    """The chain stored -> modality -> VOI -> (inversion) -> display, and back.

    Attributes
    ----------
    bits_stored, signed:
        Range of the stored values (``PixelRepresentation`` 1 = signed).
    slope, intercept:
        Rescale (used when ``modality_lut`` is None).
    modality_lut:
        Modality LUT Sequence, when present.
    voi:
        A ``Window`` or a ``LookupTable`` whose output is normalised by ``voi_scale``.
    voi_scale:
        Divisor that brings a VOI LUT's output to [0, 1].
    invert:
        MONOCHROME1: high values are dark.
    description:
        What was applied, in words, for manifests.
    """

    bits_stored: int
    signed: bool
    slope: float
    intercept: float
    modality_lut: LookupTable | None
    voi: Window | LookupTable
    voi_scale: float
    invert: bool
    description: tuple[str, ...]

    @property
    def stored_range(self) -> tuple[int, int]:
        if self.signed:
            return -(2 ** (self.bits_stored - 1)), 2 ** (self.bits_stored - 1) - 1
        return 0, 2**self.bits_stored - 1

    def forward(self, stored: np.ndarray) -> np.ndarray:
        """Display values (float32, [0, 1]) of stored values."""
        if self.modality_lut is not None:
            values = self.modality_lut.forward(stored)
        else:
            values = stored.astype(np.float64) * self.slope + self.intercept
        display = self.voi.forward(values) / self.voi_scale
        display = np.clip(display, 0.0, 1.0)
        return (1.0 - display if self.invert else display).astype(np.float32)

    def to_stored(self, display: np.ndarray) -> np.ndarray:
        """Stored values (float64, neither rounded nor clipped) that display as ``display``.

        Differences of two such values carry a display-domain change into the stored domain
        at the local gain of the chain, which is how an edit is added to stored values that
        lie outside the VOI window.
        """
        y = np.clip(np.asarray(display, dtype=np.float64), 0.0, 1.0)
        if self.invert:
            y = 1.0 - y
        values = self.voi.inverse(y * self.voi_scale)
        if self.modality_lut is not None:
            return self.modality_lut.inverse(values)
        return (values - self.intercept) / self.slope

    def inverse(self, display: np.ndarray) -> np.ndarray:
        """Stored values (int64, clipped to the stored range) that display as ``display``."""
        low, high = self.stored_range
        return np.clip(np.rint(self.to_stored(display)), low, high).astype(np.int64)


def _lut_from_item(item: Dataset, name: str) -> LookupTable:
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries = descriptor[0] or 65536
    bits = descriptor[2]
    raw = item.LUTData
    if isinstance(raw, bytes):
        dtype = np.uint8 if bits <= 8 and len(raw) == entries else np.uint16
        data = np.frombuffer(raw, dtype=dtype)
    else:
        data = np.asarray(raw if isinstance(raw, (list, tuple)) else [raw])
    if len(data) != entries:
        raise ValueError(f"{name}: LUTData has {len(data)} entries, LUTDescriptor says {entries}.")
    first = descriptor[1]
    return LookupTable(first if first < 32768 else first - 65536, data.astype(np.int64))


def mapping_from_dataset(ds: Dataset, stored: np.ndarray, voi: str | int = "first") -> IntensityMapping:
    """Build the display mapping of a grayscale image.

    Parameters
    ----------
    ds: pydicom.Dataset
        The image's dataset.
    stored: numpy.ndarray
        Its stored values (used by ``minmax`` and ``percentile``, and when no VOI is given).
    voi: str | int
        ``first`` (the first VOI LUT or window; minmax when there is none), an index into the
        windows (or VOI LUTs), ``minmax`` (full range of this image) or ``percentile``
        (0.5 to 99.5 percent of this image).

    Raises
    ------
    ValueError
        When ``voi`` names a window that does not exist, or a LUT is malformed.
    NotImplementedError
        For a VOI LUT function other than LINEAR, LINEAR_EXACT and SIGMOID.
    """
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    bits_stored = int(ds.BitsStored)
    description = []
    modality_lut = None
    slope, intercept = 1.0, 0.0
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        modality_lut = _lut_from_item(ds.ModalityLUTSequence[0], "ModalityLUTSequence")
        description.append("modality LUT sequence")
    elif "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        if (slope, intercept) != (1.0, 0.0):
            description.append(f"rescale slope {slope:g} intercept {intercept:g}")
    if slope == 0:
        raise ValueError("RescaleSlope is 0: the modality transform is not invertible.")
    values = (
        stored.astype(np.float64) * slope + intercept
        if modality_lut is None
        else modality_lut.forward(stored)
    )

    windows = _windows(ds)
    luts = list(ds.get("VOILUTSequence", []))
    voi_map: Window | LookupTable
    scale = 1.0
    if voi == "first" and luts:
        voi, voi_kind = 0, "lut"
    elif voi == "first" and windows:
        voi, voi_kind = 0, "window"
    elif voi == "first":
        voi, voi_kind = "minmax", None
    else:
        voi_kind = "lut" if luts and isinstance(voi, int) else "window"
    if isinstance(voi, int):
        pool = luts if voi_kind == "lut" else windows
        if not 0 <= voi < len(pool):
            raise ValueError(
                f"voi index {voi} does not exist: the image has {len(windows)} "
                f"window(s) and {len(luts)} VOI LUT(s)."
            )
        if voi_kind == "lut":
            voi_map = _lut_from_item(luts[voi], "VOILUTSequence")
            scale = float(2 ** int(luts[voi].LUTDescriptor[2]) - 1)
            description.append(f"VOI LUT {voi}")
        else:
            voi_map = windows[voi]
            description.append(
                f"VOI window {voi}: center {voi_map.center:g} width {voi_map.width:g} {voi_map.function}"
            )
    elif voi in ("minmax", "percentile"):
        low, high = (values.min(), values.max()) if voi == "minmax" else np.percentile(values, (0.5, 99.5))
        voi_map = Window(center=(low + high) / 2, width=max(high - low, 1e-3), function="LINEAR_EXACT")
        description.append(f"{voi} window {low:g}..{high:g}")
    else:
        raise ValueError(f"voi must be one of {VOI_CHOICES} or a window index, got {voi!r}.")
    invert = ds.PhotometricInterpretation == "MONOCHROME1"
    if invert:
        description.append("MONOCHROME1 inverted")
    return IntensityMapping(
        bits_stored, signed, slope, intercept, modality_lut, voi_map, scale, invert, tuple(description)
    )


def _windows(ds: Dataset) -> list[Window]:
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return []
    centers = ds.WindowCenter if ds["WindowCenter"].VM > 1 else [ds.WindowCenter]
    widths = ds.WindowWidth if ds["WindowWidth"].VM > 1 else [ds.WindowWidth]
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return [Window(float(c), float(w), function) for c, w in zip(centers, widths)]
