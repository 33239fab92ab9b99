"""``instructx2x-train evaluate``: the paper's Tables 1-2 (CMIG, KL, FID and the ablation) on a
MIMIC-EDIT-INSTRUCTION split (docs/method.md section 7; docs/evaluation.md has every definition),
or the part of them that needs no ground truth on the radiographs a DICOMweb query matches.

For every test pair and region mode the counterfactual comes from the inference library's
editor (batched); a classifier set (``instructx2x.classifiers``) then reads the source, the
real target and the counterfactual. Each pair's readings are appended to a JSON-lines record
as soon as they exist, so an interrupted run resumes where it stopped (same folder, same
settings); under ``accelerate launch`` every process takes its share of the pairs and the
main process assembles the tables. Until the tables are written the folder holds an
``INCOMPLETE`` marker.

The expected labels of an edit are the source's labels changed as the instruction says; the
source's labels are its ground truth where the dataset carries it (a ``.masks.npz`` beside the
image names the findings present, as in the synthetic cohort and pure pairs), otherwise the
classifier's own decisions on the source film.

A DICOMweb cohort (``EvaluationConfig.dicomweb``) has films but no pairs: each film is edited
with each of the given instructions, and its source labels are the classifier's. It has no true
counterfactual, so the figures measured against one (the real-image row, KL and FID) are not
computed and the report says so (``NOT_MEASURED``); pathology accuracy, race and age
preservation and CMIG read the edits alone, also per subgroup (the age band and sex each film's
DICOM states: ``instructx2x.dicom.demographics``). The films are listed (QIDO-RS) before the
model loads, fetched (WADO-RS) into ``OUTPUT/films/`` and read once before any edit (a resumed
run takes the films of ``OUTPUT/cohort.json``); with ``store`` every edit's DICOM objects
(counterfactual, overlay, SEG) are also written to ``OUTPUT/dicom/`` and stored back with
STOW-RS into the film's own study. Credentials are an argument of ``evaluate``, never recorded.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from instructx2x import read_image
from instructx2x.backends import BACKENDS, check_backend
from instructx2x.classifiers import (
    FINDING_TO_PATHOLOGY,
    PATHOLOGIES,
    ClassifierSet,
    Predictions,
    load_classifiers,
)
from instructx2x.dicom.dicomweb import CohortQuery, Credentials, cohort_films
from instructx2x.errors import OutputExistsError, PacsError, ParameterError
from instructx2x.instructions import parse_instruction
from instructx2x.parameters import EditParameters, RegionMode
from instructx2x.provenance import to_json
from instructx2x.sharding import (
    INCOMPLETE,
    RECORDS,
    current_shard,
    open_record,
    open_run_folder,
    read_records,
)
from instructx2x.verification import expected_labels

from . import metrics
from .dicomweb_films import FETCHED, check_readable, fetch_cohort
from .subgroups import group_order, subgroups

__all__ = ["EvaluationConfig", "evaluate", "MODES", "REAL_ROW", "NOT_MEASURED", "summarise"]

# the region modes in the order of the paper's Table 2
MODES = ("none", "relevance", "prior", "rse")
assert set(MODES) == {mode.value for mode in RegionMode}
REAL_ROW = "real images"
CONFIG_NAME = "evaluation-config.json"
STORED = "dicom"  # a DICOMweb cohort's edits as DICOM objects, one folder per pair and mode
# what a DICOMweb cohort's report leaves out, and why
NOT_MEASURED = {
    REAL_ROW: "needs the true counterfactual of each film",
    "kl": "compares the edits' label distribution with the true counterfactuals'",
    "fid": "compares the edits' features with the true counterfactuals'",
}
# the paper's names for the region modes (Table 2)
MODE_LABELS = {
    "none": "none",
    "relevance": "relevance map only",
    "prior": "pseudo mask only",
    "rse": "relevance map + pseudo mask (RSE)",
}


@dataclasses.dataclass(frozen=True)
class EvaluationConfig:
    """What an evaluation measures; stored with the results and compared on resume."""

    model: str
    dataset: str | None = None
    split: str = "test"
    dicomweb: CohortQuery | None = None  # the query (no credentials: evaluate takes them apart)
    instructions: tuple[str, ...] = ()  # a DICOMweb cohort's: each film is edited with each
    store: bool = False  # a DICOMweb cohort's edits stored back with STOW-RS
    modes: tuple[str, ...] = MODES
    classifiers: str = "cohort-v2"
    weights_dir: str | None = None
    limit: int | None = None
    batch_size: int = 4
    seed: int = 0
    resolution: int | None = None
    steps: int | None = None
    bootstrap: int = 1000
    backend: str = "auto"  # what runs the networks (instructx2x.backends): auto, torch or openvino

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ParameterError(f"unknown backend {self.backend!r}; choose {', '.join(BACKENDS)}.")
        if (self.dataset is None) == (self.dicomweb is None):
            raise ParameterError(
                "give the pairs as a dataset split (--dataset) or a DICOMweb query (--dicomweb): "
                "one of the two."
            )
        if self.dicomweb is not None and not self.instructions:
            raise ParameterError(
                "a DICOMweb film carries no instruction: give one or more with --instruction."
            )
        if self.dataset is not None and (self.instructions or self.store):
            raise ParameterError(
                "--instruction and --dicomweb-store are for a DICOMweb cohort; a dataset's pairs "
                "carry their own instructions."
            )
        if len(set(self.instructions)) != len(self.instructions):
            raise ParameterError("the instructions must be distinct.")
        for instruction in self.instructions:
            parse_instruction(instruction)
        unknown = [mode for mode in self.modes if mode not in MODES]
        if unknown or not self.modes or len(set(self.modes)) != len(self.modes):
            raise ParameterError(f"modes must be distinct names from {list(MODES)}, got {list(self.modes)}.")
        if self.limit is not None and self.limit < 2:
            raise ParameterError(f"limit must be >= 2 (correlations need two pairs), got {self.limit}.")
        if self.batch_size < 1 or self.bootstrap < 0:
            raise ParameterError("batch_size must be >= 1 and bootstrap >= 0.")


def _record(predictions: Predictions, row: int) -> dict:
    return {
        "findings": predictions.findings[row].tolist(),
        "age": float(predictions.age[row]),
        "race": predictions.race[row].tolist(),
        "features": predictions.features[row].tolist(),
        "sex_female": None if predictions.sex_female is None else float(predictions.sex_female[row]),
    }


def _read_records(folder: Path, name: str) -> dict[int, dict]:
    return read_records(folder, name, key="pair")


@dataclasses.dataclass(frozen=True)
class _Pairs:
    """What an evaluation edits: per pair its source film, its true counterfactual (none for a
    DICOMweb cohort), its instruction and its id (the dataset's past image, or the film's
    SOPInstanceUID)."""

    sources: list[Path]
    targets: list[Path] | None
    instructions: list[str]
    ids: list[str]

    def __len__(self) -> int:
        return len(self.sources)


def _dataset_pairs(dataset: str, split: str, limit: int | None) -> _Pairs:
    from .pairs import EditPairs

    pairs = EditPairs(dataset, split)
    count = len(pairs) if limit is None else min(limit, len(pairs))
    paths = [pairs.paths(index) for index in range(count)]
    table = pairs.table.iloc[:count]
    return _Pairs(
        [past for past, _ in paths],
        [current for _, current in paths],
        list(table.instruction),
        list(table.past_dicom_id),
    )


def _cohort_pairs(output: Path, films: list, instructions: tuple[str, ...], limit: int | None) -> _Pairs:
    """Each film with each instruction, film by film; the first ``limit`` pairs."""
    pairs = [(film, instruction) for film in films for instruction in instructions][:limit]
    return _Pairs(
        [output / FETCHED / film.file_name for film, _ in pairs],
        None,
        [instruction for _, instruction in pairs],
        [film.instance for film, _ in pairs],
    )


def _source_labels(pairs: _Pairs, index: int, classifier_decisions: np.ndarray) -> tuple[dict, str]:
    """The source's labels: its ``.masks.npz`` when present (ground truth), else the classifier's."""
    masks = pairs.sources[index].with_suffix(".masks.npz")
    if masks.is_file():
        with np.load(masks) as stored:
            # the .masks.npz keys are finding names of the instruction vocabulary
            present = {
                FINDING_TO_PATHOLOGY[name]
                for name in stored.files
                if name in FINDING_TO_PATHOLOGY and stored[name].any()
            }
        return {name: name in present for name in PATHOLOGIES}, "truth"
    return dict(zip(PATHOLOGIES, classifier_decisions.tolist())), "classifier"


def evaluate(
    output: str | Path,
    config: EvaluationConfig,
    progress_bar: bool = True,
    credentials: Credentials | None = None,
) -> dict:
    """Generate, classify and score every pair of the split (or every film of a DICOMweb
    cohort with every instruction); write the tables and the plot.

    Everything that can be refused (settings, the backend, dataset or DICOMweb query, classifier
    weights, an existing folder) is checked before the model loads or anything is written; ``credentials``
    authenticate to the DICOMweb server and are never recorded.

    Returns
    -------
    dict
        The content of ``evaluation.json`` (settings, identities, the table rows); empty in a
        process other than the main one.
    """
    from instructx2x.editor import InstructX2XEditor

    output = Path(output)
    shard = current_shard()
    check_backend(config.backend, shard.device)  # the OpenVINO package and cache, before any work
    listed = []
    if config.dicomweb is not None:
        listed = cohort_films(config.dicomweb, credentials, output)
        pairs = _cohort_pairs(output, listed, config.instructions, config.limit)
        where = (
            f"the DICOMweb query matched {len(listed)} film(s): {len(pairs)} pair(s) with "
            f"{len(config.instructions)} instruction(s)"
        )
        listed = listed[: -(-len(pairs) // len(config.instructions))]  # the films the pairs edit
    else:
        assert config.dataset is not None  # one of the two, checked by EvaluationConfig
        pairs = _dataset_pairs(config.dataset, config.split, config.limit)
        where = f"the {config.split} split has {len(pairs)} pair(s)"
    count = len(pairs)
    if count < 2:
        raise ParameterError(f"{where}; an evaluation needs at least 2 pairs.")
    classifiers = load_classifiers(config.classifiers, config.weights_dir)
    editor = InstructX2XEditor.from_model(  # a bad model: nothing written
        config.model, device=shard.device, backend=config.backend
    )
    resumed = (
        open_run_folder(output, CONFIG_NAME, dataclasses.asdict(config), "evaluation")
        if shard.is_main
        else True
    )
    if shard.is_main:
        _check_model_identity(output, editor.model_info.sha256)
        if listed:
            assert config.dicomweb is not None  # listed only for a query
            fetch_cohort(
                output,
                listed,
                config.dicomweb,
                credentials,
                resumed,
                _check_exportable if config.store else check_readable,
            )
    shard.wait()
    started = time.perf_counter()
    records = output / RECORDS
    mine = shard.mine(range(count))
    bar = tqdm(
        total=len(mine) * (1 + len(config.modes)),
        desc="evaluation",
        unit="pair-mode",
        disable=not progress_bar or not shard.is_main,
    )
    with open_record(records, "real", shard) as sink:
        _classify_real(pairs, mine, classifiers, sink, _read_records(records, "real"), bar)
    store = _store_edit(output, config.dicomweb, credentials) if config.store else None
    for mode in config.modes:
        done = _read_records(records, mode)
        todo = [index for index in mine if index not in done]
        bar.update(len(mine) - len(todo))
        with open_record(records, mode, shard) as sink:
            for start in range(0, len(todo), config.batch_size):
                batch = todo[start : start + config.batch_size]
                images = [read_image(pairs.sources[index]) for index in batch]
                parameters = [
                    EditParameters(
                        instruction=pairs.instructions[index],
                        region_mode=mode,
                        seed=config.seed + index,
                        resolution=config.resolution,
                        num_inference_steps=config.steps,
                    )
                    for index in batch
                ]
                results = editor.edit_batch(images, parameters)
                predicted = classifiers.predict([result.edited_image() for result in results])
                for row, (index, image, result) in enumerate(zip(batch, images, results)):
                    stored = {} if store is None else {"stored": store(f"{index:04d}-{mode}", image, result)}
                    sink.write(
                        json.dumps(
                            {
                                "pair": index,
                                "edit_fraction": float(result.edit_mask.mean()),
                                **_record(predicted, row),
                                **stored,
                            }
                        )
                        + "\n"
                    )
                sink.flush()
                bar.update(len(batch))
    bar.close()
    shard.wait()
    if not shard.is_main:
        return {}
    report = _assemble(
        output,
        pairs,
        count,
        classifiers,
        editor,
        config,
        resumed,
        time.perf_counter() - started,
        progress_bar,
    )
    (output / INCOMPLETE).unlink()
    return report


def _check_exportable(films: list[Path]) -> None:
    """Every fetched film reads as a radiograph whose edit's DICOM objects can be built."""
    from instructx2x.dicom.write import check_exportable

    for path in films:
        image = read_image(path)
        check_exportable(image.dicom_source().dataset, path.name)


