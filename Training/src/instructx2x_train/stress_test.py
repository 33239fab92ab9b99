"""``instructx2x-train stress-test``: does a classifier read the finding, or a shortcut?

A declared set of counterfactual edits (add, remove or change the level of a finding,
optionally with a keep region such as a device left untouched) runs on every film it applies
to; each classifier reads the film before and after. Per classifier, edit, finding and
subgroup (age band, sex, race where the films carry them) the report gives the mean
probability shift and the flip rate with bootstrap 95 % intervals: for the instructed finding
(it should move), for the other findings (collateral: they should not), and for a removal with
a kept region the share of films the classifier still calls positive (a classifier that reads
the kept device instead of the finding keeps calling it). Written as ``stress-test.md``,
``stress-test.csv`` (the table), ``rows.csv`` (every reading), ``stress-test.json`` (strict
JSON: settings, seed, identities, table, verdicts) and ``stress-test.png``.

The counterfactuals come from the editing model (``--counterfactuals model``, the default) or,
for a folder ``stress-films`` wrote, from the phantoms themselves (``--counterfactuals truth``,
``stress_truth``): each film rendered again with the finding removed, added or at the new level
and everything else the same, which no model loads for. The truth separates what a classifier
reads from what an editor manages to change; films that cannot be rendered again and edits the
phantom cannot render are refused before any model or classifier work.

Each edited row is appended to a JSON-lines record as soon as it exists, so an interrupted run
resumes row by row (same folder, same settings); under ``accelerate launch`` every process
takes its share of the rows and the main process assembles the report, as ``evaluate`` does.

Classifiers: ``cohort-v2``, ``torchxrayvision``, a ``train-classifiers`` folder, or a TorchScript
module (``.pt``/``.ts``) with a JSON of the same stem beside it, ``{"findings": [...], "size":
224}``: the module takes ``(N, 1, size, size)`` float32 films in [0, 1] and returns ``(N,
len(findings))`` probabilities in [0, 1]; the findings are instruction vocabulary names.

Films: a folder of films (PNG, JPEG, DICOM) with an optional ``films.csv`` (``file`` and any of
``age``, ``sex``, ``race``, ``findings`` separated by ``;``; a ``.dcm`` film's age and sex, where
``films.csv`` does not state them, from its own DICOM, ``instructx2x.dicom.demographics``) and
an optional ``<stem>.masks.npz`` per film whose arrays name the regions an edit may keep
(``stress-films`` writes such a folder of phantoms with devices); or the source films of a dataset split (``.masks.npz`` beside them
name the findings present); or the radiographs a DICOMweb query matches (QIDO-RS, listed before
the model loads, fetched with WADO-RS by the main process into ``OUTPUT/films/`` and read once
before any edit; their age and sex from their own DICOM, ``instructx2x.dicom.demographics``;
a resumed run takes the films of ``OUTPUT/cohort.json``). Where a film's
findings are known an edit applies to the films it makes sense on (a removal to films with the
finding, an addition to films without); where they are not, to every film.
"""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from instructx2x import read_image
from instructx2x.classifiers import ClassifierSet, load_classifiers, resize_films
from instructx2x.dicom.dicomweb import CohortQuery, Credentials, cohort_films
from instructx2x.errors import ModelLoadError, OutputExistsError, ParameterError
from instructx2x.instructions import FINDINGS, Operation, parse_instruction
from instructx2x.outputs import atomic_output_dir
from instructx2x.parameters import EditParameters
from instructx2x.provenance import to_json
from instructx2x.sharding import (
    INCOMPLETE,
    RECORDS,
    current_shard,
    open_record,
    open_run_folder,
    read_records,
)

from . import metrics
from .classifiers import EVALUATED_FINDINGS, DeviceDraw, draw_films
from .dicomweb_films import FETCHED, check_readable, fetch_cohort
from .phantom import LEVEL_FACTOR, RACES
from .stress_truth import PHANTOMS_NAME, PhantomTruth, phantoms_manifest
from .subgroups import group_order, subgroups

