"""Synthetic chest radiographs (cohort v2): a PA film formed from an attenuation map.

Each tissue contributes a line integral (soft tissue by its depth, lungs by the air they hold,
bones by their chord), findings change that map where they occur, and the film is formed as a
detector would: exposure exp(-A), system blur, quantum noise growing where fewer photons arrive,
then a characteristic (H&D-like) contrast curve. Geometry is in normalised body coordinates
(u: -1 image left .. 1 image right, v: -1 top .. 1 bottom). Radiological convention: the
patient's left is the image's right on a PA film, so a left-sided finding is drawn at u > 0.

Demographic traces (``DEMOGRAPHIC_TRACES``) are deliberate and documented so that an evaluation
can measure whether an edit preserves them. The race traces are arbitrary synthetic markers,
not a model of any real population.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import ndimage

from instructx2x.instructions import LUNG_ZONES

__all__ = [
    "Pose",
    "Anatomy",
    "FindingState",
    "RENDERED_FINDINGS",
    "LATERALISED_FINDINGS",
    "ZONED_FINDINGS",
    "LUNG_ZONES",
    "draw_finding",
    "at_zone_centre",
    "redraw_texture",
    "LEVEL_FACTOR",
    "DEMOGRAPHIC_TRACES",
    "render_frontal",
    "render_attenuation",
    "form_film",
    "finding_masks",
    "render_lateral",
    "level_words",
    "RACES",
    "DEVICES",
    "DeviceState",
    "device_attenuation",
    "device_masks",
]

# Findings with a located rendering (the eight MS-CXR prior categories).
RENDERED_FINDINGS = (
    "pleural effusion",
    "cardiomegaly",
    "pneumothorax",
    "edema",
    "atelectasis",
    "consolidation",
    "pneumonia",
    "lung opacity",
)
# Findings drawn on one side; cardiomegaly (midline) and edema (bilateral) have no side.
LATERALISED_FINDINGS = (
    "pleural effusion",
    "pneumothorax",
    "atelectasis",
    "consolidation",
    "pneumonia",
    "lung opacity",
)
# Focal opacities drawn at a site anywhere in a lung; their instruction names the zone (upper,
# mid or lower third of the lung's height on a frontal film), as reports and version 2 of the
# authors' dataset do, so that an edit can know where the opacity goes. Atelectasis is basal.
ZONED_FINDINGS = ("consolidation", "pneumonia", "lung opacity")
_ZONE_CENTRE_V = {"upper": -0.52, "mid": -0.18, "lower": 0.16}  # apex -0.80, dome tops 0.38-0.42
_ZONE_JITTER_V = 0.08
LEVEL_FACTOR = {
    "minimal": 0.35,
    "small": 0.5,
    "mild": 0.5,
    "moderate": 0.75,
    "moderate to large": 0.9,
    "large": 1.0,
    "severe": 1.0,
}
DEMOGRAPHIC_TRACES = {
    "age": "bone density falls 0.6 % a year after 25 (ribs, clavicles, spine); the aortic knob "
    "widens (radius 0.040 + 0.0007 per year after 25, normalised units).",
    "sex": "F: breast shadows over both lower zones and a 4 % smaller thorax; M: none.",
    "race": "arbitrary synthetic markers: Asian a 7 % narrower habitus, Black 15 % denser chest-wall "
    "soft tissue, White neither (no claim about real anatomy).",
}
LEVELS = {"pleural effusion": ("small", "moderate", "large"), "pneumothorax": ("small", "moderate", "large")}
DEFAULT_LEVELS = ("mild", "moderate", "severe")
RACES = ("Asian", "Black", "White")
_CANVAS = 768  # body-space raster for thin structures (vessels, bronchograms, septal lines)
_AIR_DEPTH = 0.8  # antero-posterior air column at a lung's centre, in body depths
_PARENCHYMA = 0.22  # lung tissue attenuation relative to soft tissue
_FLUID = 1.0  # fluid and consolidated lung attenuate like soft tissue
# Devices and markers, drawn over the anatomy with their masks: the shortcuts a classifier can
# learn instead of a finding (a chest drain beside a pneumothorax, a pacemaker beside cardiomegaly).
DEVICES = ("chest drain", "pacemaker", "ecg lead", "text marker")


@dataclasses.dataclass(frozen=True)
class Pose:
    """A patient's placement on the detector: rotation (degrees), scale, shift (normalised)."""

    rotation: float = 0.0
    scale: float = 1.0
    shift_u: float = 0.0
    shift_v: float = 0.0