def _store_edit(output: Path, query: CohortQuery | None, credentials: Credentials | None):
    """A function that writes one edit's DICOM objects to ``output/dicom/<name>/`` (atomically; a
    folder left by an interrupted run is replaced) and stores them with STOW-RS into the
    film's own study; it returns how many objects were stored."""
    from instructx2x.dicom.dicomweb import store_folder
    from instructx2x.dicom.export import write_dicom_edit
    from instructx2x.outputs import atomic_output_dir

    assert query is not None  # store only for a query, checked by EvaluationConfig

    def store(name: str, image, result) -> int:
        folder = output / STORED / name
        if folder.exists():  # written, then interrupted before its record: edited again
            shutil.rmtree(folder)
        with atomic_output_dir(folder) as staging:
            write_dicom_edit(staging, image, result)
        try:
            return store_folder(folder, query.url, credentials)
        except PacsError as error:
            raise PacsError(
                f"{STORED}/{name} written but not stored ({error}); the edits before it are kept: "
                "rerun the same command to resume."
            ) from None

    return store


def _check_model_identity(output: Path, sha256: str) -> None:
    """A resumed run must edit with the same weights, not merely a model of the same name."""
    stored = output / "model-sha256.txt"
    if stored.is_file() and stored.read_text().strip() != sha256:
        raise OutputExistsError(
            f"output folder {output.name} was started with other model weights; choose a new folder."
        )
    stored.write_text(sha256 + "\n")


