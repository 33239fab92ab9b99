"""True counterfactuals for ``stress-test --counterfactuals truth``: each film's phantom rendered
again with the edit.

``stress-films`` records every film's phantom in ``phantoms.json`` (the draw's seed, resolution,
finding probability and device chances; per film its index in the stream, body, findings, pose
and devices). The truth of an edit is the same phantom filmed with the instructed finding
removed, added or at the instructed level, and everything else (body, pose, devices, the quantum
noise of the film's own stream) the same; the pixels of a kept region are the source film's, as
an editor keeps them. Films that cannot be drawn again (a folder without ``phantoms.json``, a
dataset split, DICOMweb films) and edits the phantom cannot render are refused before any model
or classifier work.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from instructx2x.errors import ParameterError
from instructx2x.instructions import Laterality, Operation, parse_instruction

from .classifiers import DeviceDraw, PhantomDraw, draw_phantom
from .phantom import LATERALISED_FINDINGS, RENDERED_FINDINGS, ZONED_FINDINGS, draw_finding, level_words

__all__ = ["PHANTOMS_NAME", "PHANTOMS_FORMAT", "phantoms_manifest", "PhantomTruth"]

PHANTOMS_NAME = "phantoms.json"
PHANTOMS_FORMAT = "instructx2x-stress-phantoms/1"
ADDED_STREAM = 41  # an added finding's side (where the instruction names none) and texture


def phantoms_manifest(
    seed: int, resolution: int, finding_probability: float, devices: DeviceDraw, files: list[str]
) -> dict:
    """``phantoms.json`` for the films ``files`` (film ``i`` of the stream ``seed``)."""
    return {
        "format": PHANTOMS_FORMAT,
        "seed": seed,
        "resolution": resolution,
        "finding_probability": finding_probability,
        "devices": dataclasses.asdict(devices),
        "films": {
            name: {
                "index": index,
                **draw_phantom(seed, index, resolution, finding_probability, devices).record(),
            }
            for index, name in enumerate(files)
        },
    }


def _refuse_edit(edit, reason: str) -> ParameterError:
    return ParameterError(
        f"stress edit {edit.instruction!r}: --counterfactuals truth cannot render it ({reason})."
    )


@dataclasses.dataclass(frozen=True)
class PhantomTruth:
    """The phantoms of a ``stress-films`` folder, drawn again, and the true counterfactual of an edit."""

    phantoms: dict[str, PhantomDraw]

    @classmethod
    def load(cls, folder: Path, files: list[str]) -> PhantomTruth:
        """Every film of ``files`` drawn again from the folder's ``phantoms.json``.

        Raises
        ------
        ParameterError
            No or a malformed ``phantoms.json``; a film it does not list; a film whose recorded
            phantom is not what its seed and index draw (another version of the phantom).
        """
        path = folder / PHANTOMS_NAME
        if not path.is_file():
            raise ParameterError(
                f"--counterfactuals truth renders each film's phantom again from the {PHANTOMS_NAME} that "
                f"stress-films writes; folder {folder.name} has none (films that are not phantoms "
                "cannot be rendered again)."
            )
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
            if manifest.get("format") != PHANTOMS_FORMAT:
                raise ValueError(f"format {manifest.get('format')!r} is not {PHANTOMS_FORMAT}")
            draw = (
                int(manifest["seed"]),
                int(manifest["resolution"]),
                float(manifest["finding_probability"]),
                DeviceDraw(**manifest["devices"]),
            )
            recorded = {name: manifest["films"][name] for name in files if name in manifest["films"]}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ParameterError(f"{folder.name}/{PHANTOMS_NAME} cannot be read: {error}") from None
        missing = [name for name in files if name not in recorded]
        if missing:
            raise ParameterError(
                f"{folder.name}/{PHANTOMS_NAME} lists no phantom for {len(missing)} film(s), e.g. "
                f"{missing[0]}: every film of a truth stress test must come from stress-films."
            )
        seed, resolution, probability, devices = draw
        phantoms = {}
        for name, entry in recorded.items():
            phantom = draw_phantom(seed, int(entry["index"]), resolution, probability, devices)
            if phantom.record() != {key: value for key, value in entry.items() if key != "index"}:
                raise ParameterError(
                    f"{folder.name}/{PHANTOMS_NAME}: the phantom recorded for {name} is not what seed "
                    f"{seed}, index {entry['index']} draws now (written by another version of the "
                    "phantom); write the films again with stress-films."
                )
            phantoms[name] = phantom
        return cls(phantoms)

    def check(self, edits) -> None:
        """Refuse an edit the phantom cannot render: a finding it does not draw, a level it does
        not grade the finding with, an addition without its level, a bilateral lateralised
        finding, a focal opacity added without its zone."""
        for edit in edits:
            parsed = parse_instruction(edit.instruction)
            finding = edit.finding
            if finding not in RENDERED_FINDINGS:
                raise _refuse_edit(edit, f"the phantom draws {', '.join(RENDERED_FINDINGS)}")
            levels = level_words(finding)
            if parsed.operation is Operation.ADD:
                if not parsed.levels or parsed.levels[0] not in levels:
                    raise _refuse_edit(edit, f"an addition names the level, one of {', '.join(levels)}")
                if finding in LATERALISED_FINDINGS and parsed.laterality is Laterality.BILATERAL:
                    raise _refuse_edit(edit, f"the phantom draws {finding} on one side")
                if finding in ZONED_FINDINGS and len(parsed.zones) != 1:
                    raise _refuse_edit(edit, "an added focal opacity names its zone: upper, mid or lower")
            elif parsed.operation is Operation.CHANGE_LEVEL and parsed.levels[1] not in levels:
                raise _refuse_edit(edit, f"the phantom grades {finding} {', '.join(levels)}")

    def counterfactual(
        self, film: str, edit, source: np.ndarray, keep: np.ndarray | None, seed: int
    ) -> np.ndarray:
        """The film ``film`` rendered again with ``edit`` applied, in 8-bit steps like the
        source PNG (float32 in [0, 1]); the pixels of ``keep`` are ``source``'s. ``seed`` draws
        an added finding's side (where the instruction names none) and texture."""
        phantom = self.phantoms[film]
        parsed = parse_instruction(edit.instruction)
        finding = edit.finding
        if parsed.operation is Operation.REMOVE:
            findings = tuple(state for state in phantom.findings if state.name != finding)
        elif parsed.operation is Operation.CHANGE_LEVEL:
            findings = tuple(
                dataclasses.replace(state, level=parsed.levels[1]) if state.name == finding else state
                for state in phantom.findings
            )
        else:
            rng = np.random.default_rng([seed, ADDED_STREAM])
            side = str(rng.choice(("left", "right")))
            if parsed.laterality in (Laterality.LEFT, Laterality.RIGHT):
                side = parsed.laterality.value
            added = draw_finding(rng, finding, side)
            added = dataclasses.replace(added, level=parsed.levels[0])
            if finding in ZONED_FINDINGS:  # at its zone's centre: what the instruction names
                added = dataclasses.replace(added, zone=parsed.zones[0], location=(0.0, 0.0))
            findings = phantom.findings + (added,)
        film_pixels = np.round(np.clip(phantom.render(findings), 0, 1) * 255).astype(np.float32) / 255
        if keep is not None:
            film_pixels[keep] = source[keep]
        return film_pixels