@dataclasses.dataclass(frozen=True)
class Anatomy:
    """One patient's body: what stays the same from study to study.

    ``seed`` fixes the branching of the pulmonary vessels; the other fields follow from the
    demographics (``draw``) plus individual variation.
    """

    age: int = 55
    sex: str = "M"
    race: str = "White"
    heart_size: float = 1.0
    habitus: float = 1.0  # thorax width
    seed: int = 0

    @classmethod
    def draw(cls, rng: np.random.Generator, age: int, sex: str, race: str) -> Anatomy:
        """Individual variation around the demographic traces."""
        habitus = (
            float(rng.uniform(0.94, 1.04))
            * (0.96 if sex == "F" else 1.0)
            * (0.93 if race == "Asian" else 1.0)
        )
        return cls(age, sex, race, float(rng.uniform(0.9, 1.1)), habitus, int(rng.integers(0, 2**31)))

    @property
    def bone_density(self) -> float:
        return float(np.clip(1.0 - 0.006 * (self.age - 25), 0.55, 1.0))

    @property
    def aortic_knob_radius(self) -> float:
        return 0.040 + 0.0007 * max(self.age - 25, 0)

    @property
    def chest_wall_density(self) -> float:
        return 1.15 if self.race == "Black" else 1.0


@dataclasses.dataclass(frozen=True)
class FindingState:
    """A finding present in a study: its level, side and (for focal opacities) site.

    ``seed`` fixes its texture (septal lines, bronchograms, patches), so the same finding drawn
    twice is the same. A focal opacity's site is its lung ``zone`` plus ``location``, an offset
    in [-1, 1] across the lung and within the zone.
    """

    name: str
    level: str
    side: str = "right"  # the patient's side
    location: tuple[float, float] = (0.0, 0.0)
    seed: int = 0
    zone: str = "mid"

    def __post_init__(self) -> None:
        if self.zone not in LUNG_ZONES:
            raise ValueError(f"zone must be one of {', '.join(LUNG_ZONES)}; got {self.zone!r}.")

    @property
    def factor(self) -> float:
        return LEVEL_FACTOR.get(self.level, 0.75)


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """A device on a film: a chest drain (inserted on ``side``, the patient's side, and run up
    towards the apex), a pacemaker (generator below the clavicle on ``side``, a lead to the right
    ventricle), an ECG lead (an electrode and its wire) or a text marker (an "L" in the corner).
    ``seed`` jitters its course."""

    name: str
    side: str = "left"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.name not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got {self.name!r}.")
        if self.side not in ("left", "right"):
            raise ValueError(f"a device's side is left or right; got {self.side!r}.")