def _classify_real(pairs: _Pairs, mine: list[int], classifiers: ClassifierSet, sink, done: dict, bar) -> None:
    """Source and real target readings (the same for every mode); the source alone where there
    is no true counterfactual."""
    todo = [index for index in mine if index not in done]
    bar.update(len(mine) - len(todo))
    per_pair = 1 if pairs.targets is None else 2
    for start in range(0, len(todo), 16):
        batch = todo[start : start + 16]
        paths = [
            path
            for index in batch
            for path in (pairs.sources[index], *([] if pairs.targets is None else [pairs.targets[index]]))
        ]
        predicted = classifiers.predict([read_image(path).pixels for path in paths])
        for row, index in enumerate(batch):
            readings = {"pair": index, "source": _record(predicted, per_pair * row)}
            if pairs.targets is not None:
                readings["target"] = _record(predicted, per_pair * row + 1)
            sink.write(json.dumps(readings) + "\n")
        sink.flush()
        bar.update(len(batch))


def _stack(records: list[dict]) -> dict[str, np.ndarray]:
    return {
        key: np.asarray([r[key] for r in records], dtype=np.float64)
        for key in ("findings", "age", "race", "features")
    }


def summarise(
    source: dict,
    target: dict | None,
    generated: dict | None,
    expected: np.ndarray,
    instructed: np.ndarray,
    resamples: int = 1000,
    seed: int = 0,
) -> dict:
    """One table row: pathology accuracy, race and age preservation, CMIG (and for generated
    images KL and FID against the real targets), each with a bootstrap 95 % interval; and the
    accuracy on the instructed pathologies alone (``instructed``: ``(N, 5)`` bool), which the
    other four, mostly unchanged, labels do not dilute.

    ``source``/``target``/``generated`` hold stacked readings (``findings``, ``age``, ``race``,
    ``features``); the real-image row passes ``generated=None`` and scores the targets; without
    true counterfactuals (``target=None``) there is no KL or FID.
    """
    scored = generated if generated is not None else target
    assert scored is not None  # the targets, the generated images or both

    def figures(index: np.ndarray) -> dict[str, float]:
        index = np.asarray(index, dtype=int)
        accuracy = metrics.pathology_accuracy(scored["findings"][index] >= 0.5, expected[index])
        race = float((scored["race"][index].argmax(-1) == source["race"][index].argmax(-1)).mean() * 100)
        try:
            age = 100 * metrics.pearson(source["age"][index], scored["age"][index])
        except ValueError:  # a resample with a constant series
            age = float("nan")
        out = {
            "pathology_accuracy": accuracy,
            "race_preservation": race,
            "age_preservation": age,
            "cmig": metrics.cmig(accuracy, race, age) if np.isfinite(age) else float("nan"),
        }
        if generated is not None and target is not None:
            out["kl"] = metrics.label_kl(
                target["findings"][index] >= 0.5, generated["findings"][index] >= 0.5
            )
            try:
                out["fid"] = metrics.frechet_distance(target["features"][index], generated["features"][index])
            except ValueError:
                out["fid"] = float("nan")
        return out

    everything = np.arange(len(expected))
    row: dict[str, Any] = dict(figures(everything))
    correct = (scored["findings"] >= 0.5) == expected
    row["per_pathology_accuracy"] = dict(zip(PATHOLOGIES, (correct.mean(axis=0) * 100).tolist()))
    row["instructed_accuracy"] = float(correct[instructed].mean() * 100) if instructed.any() else float("nan")
    if resamples:
        row["interval_95"] = {
            key: list(bounds)
            for key, bounds in metrics.bootstrap_intervals(
                figures, len(everything), resamples=resamples, seed=seed
            ).items()
        }
    return row


