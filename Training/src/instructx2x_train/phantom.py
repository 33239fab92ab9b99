"""Synthetic chest radiographs: a PA film with findings drawn where they occur.

Geometry is in normalised coordinates (u: -1 image left .. 1 image right, v: -1 top .. 1
bottom). Radiological convention: the patient's left is the image's right on a PA film, so
a left-sided finding is drawn at u > 0. Each finding returns its ground-truth mask.
"""

from __future__ import annotations

import dataclasses

import numpy as np

__all__ = ["Pose", "FindingState", "RENDERED_FINDINGS", "LEVEL_FACTOR", "render_frontal",
           "render_lateral"]

# Findings with a located rendering (the eight MS-CXR prior categories).
RENDERED_FINDINGS = ("pleural effusion", "cardiomegaly", "pneumothorax", "edema", "atelectasis",
                     "consolidation", "pneumonia", "lung opacity")
LEVEL_FACTOR = {"minimal": 0.35, "small": 0.5, "mild": 0.5, "moderate": 0.75,
                "moderate to large": 0.9, "large": 1.0, "severe": 1.0}
_LUNG = {"right": (-0.38, -0.05, 0.30, 0.62), "left": (0.38, -0.05, 0.28, 0.60)}  # cu, cv, ru, rv


@dataclasses.dataclass(frozen=True)
class Pose:
    """A patient's placement on the detector: rotation (degrees), scale, shift (normalised)."""

    rotation: float = 0.0
    scale: float = 1.0
    shift_u: float = 0.0
    shift_v: float = 0.0


@dataclasses.dataclass(frozen=True)
class FindingState:
    """A finding present in a study: its level, side and (for focal opacities) location."""

    name: str
    level: str
    side: str = "right"  # the patient's side
    location: tuple[float, float] = (0.0, 0.0)  # offset inside the lung, in lung radii


def _grid(rows: int, columns: int, pose: Pose, magnification: float = 1.0):
    v, u = np.mgrid[0:rows, 0:columns].astype(np.float32)
    u = u / (columns - 1) * 2 - 1
    v = v / (rows - 1) * 2 - 1
    angle = np.deg2rad(pose.rotation)
    cos, sin = np.float32(np.cos(angle)), np.float32(np.sin(angle))
    u, v = u - pose.shift_u, v - pose.shift_v
    scale = np.float32(pose.scale * magnification)
    return (cos * u + sin * v) / scale, (-sin * u + cos * v) / scale


def _ellipse(u, v, cu, cv, ru, rv):
    return ((u - cu) / ru) ** 2 + ((v - cv) / rv) ** 2


def _soft(distance, edge=0.08):
    """1 inside (distance < 1), 0 outside, with a smooth edge."""
    return np.clip((1.0 + edge - distance) / (2 * edge), 0.0, 1.0)