def draw_finding(rng: np.random.Generator, name: str, side: str) -> FindingState:
    """A finding with a random level, site and texture, as pure pairs and the cohort draw one
    (the classifiers' films keep their own draw, so that `make classifiers` still reproduces
    the bundled set byte for byte)."""
    location = (float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
    zone = str(rng.choice(LUNG_ZONES))
    return FindingState(
        name, str(rng.choice(level_words(name))), side, location, int(rng.integers(0, 2**31)), zone
    )


def at_zone_centre(finding: FindingState) -> FindingState:
    """The finding at its zone's centre: where its instruction puts it. An instruction names a
    focal opacity's zone and nothing finer, so a pure pair whose truth lay anywhere in the zone
    would ask a model for a site the words do not carry."""
    return dataclasses.replace(finding, location=(0.0, 0.0))


def redraw_texture(finding: FindingState, rng: np.random.Generator) -> FindingState:
    """The finding as its instruction names it (name, level, side, zone, site) with another
    texture (lobules, bronchograms, septal lines): what the instruction leaves open."""
    return dataclasses.replace(finding, seed=int(rng.integers(0, 2**31)))


def level_words(finding: str) -> tuple[str, ...]:
    """The level words a finding is graded with (docs/method.md section 4)."""
    return LEVELS.get(finding, DEFAULT_LEVELS)


class _Frame:
    """Body coordinates of every pixel for a pose, and helpers to draw in them."""

    def __init__(self, rows: int, columns: int, pose: Pose, magnification: float = 1.0) -> None:
        v, u = np.mgrid[0:rows, 0:columns].astype(np.float32)
        u = u / (columns - 1) * 2 - 1
        v = v / (rows - 1) * 2 - 1
        angle = np.deg2rad(pose.rotation)
        cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
        u, v = u - pose.shift_u, v - pose.shift_v
        scale = np.float32(pose.scale * magnification)
        self.u = (cos * u + sin * v) / scale
        self.v = (-sin * u + cos * v) / scale
        self.shape = (rows, columns)
        self.pixel = 2.0 / max(rows, columns) / float(scale)  # one pixel in body units

    def sample(self, canvas: np.ndarray) -> np.ndarray:
        """Read a body-space raster (``_CANVAS`` square over [-1, 1]^2) at every pixel."""
        scale = (_CANVAS - 1) / 2
        coords = np.stack([(self.v + 1) * scale, (self.u + 1) * scale])
        return ndimage.map_coordinates(canvas, coords, order=1, mode="constant").astype(np.float32)


def _smooth_step(x, width):
    """0 below -width, 1 above width, smooth in between."""
    t = np.clip((x + width) / (2 * width), 0.0, 1.0)
    return t * t * (3 - 2 * t)


def _dome(anatomy: Anatomy, u, side: int):
    """Row of a hemidiaphragm's top at column ``u``: domed, lowest at the costophrenic angle."""
    scale = 0.96 if anatomy.sex == "F" else 1.0
    centre = side * 0.36 * anatomy.habitus
    base = 0.52 * scale + (0.0 if side > 0 else -0.04)  # the liver lifts the right dome
    x = (u - centre) / (0.36 * anatomy.habitus)
    return base + 0.05 - 0.15 * (1 - np.clip(x, -1.3, 1.3) ** 2) + 0.06 * np.clip(side * x, 0, None) ** 2


def _lung_air(frame: _Frame, anatomy: Anatomy, side: int):
    """Air depth of one lung (0 outside): rounded apex, lateral wall, domed base."""
    u, v = frame.u, frame.v
    scale = 0.96 if anatomy.sex == "F" else 1.0
    apex = -0.80 * scale
    centre = side * 0.40 * anatomy.habitus
    half_width = (
        0.31 * anatomy.habitus * np.sqrt(np.clip((v - apex) / 0.45, 0, 1)) * (1 + 0.08 * np.clip(v, 0, 1))
    )
    across = (u - centre) / np.maximum(half_width, 1e-3)
    profile = np.sqrt(np.clip(1 - across**2, 0, 1))
    medial = _smooth_step(side * u - 0.11, 0.02)  # the mediastinum
    base = _smooth_step(_dome(anatomy, u, side) - v, 0.012)
    return _AIR_DEPTH * profile * medial * base * (v > apex)


def _heart(frame: _Frame, anatomy: Anatomy, scale: float):
    """Depth of the heart: an oblique ellipsoid, apex to the patient's left (image right)."""
    u, v = frame.u - 0.09, frame.v - 0.24
    angle = np.deg2rad(-28)
    a = np.cos(angle) * u - np.sin(angle) * v
    b = np.sin(angle) * u + np.cos(angle) * v
    r = (a / (0.42 * scale * anatomy.heart_size)) ** 2 + (b / (0.26 * anatomy.heart_size)) ** 2
    return 0.8 * np.clip(1 - r, 0, 1) ** 0.25


def _band(frame: _Frame, centre_v, half_width, lo_u, hi_u):
    """A tube along a curve v = centre_v(u): chord thickness, with a denser cortex."""
    d = np.abs(frame.v - centre_v) / half_width
    tube = np.sqrt(np.clip(1 - d**2, 0, 1))
    marrow = np.sqrt(np.clip(1 - (d / 0.7) ** 2, 0, 1))
    return (tube - 0.55 * marrow) * _smooth_step(frame.u - lo_u, 0.01) * _smooth_step(hi_u - frame.u, 0.01)


def _bones(frame: _Frame, anatomy: Anatomy, view: str):
    u, v = frame.u, frame.v
    au = np.abs(u)
    bone = np.zeros(frame.shape, np.float32)
    wide = anatomy.habitus
    for side in (-1, 1):
        su = side * u
        for k in range(10):  # posterior ribs: from the spine up-and-out, then arching down
            x = np.clip(su - 0.07, 0, None)
            start = -0.78 + 0.125 * k
            curve = start - 0.10 * x + 0.75 * x**2 / wide
            bone += (
                (0.8 - 0.35 * np.clip(x / 0.8, 0, 1))
                * _band(
                    frame,
                    curve,
                    0.020 + 0.012 * x,
                    side * 0.07 if side > 0 else -0.86 * wide,
                    0.86 * wide if side > 0 else -0.07,
                )
                * (su > 0)
            )
        for k in range(6):  # anterior ribs: from the lateral wall down towards the sternum
            x = np.clip(su, 0.0, 0.85 * wide)
            start = -0.60 + 0.13 * k
            curve = start + 0.42 * (0.85 * wide - x) - 0.25 * (0.85 * wide - x) ** 2
            bone += (
                0.25
                * _band(
                    frame,
                    curve,
                    0.018,
                    side * 0.2 if side > 0 else -0.84 * wide,
                    0.84 * wide if side > 0 else -0.2,
                )
                * (su > 0)
            )
        clavicle_v = (
            -0.72
            - 0.10 * (su - 0.06)
            + 0.05 * np.sin(np.pi * np.clip(su, 0, 0.65) / 0.65)
            - (0.06 if view == "AP" else 0.0)
        )
        bone += (
            1.4
            * _band(
                frame,
                clavicle_v,
                0.026,
                0.06 if side > 0 else -0.66 * wide,
                0.66 * wide if side > 0 else -0.06,
            )
            * (su > 0)
        )
        # scapula: a thin plate over the upper lateral lung; humeral head
        r = ((su - 0.66 * wide) / 0.13) ** 2 + ((v + 0.42) / 0.28) ** 2
        bone += 0.35 * np.clip(1 - r, 0, 1) ** 0.3
        r = ((su - 0.90 * wide) / 0.10) ** 2 + ((v + 0.70) / 0.11) ** 2
        bone += 1.6 * np.sqrt(np.clip(1 - r, 0, 1))
    # spine: vertebral bodies with end plates, pedicles as rings, spinous processes
    level = (v + 0.95) / 0.118
    within = level - np.floor(level)
    body = (
        _smooth_step(0.072 - au, 0.012) * _smooth_step(within - 0.1, 0.05) * _smooth_step(0.9 - within, 0.05)
    )
    bone += 0.3 * body * (v > -0.95)
    for side in (-1, 1):
        r = ((u - side * 0.052) / 0.016) ** 2 + ((within - 0.35) / 0.22) ** 2
        bone += 0.6 * (np.clip(1 - r, 0, 1) ** 0.5 - 0.8 * np.clip(1 - r / 0.45, 0, 1) ** 0.5) * (v > -0.95)
    r = (u / 0.012) ** 2 + ((within - 0.7) / 0.18) ** 2
    bone += 0.4 * np.sqrt(np.clip(1 - r, 0, 1)) * (v > -0.95)
    return bone * anatomy.bone_density


@functools.lru_cache(maxsize=64)
def _vessel_canvas(seed: int, habitus: float) -> np.ndarray:
    """Pulmonary vessels: a branching tree from each hilum, thinning to the periphery."""
    rng = np.random.default_rng([seed, 7])
    tubes: list[tuple[np.ndarray, np.ndarray, float, float]] = []
    for side in (-1, 1):
        hilum = np.array([side * 0.17 * habitus, -0.06])
        for angle in (-80, -50, -20, 10, 35, 60, 85):
            theta = np.deg2rad(angle + rng.normal(0, 6))
            direction = np.array([side * np.cos(theta), np.sin(theta)])
            _branch(tubes, rng, hilum, direction, 0.15, 0.010, 5)
    return _draw_tubes(tubes)


def _branch(tubes: list, rng, start, direction, length, radius, depth) -> None:
    """Append a vessel (or airway) segment and, below it, two branches to depth 0."""
    end = start + direction * length
    tubes.append((start, end, radius, radius * 0.8))
    if depth == 0:
        return
    for turn in (-1, 1):
        theta = np.deg2rad(turn * rng.uniform(18, 34))
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        _branch(
            tubes, rng, end, rotation @ direction, length * rng.uniform(0.68, 0.84), radius * 0.72, depth - 1
        )


def _draw_tubes(tubes: list) -> np.ndarray:
    """A canvas with the chords of tapered cylinders (p0, p1, r0, r1 in body units), max where
    they cross. Drawn in batches of similar box size: one tree has hundreds of segments, and a
    loop of small array operations per segment made the vessels most of a film's rendering time."""
    canvas = np.zeros((_CANVAS, _CANVAS), np.float32)
    if not tubes:
        return canvas
    scale = (_CANVAS - 1) / 2
    a = (np.array([tube[0] for tube in tubes], np.float64) + 1) * scale
    b = (np.array([tube[1] for tube in tubes], np.float64) + 1) * scale
    r0, r1 = (np.array([tube[i] for tube in tubes], np.float64) for i in (2, 3))
    pad = np.maximum(r0, r1)[:, None] * scale + 2
    lo = np.floor(np.minimum(a, b) - pad).astype(int).clip(0, _CANVAS - 1)
    hi = np.ceil(np.maximum(a, b) + pad).astype(int).clip(0, _CANVAS - 1)
    seg = b - a
    length2 = np.array([max(float(s @ s), 1e-6) for s in seg])
    drawn = np.flatnonzero((hi > lo).all(axis=1))  # a box squeezed to an edge: off the canvas
    if not len(drawn):
        return canvas
    area = np.prod(hi[drawn] - lo[drawn] + 1, axis=1)
    for batch in np.array_split(drawn[np.argsort(area, kind="stable")], -(-len(drawn) // 64)):
        width, height = (hi[batch] - lo[batch] + 1).max(axis=0)
        x = (lo[batch, 0, None] + np.arange(width))[:, None, :]
        y = (lo[batch, 1, None] + np.arange(height))[:, :, None]
        inside = (x <= hi[batch, 0, None, None]) & (y <= hi[batch, 1, None, None])
        ax, ay = a[batch, 0, None, None], a[batch, 1, None, None]
        sx, sy = seg[batch, 0, None, None], seg[batch, 1, None, None]
        t = np.clip(((x - ax) * sx + (y - ay) * sy) / length2[batch, None, None], 0, 1)
        d = np.hypot(x - ax - t * sx, y - ay - t * sy) / scale
        r = r0[batch, None, None] + (r1 - r0)[batch, None, None] * t
        chord = 2 * np.sqrt(np.clip(r**2 - d**2, 0, None))
        rows, cols = np.broadcast_to(y, inside.shape)[inside], np.broadcast_to(x, inside.shape)[inside]
        np.maximum.at(canvas, (rows, cols), chord[inside].astype(np.float32))
    return canvas


@functools.lru_cache(maxsize=64)
def _finding_canvas(finding: FindingState, centre: tuple[float, float], extent: float) -> np.ndarray:
    """Thin structures of a finding: air bronchograms (opacities) or septal lines (edema)."""
    rng = np.random.default_rng([finding.seed, 11])
    tubes = []
    if finding.name == "edema":  # Kerley B lines: short horizontal lines at the lateral bases
        for _ in range(int(8 + 16 * finding.factor)):
            side = rng.choice((-1, 1))
            u = side * rng.uniform(0.55, 0.68)
            v = rng.uniform(0.05, 0.42)
            tubes.append(((u, v), (u - side * rng.uniform(0.03, 0.06), v), 0.0035, 0.0035))
    else:  # air bronchograms: a small branching airway tree inside the opacity
        for _ in range(2):
            theta = rng.uniform(0, 2 * np.pi)
            direction = np.array([np.cos(theta), np.sin(theta)])
            start = np.array(centre) - direction * extent * 0.5
            _branch(tubes, rng, start, direction, extent * 0.5, 0.006, 2)
    return _draw_tubes(tubes)


def _focal_geometry(finding: FindingState, anatomy: Anatomy) -> tuple[tuple[float, float], float]:
    """Centre and radius (body units) of a focal opacity."""
    side = 1 if finding.side == "left" else -1
    if finding.name == "atelectasis":
        return (side * 0.40 * anatomy.habitus, 0.30), 0.16
    du, dv = finding.location
    return (
        side * (0.40 + 0.12 * du) * anatomy.habitus,
        _ZONE_CENTRE_V[finding.zone] + _ZONE_JITTER_V * dv,
    ), 0.13


def _finding_attenuation(
    frame: _Frame, anatomy: Anatomy, finding: FindingState, air: dict, vessels: np.ndarray
):
    """How a finding changes the attenuation map (positive: denser, negative: lucent)."""
    u, v = frame.u, frame.v
    f = finding.factor
    side = 1 if finding.side == "left" else -1
    lung_air = air[side]
    if finding.name == "pleural effusion":
        # fluid settles in the costophrenic angle; its meniscus rises towards the lateral wall
        lung_centre = side * 0.40 * anatomy.habitus
        lateral = np.clip(side * (u - lung_centre) / (0.31 * anatomy.habitus), -1, 1.2)
        floor = float(np.max(_dome(anatomy, np.array([lung_centre + side * 0.31 * anatomy.habitus]), side)))
        meniscus = floor - (0.10 + 0.50 * f) - 0.12 * np.clip(lateral, 0, 1) ** 2
        fill = _smooth_step(v - meniscus, 0.05) * np.clip((v - meniscus) / 0.25 + 0.3, 0, 1)
        support = np.clip(lung_air / (0.3 * _AIR_DEPTH), 0, 1) ** 0.5
        return (_FLUID - _PARENCHYMA) * _AIR_DEPTH * fill * support
    if finding.name == "pneumothorax":
        # the lung falls away from the apex and lateral wall: a lucent rim without vessels,
        # bounded by the thin white visceral pleural line
        lung_centre = side * 0.40 * anatomy.habitus
        half_width = 0.31 * anatomy.habitus
        width = 0.10 + 0.22 * f
        lateral = side * (u - lung_centre) / half_width
        apex_depth = (v + 0.80) / 0.55
        inner = np.minimum(1 - lateral, apex_depth + 0.15 * np.abs(lateral))
        rim = _smooth_step(width - inner, 0.02) * (lung_air > 0.02) * _smooth_step(0.35 - v, 0.1)
        line = np.exp(-(((inner - width) / 0.012) ** 2)) * (lung_air > 0.05) * _smooth_step(0.3 - v, 0.1)
        return -rim * (_PARENCHYMA * lung_air + 0.55 * vessels) + 0.05 * line
    if finding.name == "cardiomegaly":
        grown = _heart(frame, anatomy, 1.0 + 0.38 * f) - _heart(frame, anatomy, 1.0)
        covered = np.minimum(grown, air[-1] + air[1])
        return (1 - _PARENCHYMA) * covered
    if finding.name == "edema":  # perihilar (bat-wing) haze and septal lines
        haze = np.zeros(frame.shape, np.float32)
        for s in (-1, 1):
            haze += np.exp(-(((u - s * 0.22) / (0.14 + 0.08 * f)) ** 2) - ((v - 0.02) / 0.28) ** 2)
        lines = frame.sample(_finding_canvas(finding, (0.0, 0.0), 0.0))
        lungs = air[-1] + air[1]
        return (0.55 * f * haze * lungs + 0.7 * lines * (lungs > 0.05)) * (_FLUID - _PARENCHYMA)
    centre, radius = _focal_geometry(finding, anatomy)
    radius *= 0.6 + 0.6 * f
    if finding.name == "atelectasis":  # a plate above the dome, oblique
        a = (u - centre[0]) / (radius * 1.4)
        b = (v - centre[1] - 0.12 * side * (u - centre[0])) / (0.035 + 0.05 * f)
        shape = np.exp(-((a**2 + b**2) ** 1.5))
        fill = 0.85
    elif finding.name == "pneumonia":  # patchy: several lobules
        rng = np.random.default_rng([finding.seed, 13])
        shape = np.zeros(frame.shape, np.float32)
        for _ in range(6):
            cu, cv = centre[0] + rng.normal(0, radius * 0.5), centre[1] + rng.normal(0, radius * 0.5)
            shape = np.maximum(shape, np.exp(-((u - cu) ** 2 + (v - cv) ** 2) / (radius * 0.45) ** 2))
        fill = 0.65
    else:  # consolidation (dense, lobar-like), lung opacity (hazy ground glass)
        shape = np.exp(-((((u - centre[0]) ** 2 + (v - centre[1]) ** 2) / radius**2) ** 1.6))
        fill = 0.95 if finding.name == "consolidation" else 0.45
    opacity = fill * shape
    if finding.name in ("consolidation", "pneumonia"):
        bronchi = frame.sample(_finding_canvas(finding, centre, radius))
        opacity = opacity * (1 - np.clip(bronchi * 40, 0, 0.7) * (shape > 0.5))
    return (_FLUID - _PARENCHYMA) * opacity * lung_air


@functools.lru_cache(maxsize=64)
def _device_canvas(device: DeviceState, habitus: float) -> np.ndarray:
    """A device's tubes and wires as chords on a body-space canvas, weighted by their density."""
    rng = np.random.default_rng([device.seed, 19])
    side = 1 if device.side == "left" else -1
    jitter = rng.uniform(-0.03, 0.03, 8)
    if device.name == "chest drain":  # through the lateral chest wall, then up towards the apex
        path = [
            (side * (0.98 + jitter[0]) * habitus, 0.34 + jitter[1]),
            (side * (0.70 + jitter[2]) * habitus, 0.24 + jitter[3]),
            (side * (0.62 + jitter[4]) * habitus, -0.08 + jitter[5]),
            (side * (0.50 + jitter[6]) * habitus, -0.58 + jitter[7]),
        ]
        wall = _polyline(path, 0.016) - _polyline(path, 0.010)  # a hollow tube
        return 10.0 * wall + 0.6 * _polyline(path, 0.003) / 0.006  # and its radio-opaque stripe
    if device.name == "pacemaker":  # a lead from the generator through the veins to the apex
        path = [
            (side * (0.52 + jitter[0]), -0.55 + jitter[1]),
            (side * 0.22, -0.66 + jitter[2]),
            (0.02 + jitter[3], -0.42),
            (-0.04, 0.02 + jitter[4]),
            (0.16 + jitter[5], 0.36),
        ]
        return 0.5 * _polyline(path, 0.005) / 0.010
    if device.name == "ecg lead":  # a wire from an electrode on the chest out past the shoulder
        start = (side * (0.58 + jitter[0]) * habitus, -0.62 + jitter[1])
        path = [start, (side * 0.85 * habitus, -0.85 + jitter[2]), (side * 1.05 * habitus, -1.0)]
        return 0.4 * _polyline(path, 0.004) / 0.008
    return np.zeros((_CANVAS, _CANVAS), np.float32)


def _polyline(points: list[tuple[float, float]], radius: float) -> np.ndarray:
    return _draw_tubes([(np.array(a), np.array(b), radius, radius) for a, b in zip(points, points[1:])])


def device_attenuation(frame: _Frame, device: DeviceState, habitus: float) -> np.ndarray:
    """What a device adds to the attenuation map (>= 0): tubes and wires from their canvas, the
    pacemaker's generator, the ECG electrode's disc and the marker's letter as solid shapes."""
    u, v = frame.u, frame.v
    side = 1 if device.side == "left" else -1
    rng = np.random.default_rng([device.seed, 19])
    jitter = rng.uniform(-0.03, 0.03, 8)
    drawn = frame.sample(_device_canvas(device, round(habitus, 4)))
    if device.name == "pacemaker":
        a = (u - side * (0.58 + jitter[0])) / 0.09
        b = (v + 0.55 + jitter[1]) / 0.065
        drawn = drawn + 1.6 * _smooth_step(1 - np.maximum(np.abs(a), np.abs(b)) ** 4, 0.05)
    elif device.name == "ecg lead":
        r = np.hypot(u - side * (0.58 + jitter[0]) * habitus, v + 0.62 + jitter[1])
        drawn = drawn + 0.25 * _smooth_step(0.045 - r, 0.004) + 1.2 * _smooth_step(0.012 - r, 0.003)
    elif device.name == "text marker":  # an "L" in the upper corner of the patient's side
        cu, cv = side * (0.82 + jitter[0]), -0.88 + jitter[1]
        stem = _smooth_step(0.012 - np.abs(u - cu), 0.003) * _smooth_step(0.06 - np.abs(v - cv), 0.003)
        foot = _smooth_step(0.012 - np.abs(v - cv - 0.05), 0.003) * _smooth_step(
            0.035 - np.abs(u - cu - 0.023), 0.003
        )
        drawn = drawn + 2.0 * np.maximum(stem, foot)
    return drawn.astype(np.float32)


def device_masks(
    rows: int, columns: int, anatomy: Anatomy, devices: list[DeviceState], pose: Pose, view: str = "PA"
) -> dict[str, np.ndarray]:
    """Each device's mask on the film: where it adds attenuation, grown by the system blur."""
    frame = _Frame(rows, columns, pose, 1.0 if view == "PA" else 1.04)
    grow = int(np.ceil(3 * 0.0012 * max(rows, columns))) + 1
    return {
        device.name: ndimage.binary_dilation(
            device_attenuation(frame, device, anatomy.habitus) > 0.01, iterations=grow
        )
        for device in devices
    }


def render_attenuation(
    rows: int,
    columns: int,
    anatomy: Anatomy,
    findings: list[FindingState],
    pose: Pose,
    view: str = "PA",
    devices: tuple[DeviceState, ...] = (),
) -> np.ndarray:
    """The line-integral attenuation map of a frontal film (float32, >= 0), with its devices."""
    frame = _Frame(rows, columns, pose, 1.0 if view == "PA" else 1.04)
    u, v = frame.u, frame.v
    air = {side: _lung_air(frame, anatomy, side) for side in (-1, 1)}
    names = {f.name: f for f in findings}
    heart_scale = 1.12 if view == "AP" else 1.0
    heart = _heart(frame, anatomy, heart_scale)
    knob_r = ((u - 0.10) ** 2 + (v + 0.36) ** 2) / anatomy.aortic_knob_radius**2
    knob = 0.8 * np.clip(1 - knob_r, 0, 1) ** 0.25
    mediastinum = np.maximum(heart, knob)
    lungs = np.clip(air[-1] + air[1] - mediastinum, 0, None)
    for side in (-1, 1):
        air[side] = np.clip(air[side] - mediastinum, 0, None)
    # soft tissue: an elliptic cylinder, neck above, shoulders
    wide = anatomy.habitus
    width = np.where(v < -0.82, 0.28 + (wide * 0.95 - 0.28) * _smooth_step(v + 0.86, 0.06), wide * 0.95)
    body = np.sqrt(np.clip(1 - (u / width) ** 2, 0, 1)) * anatomy.chest_wall_density
    if anatomy.sex == "F":  # breast shadows over the lower zones, densest at their lower edge
        for side in (-1, 1):
            r = ((u - side * 0.50 * wide) / 0.34) ** 2 + ((v - 0.36) / 0.26) ** 2
            body = body + 0.16 * np.exp(-2.5 * r) * _smooth_step(v - 0.16, 0.16)
    stomach = 0.3 * np.sqrt(np.clip(1 - ((u - 0.30 * wide) / 0.12) ** 2 - ((v - 0.70) / 0.07) ** 2, 0, 1))
    vessels = frame.sample(_vessel_canvas(anatomy.seed, round(wide, 4))) * (lungs > 0.02)
    trachea = 0.25 * _smooth_step(0.028 - np.abs(u - 0.01 * (v + 1)), 0.008) * _smooth_step(-0.30 - v, 0.02)
    for side in (-1, 1):  # main bronchi from the carina towards the hila
        along = side * (u - 0.01) / 0.16
        bronchus = _smooth_step(0.02 - np.abs(v + 0.30 - 0.22 * side * (u - 0.01)), 0.006)
        trachea = trachea + 0.2 * bronchus * (along > 0) * (along < 1)
    attenuation = (
        body
        - (1 - _PARENCHYMA) * lungs
        - trachea
        - stomach
        + 8.0 * vessels
        + 0.35 * _bones(frame, anatomy, view)
    )
    for finding in names.values():
        attenuation = attenuation + _finding_attenuation(frame, anatomy, finding, air, 8.0 * vessels)
    for device in devices:
        attenuation = attenuation + device_attenuation(frame, device, anatomy.habitus)
    return np.clip(attenuation, 0, None).astype(np.float32)


def form_film(attenuation: np.ndarray, noise: np.ndarray, blur_px: float) -> np.ndarray:
    """Exposure exp(-mu A), system blur, quantum noise (relative std ~ 1/sqrt(exposure)),
    then the contrast curve; float32 in [0, 1], bone and soft tissue bright."""
    exposure = np.exp(-2.2 * attenuation)
    exposure = ndimage.gaussian_filter(exposure, blur_px, truncate=3.0)
    exposure = exposure * (1 + 0.012 * noise / np.sqrt(np.maximum(exposure, 1e-3)))
    density = -np.log(np.clip(exposure, 1e-4, None)) / 2.2
    return (1 / (1 + np.exp(-(density - 0.72) / 0.28))).astype(np.float32)


def finding_masks(
    film_with: np.ndarray, films_without: dict[str, np.ndarray], threshold: float = 0.01
) -> dict[str, np.ndarray]:
    """Ground truth of each finding: where removing it changes the film by > ``threshold``."""
    masks = {}
    for name, without in films_without.items():
        changed = ndimage.gaussian_filter(np.abs(film_with - without), 1.0) > threshold
        masks[name] = ndimage.binary_fill_holes(ndimage.binary_closing(changed, iterations=2))
    return masks


def render_frontal(
    rows: int,
    columns: int,
    findings: list[FindingState],
    pose: Pose,
    rng: np.random.Generator,
    anatomy: Anatomy | None = None,
    view: str = "PA",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A frontal chest film and the ground-truth mask of every finding.

    Parameters
    ----------
    rows, columns: int
        Image size.
    findings: list[FindingState]
        Findings to draw (names from ``RENDERED_FINDINGS``).
    pose: Pose
        Placement; differs slightly between a patient's studies.
    rng: numpy.random.Generator
        Draws the quantum noise.
    anatomy: Anatomy | None
        The patient (default: an average 55-year-old man).
    view: str
        ``PA`` or ``AP`` (AP magnifies the heart and raises the clavicles).

    Returns
    -------
    tuple[numpy.ndarray, dict[str, numpy.ndarray]]
        float32 image in [0, 1] and bool masks keyed by finding name.
    """
    anatomy = anatomy or Anatomy()
    noise = rng.standard_normal((rows, columns)).astype(np.float32)
    blur = 0.0012 * max(rows, columns)
    film = form_film(render_attenuation(rows, columns, anatomy, findings, pose, view), noise, blur)
    without = {
        f.name: form_film(
            render_attenuation(rows, columns, anatomy, [g for g in findings if g is not f], pose, view),
            noise,
            blur,
        )
        for f in findings
    }
    return film, finding_masks(film, without)


def render_lateral(rows: int, columns: int, pose: Pose, rng: np.random.Generator) -> np.ndarray:
    """A lateral film (to be filtered out by the builder): torso, spine behind, heart in front."""
    frame = _Frame(rows, columns, pose)
    u, v = frame.u, frame.v
    body = np.sqrt(np.clip(1 - (u / 0.7) ** 2 - ((v - 0.1) / 1.0) ** 4, 0, 1))
    lung = 0.7 * np.sqrt(np.clip(1 - (u / 0.5) ** 2 - ((v + 0.05) / 0.6) ** 2, 0, 1))
    spine = 1.2 * _smooth_step(0.08 - np.abs(u - 0.55), 0.01) * body
    heart = 0.6 * np.sqrt(np.clip(1 - ((u + 0.25) / 0.3) ** 2 - ((v - 0.3) / 0.28) ** 2, 0, 1))
    attenuation = np.clip(body - 0.8 * lung + heart + 0.35 * spine, 0, None)
    noise = rng.standard_normal((rows, columns)).astype(np.float32)
    return form_film(attenuation, noise, 0.0012 * max(rows, columns))