def _assemble(
    output: Path,
    pairs: _Pairs,
    count: int,
    classifiers: ClassifierSet,
    editor,
    config: EvaluationConfig,
    resumed: bool,
    seconds: float,
    progress_bar: bool,
) -> dict:
    records = output / RECORDS
    real = _read_records(records, "real")
    source = _stack([real[i]["source"] for i in range(count)])
    target = None if pairs.targets is None else _stack([real[i]["target"] for i in range(count)])
    labels, label_sources = zip(
        *(_source_labels(pairs, i, source["findings"][i] >= 0.5) for i in range(count))
    )
    instructions = pairs.instructions
    expected = np.asarray(
        [[expected_labels(labels[i], instructions[i])[name] for name in PATHOLOGIES] for i in range(count)]
    )
    named = [{FINDING_TO_PATHOLOGY.get(f) for f in parse_instruction(text).findings} for text in instructions]
    instructed = np.asarray([[name in names for name in PATHOLOGIES] for names in named])
    bar = tqdm(
        total=(target is not None) + len(config.modes),
        desc="tables (bootstrap)",
        unit="row",
        disable=not progress_bar,
    )
    rows = {}
    if target is not None:
        rows[REAL_ROW] = summarise(source, target, None, expected, instructed, config.bootstrap, config.seed)
        bar.update()
    per_pair = []
    stored = 0
    groups = _film_subgroups(pairs) if config.dicomweb is not None else {}
    by_group: dict[str, dict] = {}
    for mode in config.modes:
        generated = _read_records(records, mode)
        edited = _stack([generated[i] for i in range(count)])
        rows[mode] = summarise(source, target, edited, expected, instructed, config.bootstrap, config.seed)
        by_group[mode] = {}
        for group, members in groups.items():
            index = np.asarray(members)
            with warnings.catch_warnings():  # a small subgroup: age and CMIG may be undefined (NaN)
                warnings.simplefilter("ignore", RuntimeWarning)
                summary = summarise(
                    _subset(source, index),
                    None,
                    _subset(edited, index),
                    expected[index],
                    instructed[index],
                    config.bootstrap,
                    config.seed,
                )
            by_group[mode][group] = {"pairs": len(members), **summary}
        rows[mode]["mean_edit_fraction"] = float(
            np.mean([generated[i]["edit_fraction"] for i in range(count)])
        )
        stored += sum(generated[i].get("stored", 0) for i in range(count))
        for i in range(count):
            per_pair.append(
                {
                    "pair": i,
                    "pair_id": pairs.ids[i],
                    "mode": mode,
                    "instruction": instructions[i],
                    **{f"expected_{name}": bool(expected[i, k]) for k, name in enumerate(PATHOLOGIES)},
                    **{f"p_{name}": generated[i]["findings"][k] for k, name in enumerate(PATHOLOGIES)},
                    "age_source": source["age"][i],
                    "age_edited": generated[i]["age"],
                    "edit_fraction": generated[i]["edit_fraction"],
                }
            )
        bar.update()
    bar.close()
    report = {
        "settings": dataclasses.asdict(config),
        "model": editor.model_info.to_dict(),
        "sampling": editor.sampling(
            EditParameters(instruction="-", resolution=config.resolution, num_inference_steps=config.steps)
        ),
        "backend": editor.backend_info,
        "classifiers": classifiers.describe(),
        "source_labels": {kind: label_sources.count(kind) for kind in ("truth", "classifier")},
        "resumed": resumed,
        "seconds": round(seconds, 1),
        "rows": rows,
    }
    if config.dicomweb is None:
        assert config.dataset is not None  # one of the two, checked by EvaluationConfig
        report["dataset"] = {"folder": Path(config.dataset).name, "split": config.split, "pairs": count}
    else:
        report["dicomweb"] = {
            "url": config.dicomweb.url,
            "films": len(dict.fromkeys(pairs.ids)),
            "instructions": len(config.instructions),
            "pairs": count,
            "stored": stored if config.store else None,
        }
        report["not_measured"] = NOT_MEASURED
        report["subgroups"] = by_group
    (output / "evaluation.json").write_text(to_json(report) + "\n")
    (output / "evaluation.md").write_text(evaluation_markdown(report))
    _table_frame(rows).to_csv(output / "metrics.csv", index=False)
    pd.DataFrame(per_pair).to_csv(output / "pairs.csv", index=False)
    _plot(rows, output / "ablation.png")
    return report