def render_frontal(rows: int, columns: int, findings: list[FindingState], pose: Pose,
                   rng: np.random.Generator, heart_size: float = 1.0,
                   view: str = "PA") -> tuple[np.ndarray, dict[str, np.ndarray]]:
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
        Noise source.
    heart_size: float
        The patient's normal cardiac size (1 = average).
    view: str
        ``PA`` or ``AP`` (AP magnifies the heart and raises the clavicles).

    Returns
    -------
    tuple[numpy.ndarray, dict[str, numpy.ndarray]]
        float32 image in [0, 1] and bool masks keyed by finding name.
    """
    u, v = _grid(rows, columns, pose)
    image = np.full((rows, columns), 0.04, np.float32)
    torso = _soft(_ellipse(u, v, 0.0, 0.15, 0.86, 1.05), 0.03)
    image += 0.26 * torso
    lungs = {side: _soft(_ellipse(u, v, *geometry), 0.04) for side, geometry in _LUNG.items()}
    lung = np.maximum(lungs["left"], lungs["right"])
    image -= 0.16 * lung
    abdomen = torso * np.clip((v - 0.55) / 0.05, 0, 1) * (1 - lung)
    image += 0.22 * abdomen
    # ribs: bright arcs over the lungs, rising towards the midline
    rib_phase = (v + 0.62 - 0.14 * np.abs(u) ** 2) / 0.135
    ribs = np.clip(1.0 - np.abs(rib_phase - np.round(rib_phase)) / 0.18, 0, 1)
    image += 0.09 * ribs * lung * (rib_phase > -0.5) * (rib_phase < 9)
    clavicle_v = -0.74 - 0.16 * (np.abs(u) - 0.1) - (0.06 if view == "AP" else 0.0)
    clavicles = (np.abs(v - clavicle_v) < 0.028) & (np.abs(u) > 0.08) & (np.abs(u) < 0.72)
    image += 0.22 * clavicles
    spine = np.clip(1 - np.abs(u) / 0.085, 0, 1) ** 0.5 * (v > -0.95)
    image = np.maximum(image, 0.5 * spine * torso)

    heart_scale = heart_size * (1.12 if view == "AP" else 1.0)
    masks: dict[str, np.ndarray] = {}
    by_name = {f.name: f for f in findings}
    normal_heart = _ellipse(u, v, 0.1, 0.3, 0.30 * heart_scale, 0.25 * heart_scale)
    if "cardiomegaly" in by_name:
        heart_scale *= 1.0 + 0.4 * LEVEL_FACTOR.get(by_name["cardiomegaly"].level, 0.75)
    heart = _ellipse(u, v, 0.1, 0.3, 0.30 * heart_scale, 0.25 * heart_scale)
    image = np.maximum(image, 0.62 * _soft(heart, 0.03))
    if "cardiomegaly" in by_name:
        masks["cardiomegaly"] = (heart < 1) & (normal_heart >= 1)

    for finding in findings:
        factor = LEVEL_FACTOR.get(finding.level, 0.75)
        cu, cv, ru, rv = _LUNG[finding.side]
        side_lung = lungs[finding.side]
        if finding.name == "pleural effusion":
            lateral = (np.abs(u) - abs(cu)) / ru
            level_v = cv + rv - 0.05 - 0.55 * rv * factor - 0.12 * lateral  # meniscus
            region = side_lung * np.clip((v - level_v) / 0.03, 0, 1)
            image = image * (1 - region) + 0.52 * region
            masks[finding.name] = region > 0.5
        elif finding.name == "pneumothorax":
            radius = _ellipse(u, v, cu, cv, ru, rv)
            lateral_or_apical = ((u - cu) * np.sign(cu) > -0.2 * ru) | (v < cv - 0.3 * rv)
            width = 0.25 + 0.35 * factor
            rim = (radius > (1 - width) ** 2) & (radius < 1) & lateral_or_apical
            image[rim] = 0.03
            line = (np.abs(np.sqrt(radius) - (1 - width)) < 0.012) & lateral_or_apical
            image[line] = 0.4
            masks[finding.name] = rim
        elif finding.name == "edema":
            haze = np.zeros_like(image)
            for hilum_u in (-0.22, 0.24):
                haze = np.maximum(haze, np.exp(-_ellipse(u, v, hilum_u, 0.0, 0.22, 0.3) * 1.5))
            haze *= lung
            image += 0.28 * factor * haze
            masks[finding.name] = haze > 0.35
        elif finding.name == "cardiomegaly":
            continue
        else:  # focal opacities: atelectasis (basal band), consolidation, pneumonia, lung opacity
            if finding.name == "atelectasis":
                center, radii = (cu, cv + 0.62 * rv), (0.6 * ru, 0.12 * rv)
            else:
                du, dv = finding.location
                center, radii = (cu + 0.45 * du * ru, cv + 0.5 * dv * rv), (0.28 * ru, 0.2 * rv)
            radii = (radii[0] * (0.6 + 0.6 * factor), radii[1] * (0.6 + 0.6 * factor))
            blob = _soft(_ellipse(u, v, *center, *radii), 0.25) * side_lung
            image += (0.18 + 0.2 * factor) * blob
            masks[finding.name] = blob > 0.5
    image += rng.normal(0.0, 0.008, image.shape).astype(np.float32)
    return np.clip(image, 0, 1), masks


def render_lateral(rows: int, columns: int, pose: Pose, rng: np.random.Generator) -> np.ndarray:
    """A lateral film (to be filtered out by the builder): torso, spine behind, heart in front."""
    u, v = _grid(rows, columns, pose)
    torso = _soft(_ellipse(u, v, 0.0, 0.1, 0.7, 1.0), 0.03)
    lung = _soft(_ellipse(u, v, 0.0, -0.05, 0.5, 0.6), 0.05)
    image = 0.05 + 0.28 * torso - 0.14 * lung
    image = np.maximum(image, 0.55 * (np.abs(u - 0.55) < 0.08) * torso)
    image = np.maximum(image, 0.5 * _soft(_ellipse(u, v, -0.25, 0.3, 0.3, 0.28), 0.05))
    image += rng.normal(0.0, 0.008, image.shape).astype(np.float32)
    return np.clip(image, 0, 1).astype(np.float32)