__all__ = [
    "StressEdit",
    "StressConfig",
    "FindingReader",
    "load_reader",
    "default_edits",
    "stress_test",
    "read_edits",
    "write_stress_films",
    "IMAGE_SUFFIXES",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm")
CONFIG_NAME = "stress-test-config.json"
FILMS_TABLE = "films.csv"
DRAIN_WITH_PNEUMOTHORAX = DeviceDraw(drain_with_pneumothorax=1.0)
OPERATIONS = {Operation.ADD: "add", Operation.REMOVE: "remove", Operation.CHANGE_LEVEL: "change level"}


@dataclasses.dataclass(frozen=True)
class StressEdit:
    """One counterfactual edit: an instruction about one finding, optionally with a region kept
    unchanged (``keep``: the name of a mask in each film's ``.masks.npz``)."""

    instruction: str
    keep: str | None = None

    def __post_init__(self) -> None:
        parsed = parse_instruction(self.instruction)
        if parsed.operation not in OPERATIONS or len(parsed.findings) != 1:
            raise ParameterError(
                f"stress edit {self.instruction!r}: an edit adds, removes or changes the level of "
                "exactly one finding, e.g. 'Remove the finding of pneumothorax'."
            )
        if parsed.operation is Operation.CHANGE_LEVEL and (
            len(parsed.levels) != 2 or any(level not in LEVEL_FACTOR for level in parsed.levels)
        ):
            raise ParameterError(
                f"stress edit {self.instruction!r}: a level change names two levels, "
                "'... from mild to severe'."
            )

    @property
    def finding(self) -> str:
        return parse_instruction(self.instruction).findings[0]

    @property
    def operation(self) -> str:
        return OPERATIONS[parse_instruction(self.instruction).operation]

    @property
    def direction(self) -> int:
        """+1 when the finding's probability should rise, -1 when it should fall."""
        parsed = parse_instruction(self.instruction)
        if parsed.operation is Operation.CHANGE_LEVEL:
            before, after = parsed.levels
            return 1 if LEVEL_FACTOR[after] >= LEVEL_FACTOR[before] else -1
        return 1 if parsed.operation is Operation.ADD else -1

    @property
    def label(self) -> str:
        return self.instruction + (f" (keep {self.keep})" if self.keep else "")

    def applies(self, present: frozenset[str] | None) -> bool:
        """Whether the edit makes sense on a film with these findings (unknown: every film)."""
        if present is None:
            return True
        return (self.finding in present) == (self.operation != "add")


def read_edits(path: str | Path) -> tuple[StressEdit, ...]:
    """Edits declared in a JSON file: a list of ``{"instruction": ..., "keep": ...}`` objects.

    Raises
    ------
    ParameterError
        A missing or malformed file, or an edit that is not one finding's add, remove or level change.
    """
    path = Path(path)
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        edits = tuple(StressEdit(str(item["instruction"]), item.get("keep")) for item in items)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        if isinstance(error, ParameterError):
            raise
        raise ParameterError(
            f"edits file {path.name}: expected a JSON list like "
            '[{"instruction": "Remove the finding of pneumothorax", "keep": "chest drain"}] ({error}).'
        ) from None
    if not edits:
        raise ParameterError(f"edits file {path.name} declares no edit.")
    return edits


def default_edits(findings: tuple[str, ...]) -> tuple[StressEdit, ...]:
    """For each finding: add it (moderate), remove it, raise its level from the lowest to the highest."""
    from .phantom import level_words

    edits = []
    for finding in findings:
        levels = level_words(finding)
        edits += [
            StressEdit(f"Add the finding of moderate {finding}"),
            StressEdit(f"Remove the finding of {finding}"),
            StressEdit(f"Change the level of {finding} from {levels[0]} to {levels[-1]}"),
        ]
    return tuple(edits)


@dataclasses.dataclass(frozen=True)
class FindingReader:
    """A classifier as the stress test sees it: the findings it reads (instruction vocabulary)
    and a function from films in [0, 1] to ``(N, len(findings))`` probabilities."""

    name: str
    findings: tuple[str, ...]
    read: Callable[[list[np.ndarray]], np.ndarray]
    description: dict


def _set_reader(classifier_set: ClassifierSet) -> FindingReader:
    return FindingReader(
        classifier_set.name,
        EVALUATED_FINDINGS,
        lambda films: np.asarray(classifier_set.predict(films).findings, dtype=np.float64),
        classifier_set.describe(),
    )


def _torchscript_reader(path: Path) -> FindingReader:
    """A user's TorchScript module, checked against its declared interface on a probe batch."""
    import torch

    card_path = path.with_suffix(".json")
    example = '{"findings": ["pneumothorax"], "size": 224}'
    if not card_path.is_file():
        raise ModelLoadError(
            f"classifier {path.name}: {card_path.name} is missing beside it; it names the findings "
            f"the module returns and its input size, e.g. {example}."
        )
    try:
        card = json.loads(card_path.read_text(encoding="utf-8"))
        findings, size = tuple(card["findings"]), int(card["size"])
    except (ValueError, KeyError, TypeError) as error:
        raise ModelLoadError(
            f"classifier {path.name}: {card_path.name} is not like {example} ({error})."
        ) from None
    unknown = [finding for finding in findings if finding not in FINDINGS]
    if not findings or unknown or len(set(findings)) != len(findings) or not 16 <= size <= 2048:
        raise ModelLoadError(
            f"classifier {path.name}: {card_path.name} must name distinct findings of the instruction "
            f"vocabulary (unknown: {unknown or 'none'}) and a size from 16 to 2048 (got {size})."
        )
    try:
        module = torch.jit.load(str(path), map_location="cpu").eval()
    except (RuntimeError, ValueError, OSError) as error:
        raise ModelLoadError(
            f"classifier {path.name} does not load as a TorchScript module: {error}"
        ) from None

    @torch.no_grad()
    def read(films: list[np.ndarray]) -> np.ndarray:
        parts = []
        for start in range(0, len(films), 16):
            parts.append(module(resize_films(films[start : start + 16], size)).double().numpy())
        return np.concatenate(parts)

    try:
        probe = read([np.full((size, size), 0.5, np.float32), np.zeros((size, size), np.float32)])
    except Exception as error:  # noqa: BLE001 - a user's module may raise anything on the probe
        raise ModelLoadError(
            f"classifier {path.name} fails on a (2, 1, {size}, {size}) film batch: {error}"
        ) from None
    if (
        probe.shape != (2, len(findings))
        or not np.isfinite(probe).all()
        or probe.min() < 0
        or probe.max() > 1
    ):
        raise ModelLoadError(
            f"classifier {path.name} has the wrong interface: for a (2, 1, {size}, {size}) batch it "
            f"returned {tuple(probe.shape)} values in [{probe.min():.3g}, {probe.max():.3g}]; expected "
            f"(2, {len(findings)}) probabilities in [0, 1], one column per finding of {card_path.name}."
        )
    return FindingReader(
        path.stem,
        findings,
        read,
        {"name": path.stem, "kind": "torchscript", "findings": list(findings), "size": size},
    )


def load_reader(spec: str, weights_dir: str | None = None) -> FindingReader:
    """A classifier by name (``cohort-v2``, ``torchxrayvision``), set folder or TorchScript file.

    Raises
    ------
    ModelLoadError
        A file that does not load, lacks its JSON or has the wrong interface; an unknown name.
    """
    path = Path(spec)
    if path.suffix in (".pt", ".ts", ".pth"):
        if not path.is_file():
            raise ModelLoadError(f"classifier {path.name} does not exist.")
        return _torchscript_reader(path)
    return _set_reader(load_classifiers(spec, weights_dir))


@dataclasses.dataclass(frozen=True)
class Film:
    """A source film: its file, the findings present where known, its demographics where known."""

    path: Path
    present: frozenset[str] | None
    age: float | None = None
    sex: str | None = None
    race: str | None = None

    def mask(self, name: str) -> np.ndarray | None:
        masks = self.path.with_suffix(".masks.npz")
        if not masks.is_file():
            return None
        with np.load(masks) as stored:
            return stored[name].astype(bool) if name in stored.files and stored[name].any() else None

    def subgroups(self) -> list[str]:
        return subgroups(self.age, self.sex, self.race)


def _with_demographics(film: Film) -> Film:
    """A DICOM film with the age and sex its DICOM states (``instructx2x.dicom.demographics``)
    where the film has none yet (a folder's ``films.csv`` wins where it states them).

    Raises
    ------
    ImageReadError
        The file is not DICOM.
    """
    from instructx2x.dicom.demographics import read_demographics

    stated = read_demographics(film.path)
    return dataclasses.replace(
        film,
        age=stated.age if film.age is None else film.age,
        sex=stated.sex if film.sex is None else film.sex,
    )


def _masked_findings(path: Path) -> frozenset[str] | None:
    masks = path.with_suffix(".masks.npz")
    if not masks.is_file():
        return None
    with np.load(masks) as stored:
        return frozenset(name for name in stored.files if name in FINDINGS and stored[name].any())


def _cell(value) -> str | None:
    return None if value is None or (isinstance(value, float) and np.isnan(value)) else str(value)


def load_films(folder: str | None, dataset: str | None, split: str) -> list[Film]:
    """The films of a folder (with its ``films.csv`` where present; a ``.dcm`` film's age and
    sex, where ``films.csv`` does not state them, from its own DICOM) or a dataset split.

    Raises
    ------
    ParameterError
        Neither or both sources, a missing folder, or no film.
    ImageReadError
        A ``.dcm`` film that is not DICOM.
    """
    if (folder is None) == (dataset is None):
        raise ParameterError("give the films as a folder or as a dataset split (one of the two).")
    if dataset is not None:
        from .pairs import EditPairs

        pairs = EditPairs(dataset, split)
        paths = list(dict.fromkeys(pairs.paths(index)[0] for index in range(len(pairs))))
        films = [Film(path, _masked_findings(path)) for path in paths]
        where = f"split {split} of {Path(dataset).name}"
    else:
        assert folder is not None  # one of the two, checked above
        root = Path(folder)
        if not root.is_dir():
            raise ParameterError(f"films folder {root} does not exist.")
        table_path = root / FILMS_TABLE
        table = pd.read_csv(table_path, dtype=str).set_index("file") if table_path.is_file() else None
        films = []
        for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
            row = table.loc[path.name] if table is not None and path.name in table.index else {}
            listed = _cell(row.get("findings")) if "findings" in row else None
            present = (
                frozenset(name.strip() for name in (listed or "").split(";") if name.strip())
                if listed is not None or "findings" in row
                else _masked_findings(path)
            )
            age = _cell(row.get("age"))
            film = Film(
                path, present, float(age) if age else None, _cell(row.get("sex")), _cell(row.get("race"))
            )
            if path.suffix.lower() == ".dcm" and (film.age is None or film.sex is None):
                film = _with_demographics(film)
            films.append(film)
        where = f"folder {root.name}"
    if not films:
        raise ParameterError(
            f"no films in {where}: a stress test needs at least one ({', '.join(IMAGE_SUFFIXES)})."
        )
    return films


COUNTERFACTUALS = ("model", "truth")


@dataclasses.dataclass(frozen=True)
class StressConfig:
    """What a stress test runs; stored with the results and compared on resume.

    ``counterfactuals``: ``model`` edits every film with ``model`` (default ``demo``); ``truth``
    renders each ``stress-films`` phantom again with the edit (``stress_truth``) and loads no
    model, so ``model``, ``resolution`` and ``steps`` stay unset."""

    model: str | None = None
    classifiers: tuple[str, ...] = ("cohort-v2",)
    films: str | None = None
    dataset: str | None = None
    split: str = "test"
    dicomweb: CohortQuery | None = None  # the query (no credentials: stress_test takes them apart)
    edits: tuple[StressEdit, ...] = ()  # empty: default_edits of the first classifier's findings
    weights_dir: str | None = None
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    resolution: int | None = None
    steps: int | None = None
    bootstrap: int = 1000
    counterfactuals: str = "model"

    def __post_init__(self) -> None:
        if self.counterfactuals not in COUNTERFACTUALS:
            raise ParameterError(
                f"counterfactuals must be one of {', '.join(COUNTERFACTUALS)}, got {self.counterfactuals!r}."
            )
        if self.counterfactuals == "model" and self.model is None:
            object.__setattr__(self, "model", "demo")
        if self.counterfactuals == "truth":
            if self.films is None:
                raise ParameterError(
                    "--counterfactuals truth renders stress-films phantoms again: give their folder "
                    "(--films); the films of a dataset split or a DICOMweb server cannot be rendered again."
                )
            if self.model is not None or self.resolution is not None or self.steps is not None:
                raise ParameterError(
                    "--counterfactuals truth loads no model: --model, --resolution and --steps "
                    "set the editing model's counterfactuals (--counterfactuals model)."
                )
        if not self.classifiers:
            raise ParameterError("name at least one classifier.")
        if sum(source is not None for source in (self.films, self.dataset, self.dicomweb)) != 1:
            raise ParameterError(
                "give the films as a folder (--films), a dataset split (--dataset) or a DICOMweb "
                "query (--dicomweb): one of the three."
            )
        if self.limit is not None and self.limit < 1:
            raise ParameterError(f"limit must be >= 1, got {self.limit}.")
        if self.batch_size < 1 or self.bootstrap < 0:
            raise ParameterError("batch_size must be >= 1 and bootstrap >= 0.")
        if len({edit.label for edit in self.edits}) != len(self.edits):
            raise ParameterError("the stress edits must be distinct.")


def _plan(films: list[Film], edits: tuple[StressEdit, ...]) -> list[tuple[int, int]]:
    """Every (film, edit) row the edits apply to; an edit that applies to no film is refused."""
    rows = []
    for number, edit in enumerate(edits):
        mine = [
            (index, number)
            for index, film in enumerate(films)
            if edit.applies(film.present) and (edit.keep is None or film.mask(edit.keep) is not None)
        ]
        if not mine:
            need = "without" if edit.operation == "add" else "with"
            kept = f" and a non-empty {edit.keep!r} mask in its .masks.npz" if edit.keep else ""
            raise ParameterError(
                f"stress edit {edit.label!r} applies to no film: it needs a film {need} {edit.finding}{kept}."
            )
        rows += mine
    return sorted(rows)


def stress_test(
    output: str | Path,
    config: StressConfig,
    progress_bar: bool = True,
    credentials: Credentials | None = None,
) -> dict:
    """Edit, read and score every planned row; write the report.

    Settings, films (a DICOMweb query's list), edits and classifiers are checked before the
    model loads or anything is written; ``credentials`` authenticate to the DICOMweb server and
    are never recorded.

    Returns
    -------
    dict
        The content of ``stress-test.json`` (empty in a process other than the main one).
    """
    from instructx2x.editor import InstructX2XEditor

    output = Path(output)
    listed = []
    if config.dicomweb is not None:
        listed = cohort_films(config.dicomweb, credentials, output)[: config.limit]
        films = [Film(output / FETCHED / film.file_name, None) for film in listed]
    else:
        films = load_films(config.films, config.dataset, config.split)[: config.limit]
    truth = None
    if config.counterfactuals == "truth":
        assert config.films is not None  # checked by StressConfig
        truth = PhantomTruth.load(Path(config.films), [film.path.name for film in films])
        truth.check(config.edits)
    readers = [load_reader(spec, config.weights_dir) for spec in config.classifiers]
    names = [reader.name for reader in readers]
    if len(set(names)) != len(names):
        raise ParameterError(f"the classifiers need distinct names, got {names}.")
    edits = config.edits or default_edits(readers[0].findings)
    if truth is not None:
        truth.check(edits)
    plan = _plan(films, edits)
    settings = {**dataclasses.asdict(config), "edits": [dataclasses.asdict(edit) for edit in edits]}
    shard = current_shard()
    editor = None
    if truth is None:  # a bad model: nothing written
        assert config.model is not None  # demo unless named, set by StressConfig
        editor = InstructX2XEditor.from_model(config.model, device=shard.device)
    resumed = open_run_folder(output, CONFIG_NAME, settings, "stress test") if shard.is_main else True
    if listed and shard.is_main:
        assert config.dicomweb is not None  # listed only for a query
        fetch_cohort(output, listed, config.dicomweb, credentials, resumed, check_readable)
        films = [_with_demographics(film) for film in films]
    shard.wait()
    started = time.perf_counter()
    records = output / RECORDS
    mine = shard.mine(range(len(plan)))
    done = read_records(records, "rows", key="row")
    todo = [row for row in mine if row not in done]
    bar = tqdm(
        total=len(mine),
        initial=len(mine) - len(todo),
        desc="stress test",
        unit="row",
        disable=not progress_bar or not shard.is_main,
    )
    with open_record(records, "rows", shard) as sink:
        for start in range(0, len(todo), config.batch_size):
            batch = todo[start : start + config.batch_size]
            images = [read_image(films[plan[row][0]].path) for row in batch]
            row_edits = [edits[plan[row][1]] for row in batch]
            keeps = [
                None if edit.keep is None else films[plan[row][0]].mask(edit.keep)
                for row, edit in zip(batch, row_edits)
            ]
            if editor is None:
                assert truth is not None  # one of the two counterfactual sources
                edited = [
                    truth.counterfactual(
                        films[plan[row][0]].path.name, edit, image.pixels, keep, config.seed + row
                    )
                    for row, edit, image, keep in zip(batch, row_edits, images, keeps)
                ]
                fractions = [float((new != image.pixels).mean()) for new, image in zip(edited, images)]
            else:
                parameters = [
                    EditParameters(
                        instruction=edit.instruction,
                        seed=config.seed + row,
                        resolution=config.resolution,
                        num_inference_steps=config.steps,
                    )
                    for row, edit in zip(batch, row_edits)
                ]
                results = editor.edit_batch(images, parameters, keep_masks=keeps)
                edited = [result.edited_image() for result in results]
                fractions = [float(result.edit_mask.mean()) for result in results]
            before = {reader.name: reader.read([image.pixels for image in images]) for reader in readers}
            after = {reader.name: reader.read(edited) for reader in readers}
            for position, (row, fraction) in enumerate(zip(batch, fractions)):
                record = {
                    "row": row,
                    "film": films[plan[row][0]].path.name,
                    "edit": plan[row][1],
                    "edit_fraction": fraction,
                    "before": {name: values[position].tolist() for name, values in before.items()},
                    "after": {name: values[position].tolist() for name, values in after.items()},
                }
                sink.write(json.dumps(record) + "\n")
            sink.flush()
            bar.update(len(batch))
    bar.close()
    shard.wait()
    if not shard.is_main:
        return {}
    report = _assemble(
        output, films, edits, plan, readers, editor, config, resumed, time.perf_counter() - started
    )
    (output / INCOMPLETE).unlink()
    return report


def _figures(before: np.ndarray, after: np.ndarray, direction: int | None) -> dict[str, float]:
    """Mean shift, flip rate (in the instructed direction, or any flip for ``direction=None``),
    and the share of source positives still positive."""
    was, now = before >= 0.5, after >= 0.5
    if direction is None:
        flips = was != now
    else:
        flips = (~was & now) if direction > 0 else (was & ~now)
    return {
        "mean_shift": float((after - before).mean()),
        "flip_rate": float(flips.mean()),
        "still_positive": float(now[was].mean()) if was.any() else float("nan"),
    }


def _assemble(output, films, edits, plan, readers, editor, config, resumed, seconds) -> dict:
    rows = read_records(output / RECORDS, "rows", key="row")
    readings = [rows[row] for row in range(len(plan))]
    table, per_row = [], []
    for reader in readers:
        before = np.asarray([r["before"][reader.name] for r in readings])
        after = np.asarray([r["after"][reader.name] for r in readings])
        for number, edit in enumerate(edits):
            selected = [i for i, (_, e) in enumerate(plan) if e == number]
            groups: dict[str, list[int]] = {}
            for i in selected:
                for group in films[plan[i][0]].subgroups():
                    groups.setdefault(group, []).append(i)
            for k, finding in enumerate(reader.findings):
                instructed = finding == edit.finding
                for group, members in sorted(groups.items(), key=lambda item: group_order(item[0])):
                    b, a = before[members, k], after[members, k]
                    direction = edit.direction if instructed else None
                    row = {
                        "classifier": reader.name,
                        "edit": edit.label,
                        "operation": edit.operation,
                        "keep": edit.keep or "",
                        "finding": finding,
                        "role": "instructed" if instructed else "collateral",
                        "subgroup": group,
                        "films": len(members),
                        "mean_before": float(b.mean()),
                        "mean_after": float(a.mean()),
                        **_figures(b, a, direction),
                    }
                    if config.bootstrap:
                        with warnings.catch_warnings():  # no source positive: still_positive is NaN
                            warnings.simplefilter("ignore", RuntimeWarning)

                            def figures(index: np.ndarray, b=b, a=a, d=direction) -> dict:
                                return _figures(b[index], a[index], d)

                            intervals = metrics.bootstrap_intervals(
                                figures,
                                len(members),
                                resamples=config.bootstrap,
                                seed=config.seed,
                            )
                        for key, (low, high) in intervals.items():
                            row[f"{key}_low"], row[f"{key}_high"] = low, high
                    table.append(row)
        for i, (film, number) in enumerate(plan):
            per_row.append(
                {
                    "classifier": reader.name,
                    "film": films[film].path.name,
                    "edit": edits[number].label,
                    "edit_fraction": readings[i]["edit_fraction"],
                    **{f"before_{f}": before[i, k] for k, f in enumerate(reader.findings)},
                    **{f"after_{f}": after[i, k] for k, f in enumerate(reader.findings)},
                }
            )
    report = {
        "settings": {**dataclasses.asdict(config), "edits": [dataclasses.asdict(edit) for edit in edits]},
        "seed": config.seed,
        "counterfactuals": config.counterfactuals,
        "model": None if editor is None else editor.model_info.to_dict(),
        "sampling": None
        if editor is None
        else editor.sampling(
            EditParameters(instruction="-", resolution=config.resolution, num_inference_steps=config.steps)
        ),
        "classifiers": {reader.name: reader.description for reader in readers},
        "films": {"count": len(films), "source": _source(config)},
        "rows": len(plan),
        "resumed": resumed,
        "seconds": round(seconds, 1),
        "table": table,
        "verdicts": _verdicts(table),
    }
    with atomic_output_dir(output / "report") as staging:
        (staging / "stress-test.json").write_text(to_json(report) + "\n")
        (staging / "stress-test.md").write_text(stress_markdown(report))
        pd.DataFrame(table).to_csv(staging / "stress-test.csv", index=False)
        pd.DataFrame(per_row).to_csv(staging / "rows.csv", index=False)
        _plot(table, staging / "stress-test.png")
    for path in (output / "report").iterdir():
        path.replace(output / path.name)
    (output / "report").rmdir()
    return report


def _source(config: StressConfig) -> str:
    """Where the films came from: the folder's name, the dataset's split or the DICOMweb URL."""
    if config.films:
        return Path(config.films).name
    if config.dataset:
        return f"{Path(config.dataset).name}:{config.split}"
    assert config.dicomweb is not None  # one of the three, checked by StressConfig
    return config.dicomweb.url


def _verdicts(table: list[dict]) -> list[dict]:
    """For every removal with a kept region: does the classifier still call the finding?

    ``shortcut suspected`` when more than half of the films it called positive before the removal
    stay positive after it (the kept region unchanged); ``reads the finding`` otherwise;
    ``undecided`` when it called none positive before."""
    verdicts = []
    for row in table:
        if (
            row["role"] != "instructed"
            or row["operation"] != "remove"
            or not row["keep"]
            or row["subgroup"] != "all"
        ):
            continue
        still = row["still_positive"]
        verdict = (
            "undecided" if np.isnan(still) else "shortcut suspected" if still > 0.5 else "reads the finding"
        )
        verdicts.append(
            {
                "classifier": row["classifier"],
                "edit": row["edit"],
                "finding": row["finding"],
                "keep": row["keep"],
                "still_positive": None if np.isnan(still) else still,
                "mean_shift": row["mean_shift"],
                "verdict": verdict,
            }
        )
    return verdicts


def _interval(row: dict, key: str, digits: int = 2) -> str:
    value = row[key]
    if value is None or not np.isfinite(value):
        return "-"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    text = f"{value:+.{digits}f}" if key == "mean_shift" else f"{value:.{digits}f}"
    return f"{text} [{low:.{digits}f}, {high:.{digits}f}]" if low is not None and np.isfinite(low) else text


def stress_markdown(report: dict) -> str:
    """The instructed responses, what should not move, the kept-region verdicts and subgroups."""
    table = report["table"]
    source = (
        "True counterfactuals: each film's phantom rendered again with the edit (no model)"
        if report["counterfactuals"] == "truth"
        else f"Model {report['model']['name']} (sha256 {report['model']['sha256'][:12]})"
    )
    lines = [
        f"{source}; {report['films']['count']} films from {report['films']['source']}, {report['rows']} edited rows; "
        f"classifiers {', '.join(report['classifiers'])}; seed {report['seed']}; "
        f"{report['settings']['bootstrap']} bootstrap resamples for the 95 % intervals; "
        f"{report['seconds']:.0f} s to {'render' if report['counterfactuals'] == 'truth' else 'edit'} and read.",
        "",
        "## Response to the instructed change",
        "",
        "Mean probability shift (after - before), the share of films whose decision flips the "
        "instructed way, and the share of films called positive before that stay positive.",
        "",
        "| classifier | edit | finding | films | before | after | shift | flip rate | still positive |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in table:
        if row["role"] == "instructed" and row["subgroup"] == "all":
            lines.append(
                f"| {row['classifier']} | {row['edit']} | {row['finding']} | {row['films']} | "
                f"{row['mean_before']:.2f} | {row['mean_after']:.2f} | {_interval(row, 'mean_shift')} | "
                f"{_interval(row, 'flip_rate')} | {_interval(row, 'still_positive')} |"
            )
    lines += [
        "",
        "## Response to changes it should ignore",
        "",
        "Findings the edit does not name (collateral: each should stay where it was; for a "
        "finding, these are the edits outside its region).",
        "",
        "| classifier | edit | finding | shift | flip rate |",
        "|---|---|---|---|---|",
    ]
    for row in table:
        if row["role"] == "collateral" and row["subgroup"] == "all":
            lines.append(
                f"| {row['classifier']} | {row['edit']} | {row['finding']} | {_interval(row, 'mean_shift')} | "
                f"{_interval(row, 'flip_rate')} |"
            )
    lines += ["", "## Kept regions", ""]
    if report["verdicts"]:
        lines += [
            "A removal with a region kept unchanged: a classifier that still calls the finding on "
            "most films reads the kept region (or the edit failed to remove the finding: compare "
            "with a classifier known to read the finding).",
            "",
            "| classifier | edit | still positive | shift | verdict |",
            "|---|---|---|---|---|",
        ]
        for verdict in report["verdicts"]:
            still = verdict["still_positive"]
            lines.append(
                f"| {verdict['classifier']} | {verdict['edit']} | "
                f"{'-' if still is None or np.isnan(still) else f'{still:.2f}'} | "
                f"{verdict['mean_shift']:+.2f} | {verdict['verdict']} |"
            )
    else:
        lines.append("No removal with a kept region was declared.")
    subgroup_rows = [row for row in table if row["role"] == "instructed" and row["subgroup"] != "all"]
    if subgroup_rows:
        lines += [
            "",
            "## Subgroups (instructed change)",
            "",
            "| classifier | edit | subgroup | films | shift | flip rate |",
            "|---|---|---|---|---|---|",
        ]
        for row in subgroup_rows:
            lines.append(
                f"| {row['classifier']} | {row['edit']} | {row['subgroup']} | {row['films']} | "
                f"{_interval(row, 'mean_shift')} | {_interval(row, 'flip_rate')} |"
            )
    return "\n".join(lines) + "\n"


def _plot(table: list[dict], path: Path) -> None:
    """The instructed finding's mean shift per edit, one bar per classifier, with intervals."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    rows = [row for row in table if row["role"] == "instructed" and row["subgroup"] == "all"]
    edits = list(dict.fromkeys(row["edit"] for row in rows))
    classifiers = list(dict.fromkeys(row["classifier"] for row in rows))
    figure, axis = pyplot.subplots(figsize=(max(5.0, 1.3 * len(edits) * len(classifiers) ** 0.5), 3.8))
    width = 0.8 / len(classifiers)
    for c, name in enumerate(classifiers):
        mine = {row["edit"]: row for row in rows if row["classifier"] == name}
        x = [e + c * width for e, edit in enumerate(edits) if edit in mine]
        values = [mine[edit]["mean_shift"] for edit in edits if edit in mine]
        low = [
            mine[edit].get("mean_shift_low", v) for edit, v in zip([e for e in edits if e in mine], values)
        ]
        high = [
            mine[edit].get("mean_shift_high", v) for edit, v in zip([e for e in edits if e in mine], values)
        ]
        errors = np.abs(np.array([np.subtract(values, low), np.subtract(high, values)]))
        axis.bar(x, values, width, yerr=errors, capsize=3, label=name)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks([e + width * (len(classifiers) - 1) / 2 for e in range(len(edits))])
    axis.set_xticklabels(
        [edit.replace(" (keep", "\n(keep") for edit in edits], fontsize=7, rotation=20, ha="right"
    )
    axis.set_ylabel("mean shift of the instructed finding")
    axis.set_ylim(-1.05, 1.05)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)


def write_stress_films(
    output: str | Path,
    count: int,
    seed: int,
    resolution: int = 128,
    finding_probability: float = 0.35,
    devices: DeviceDraw = DRAIN_WITH_PNEUMOTHORAX,
    workers: int = 1,
) -> dict:
    """Phantom films with devices, ready for ``stress-test``: 8-bit PNGs, a ``films.csv`` with
    each film's age, sex, race, findings and devices, a ``<stem>.masks.npz`` with each device's
    mask (the keep regions), and ``phantoms.json`` with each film's phantom (what
    ``--counterfactuals truth`` renders again). Written atomically.

    Raises
    ------
    OutputExistsError
        When ``output`` exists (checked before any work).
    """
    from PIL import Image

    output = Path(output)
    if output.exists():
        raise OutputExistsError(f"output folder {output.name} already exists; choose a new one.")
    if count < 1:
        raise ParameterError(f"count must be >= 1, got {count}.")
    films, labels = draw_films(
        count, resolution, seed, finding_probability, workers, devices=devices, with_masks=True
    )
    table: list[dict[str, str | int]] = []
    files: list[str] = []
    with atomic_output_dir(output) as staging:
        for index, (film, label) in enumerate(zip(films, labels)):
            stem = f"{seed:04d}-{index:05d}"
            Image.fromarray(np.round(np.clip(film, 0, 1) * 255).astype(np.uint8)).save(
                staging / f"{stem}.png"
            )
            np.savez_compressed(staging / f"{stem}.masks.npz", **label["device_masks"])
            files.append(f"{stem}.png")
            table.append(
                {
                    "file": f"{stem}.png",
                    "age": int(label["age"]),
                    "sex": "F" if label["sex_female"] else "M",
                    "race": RACES[label["race"]],
                    "findings": ";".join(finding.name for finding in label["present"]),
                    "sides": ";".join(f"{finding.name}:{finding.side}" for finding in label["present"]),
                    "devices": ";".join(label["devices"]),
                }
            )
        pd.DataFrame(table).to_csv(staging / FILMS_TABLE, index=False)
        manifest = phantoms_manifest(seed, resolution, finding_probability, devices, files)
        (staging / PHANTOMS_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    frame = pd.DataFrame(table)
    return {
        "films": count,
        "with pneumothorax": int(frame.findings.str.contains("pneumothorax").sum()),
        "with chest drain": int(frame.devices.str.contains("chest drain").sum()),
    }