def _film_subgroups(pairs: _Pairs) -> dict[str, list[int]]:
    """The pairs of each subgroup but "all" (age band, sex) that the DICOM films state, in
    ``group_order``; a film that states neither is in none."""
    from instructx2x.dicom.demographics import read_demographics

    stated = {path: read_demographics(path) for path in dict.fromkeys(pairs.sources)}
    groups: dict[str, list[int]] = {}
    for index, path in enumerate(pairs.sources):
        for group in subgroups(stated[path].age, stated[path].sex, None)[1:]:
            groups.setdefault(group, []).append(index)
    return dict(sorted(groups.items(), key=lambda item: group_order(item[0])))


def _subset(stacked: dict[str, np.ndarray], index: np.ndarray) -> dict[str, np.ndarray]:
    return {key: values[index] for key, values in stacked.items()}


def _table_frame(rows: dict) -> pd.DataFrame:
    columns = (
        "pathology_accuracy",
        "race_preservation",
        "age_preservation",
        "cmig",
        "kl",
        "fid",
        "instructed_accuracy",
    )
    table = []
    for name, row in rows.items():
        entry = {"row": name}
        for key in columns:
            entry[key] = row.get(key, float("nan"))
            low, high = row.get("interval_95", {}).get(key, (float("nan"), float("nan")))
            entry[f"{key}_low"], entry[f"{key}_high"] = low, high
        table.append(entry)
    return pd.DataFrame(table)


def _sampling(sampling: dict) -> str:
    draws = sampling["relevance_draws"]
    return (
        f"{sampling['num_inference_steps']} steps, guidance s_T {sampling['guidance_scale']:g} / "
        f"s_I {sampling['image_guidance_scale']:g}, relevance map of {draws} noise draw{'s' * (draws > 1)}, "
        f"{sampling['resolution']} px"
    )


def _runtime(backend: dict) -> str:
    """The networks' runtime where it is not torch (the default): OpenVINO and its release
    (its version less the build: 2026.4.1)."""
    if backend["name"] != "openvino":
        return ""
    return f"networks run by OpenVINO {backend['openvino'].split('-')[0]}; "


def evaluation_markdown(report: dict) -> str:
    """Tables 1-2 in the paper's layout, with 95 % intervals."""

    def cell(row: dict, key: str, digits: int = 2) -> str:
        if key not in row or not np.isfinite(row[key]):
            return "-"
        interval = row.get("interval_95", {}).get(key)
        text = f"{row[key]:.{digits}f}"
        return f"{text} [{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else text

    settings, rows = report["settings"], report["rows"]
    if "dataset" in report:
        pairs = (
            f"{report['dataset']['pairs']} pairs (split {report['dataset']['split']} of dataset "
            f"`{report['dataset']['folder']}`)"
        )
    else:
        cohort = report["dicomweb"]
        stored = "" if cohort["stored"] is None else f", {cohort['stored']} DICOM objects stored back"
        pairs = (
            f"{cohort['pairs']} pairs ({cohort['films']} films of DICOMweb server {cohort['url']} x "
            f"{cohort['instructions']} instructions{stored})"
        )
    lines = [
        f"Model {report['model']['name']} (sha256 {report['model']['sha256'][:12]}), "
        f"{pairs}; classifiers: {report['classifiers']['name']} "
        f"({report['classifiers']['caveat']}); source labels: {report['source_labels']['truth']} from "
        f"ground truth, {report['source_labels']['classifier']} from the classifier; "
        f"seed {settings['seed']}; {_sampling(report['sampling'])}; {_runtime(report['backend'])}"
        f"{report['seconds']:.0f} s to edit and classify.",
        "",
        "| region mode | pathology acc. (%) | race (%) | age (r x100) | CMIG | KL | FID |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        label = MODE_LABELS.get(name, name)
        lines.append(
            f"| {label} | {cell(row, 'pathology_accuracy')} | {cell(row, 'race_preservation')} | "
            f"{cell(row, 'age_preservation')} | {cell(row, 'cmig')} | {cell(row, 'kl')} | "
            f"{cell(row, 'fid')} |"
        )
    if "not_measured" in report:
        lines += [
            "",
            "Not measured on DICOMweb films, which have no true counterfactual: "
            + "; ".join(f"{name} ({why})" for name, why in report["not_measured"].items())
            + ". The source labels are the classifier's readings of each film.",
        ]
    if "subgroups" in report:
        lines += ["", "By subgroup (age band and sex as each film's DICOM attributes state them):", ""]
        if any(report["subgroups"].values()):
            lines += [
                "| region mode | subgroup | pairs | pathology acc. (%) | instructed acc. (%) | race (%) "
                "| age (r x100) | CMIG |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for name, groups in report["subgroups"].items():
                for group, row in groups.items():
                    lines.append(
                        f"| {MODE_LABELS.get(name, name)} | {group} | {row['pairs']} | "
                        f"{cell(row, 'pathology_accuracy')} | {cell(row, 'instructed_accuracy', 1)} | "
                        f"{cell(row, 'race_preservation')} | {cell(row, 'age_preservation')} | "
                        f"{cell(row, 'cmig')} |"
                    )
        else:
            lines.append("No film states its age or sex.")
    lines += [
        "",
        "Accuracy (%) per pathology, on the instructed pathologies alone, and the mean edit area:",
        "",
        "| region mode | " + " | ".join(PATHOLOGIES) + " | instructed | edit area |",
        "|---|" + "---|" * (len(PATHOLOGIES) + 2),
    ]
    for name, row in rows.items():
        area = f"{100 * row['mean_edit_fraction']:.1f} %" if "mean_edit_fraction" in row else "-"
        lines.append(
            f"| {MODE_LABELS.get(name, name)} | "
            + " | ".join(f"{row['per_pathology_accuracy'][p]:.1f}" for p in PATHOLOGIES)
            + f" | {row['instructed_accuracy']:.1f} | {area} |"
        )
    return "\n".join(lines) + "\n"


def _plot(rows: dict, path: Path) -> None:
    """CMIG, KL and FID per region mode with their intervals; the real-image CMIG as a line.
    Without true counterfactuals (no real-image row): CMIG alone."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    modes = [name for name in rows if name != REAL_ROW]
    panels = [("cmig", "CMIG (higher is better)")] + [
        ("kl", "KL x100 (lower is better)"),
        ("fid", "FID (lower is better)"),
    ] * (REAL_ROW in rows)
    figure, axes = pyplot.subplots(1, len(panels), figsize=(11 * len(panels) / 3 + 0.5, 3.4), squeeze=False)
    for axis, (key, title) in zip(axes[0], panels):
        values = [rows[m][key] for m in modes]
        intervals = [rows[m].get("interval_95", {}).get(key, (v, v)) for m, v in zip(modes, values)]
        errors = np.abs(np.array([[v - low, high - v] for v, (low, high) in zip(values, intervals)]).T)
        axis.bar(range(len(modes)), values, yerr=errors, capsize=4, color="#4a7db5")
        axis.set_xticks(range(len(modes)), modes)
        axis.set_title(title)
        if key == "cmig":
            lows = [low for low, _ in intervals if np.isfinite(low)]
            axis.set_ylim(max(0.0, min(lows, default=5.0) - 5), 100)
            if REAL_ROW in rows:
                axis.axhline(rows[REAL_ROW]["cmig"], color="black", linestyle="--", label="real images")
                axis.legend(loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
