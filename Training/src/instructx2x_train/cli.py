"""``instructx2x-train``: build the training data (synthetic cohort, dataset, pseudo masks)
and fine-tune (``train``)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from instructx2x.backends import BACKENDS
from instructx2x.dicomweb_options import add_query_arguments, query_from_arguments
from instructx2x.errors import InstructX2XError, ParameterError
from instructx2x.termination import sigterm_cancels

from .answers import MULTI_FINDING_MODES
from .cohort import CohortConfig, generate_cohort
from .counterfactuals import OPERATIONS, PurePairsConfig, write_pure_pairs
from .dataset import BuildConfig, build_dataset
from .phantom import RENDERED_FINDINGS
from .pseudo_masks import build_pseudo_masks
from .tables import TableError

__all__ = ["main", "build_parser"]


RESUME_HINTS = {
    "train": "interrupted: the steps completed are in a resumable checkpoint (--resume latest).",
    "evaluate": "interrupted: the pairs finished are recorded; rerun the same command to resume.",
    "stress-test": "interrupted: the rows finished are recorded; rerun the same command to resume.",
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser."""
    parser = argparse.ArgumentParser(
        prog="instructx2x-train",
        description=(
            "Training data for InstructX2X: MIMIC-EDIT-INSTRUCTION, pseudo masks, synthetic cohorts."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    cohort = commands.add_parser(
        "synthetic-cohort",
        help="write a synthetic cohort in the MIMIC-CXR-JPG / Diff-VQA / MS-CXR file formats",
    )
    cohort.add_argument("output", type=Path)
    cohort.add_argument("--patients", type=int, default=20)
    cohort.add_argument("--seed", type=int, default=0)
    cohort.add_argument("--rows", type=int, default=576)
    cohort.add_argument("--columns", type=int, default=512)
    cohort.add_argument("--dicom", action="store_true", help="also write DICOM CR files")
    cohort.add_argument("--plain-csv", action="store_true", help="write .csv, not .csv.gz")
    cohort.add_argument("--workers", type=int, default=1)

    pure = commands.add_parser(
        "pure-pairs",
        help="write pure counterfactual pairs (phantoms, or "
        "findings inserted into --backgrounds) as a training/test dataset",
    )
    pure.add_argument("output", type=Path)
    pure.add_argument("--pairs", type=int, default=1000)
    pure.add_argument("--seed", type=int, default=0, help="use a seed never used in training for a test set")
    pure.add_argument("--resolution", type=int, default=256)
    pure.add_argument("--findings", nargs="+", default=list(RENDERED_FINDINGS), metavar="FINDING")
    pure.add_argument("--operations", nargs="+", default=list(OPERATIONS), choices=OPERATIONS)
    pure.add_argument("--split", default="train", help="split name of the pairs (train, test, ...)")
    pure.add_argument("--validation-fraction", type=float, default=0.0)
    pure.add_argument("--other-finding-probability", type=float, default=0.25)
    pure.add_argument(
        "--backgrounds",
        type=Path,
        help="folder of real normal PA films (DICOM/PNG) to insert the findings into",
    )
    pure.add_argument("--workers", type=int, default=1)

    build = commands.add_parser("build-dataset", help="build MIMIC-EDIT-INSTRUCTION")
    build.add_argument("output", type=Path)
    build.add_argument("--mimic-cxr", type=Path, required=True, help="MIMIC-CXR-JPG root")
    build.add_argument(
        "--diff-vqa", type=Path, required=True, help="folder with mimic_pair_questions.csv and mimic_all.csv"
    )
    build.add_argument("--resolution", type=int, default=512)
    build.add_argument("--registration-threshold", type=float, default=0.6)
    build.add_argument("--no-finding-ratio", type=float, default=0.3)
    build.add_argument("--multi-finding", default="combined", choices=MULTI_FINDING_MODES)
    build.add_argument("--image-format", default="jpg", choices=["jpg", "png"])
    build.add_argument("--workers", type=int, default=1)
    build.add_argument("--seed", type=int, default=0)

    fit = commands.add_parser(
        "train", help="fine-tune InstructPix2Pix into InstructX2X (also under accelerate launch)"
    )
    fit.add_argument("--config", type=Path, help="YAML or TOML recipe (see Training/configs)")
    fit.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set optim.learning_rate=5e-5 (repeatable)",
    )
    fit.add_argument("--resume", metavar="latest|PATH", help="continue from a checkpoint")
    fit.add_argument("--no-progress", action="store_true", help="no progress bar")

    accept = commands.add_parser(
        "evaluate-demo",
        help="measure a model against the truth of held-out "
        "pure pairs through the product's editor (the demo model's acceptance)",
    )
    accept.add_argument("output", type=Path)
    accept.add_argument("--model", default="demo")
    accept.add_argument(
        "--pairs", type=Path, help="a pure-pairs folder (default: generate --count pairs with --seed)"
    )
    accept.add_argument("--seed", type=int, default=1000, help="held-out seed, never used in training")
    accept.add_argument("--count", type=int, default=160)
    accept.add_argument("--resolution", type=int, default=256)
    accept.add_argument(
        "--ablation-count", type=int, help="pairs for the region-mode and sampler tables (default: all)"
    )
    accept.add_argument(
        "--guidance-scale",
        type=float,
        help="text guidance s_T of every edit (default: the model card's, else 7.5)",
    )
    accept.add_argument(
        "--image-guidance-scale",
        type=float,
        help="image guidance s_I of every edit (default: the model card's, else 1.5)",
    )

    classify = commands.add_parser(
        "train-classifiers",
        help="train the synthetic-cohort classifiers "
        "(five findings, age, sex, race) that evaluate edits of phantoms",
    )
    classify.add_argument("output", type=Path)
    classify.add_argument("--films", type=int, default=4000)
    classify.add_argument(
        "--held-out",
        type=int,
        default=500,
        help="held-out films, measured with their devices drawn as in training and drawn independently of the findings",
    )
    classify.add_argument("--resolution", type=int, default=128)
    classify.add_argument(
        "--render-resolution", type=int, default=256, help="films are drawn at this size, then resized"
    )
    classify.add_argument("--width", type=int, default=32, help="channels of the first stage")
    classify.add_argument("--steps", type=int, default=2000)
    classify.add_argument("--batch", type=int, default=32)
    classify.add_argument("--seed", type=int, default=0)
    classify.add_argument("--workers", type=int, default=1)
    classify.add_argument(
        "--drain-with-pneumothorax",
        type=float,
        default=0.0,
        help="share of pneumothorax films that carry a chest drain (with the next: a confounded split)",
    )
    classify.add_argument(
        "--drain-without-pneumothorax", type=float, default=0.0, help="share of other films with a drain"
    )
    classify.add_argument(
        "--other-devices",
        type=float,
        default=0.0,
        help="chance of a pacemaker, an ECG lead and a text marker on a film (each)",
    )

    assess = commands.add_parser(
        "evaluate",
        help="CMIG / KL / FID and the region-mode ablation (the "
        "paper's Tables 1-2) on a dataset split, or what needs no ground truth on DICOMweb films; "
        "also under accelerate launch",
    )
    assess.add_argument("output", type=Path, help="new folder, or an interrupted one to resume")
    assess.add_argument("--model", required=True)
    assess.add_argument(
        "--dataset",
        type=Path,
        help="MIMIC-EDIT-INSTRUCTION folder (build-dataset or pure-pairs)",
    )
    assess.add_argument("--split", help="the dataset's split (default: test)")
    pacs = assess.add_argument_group(
        "DICOMweb films (every radiograph a QIDO-RS query matches, fetched into OUTPUT/films and "
        "edited with each --instruction; no real-image row, KL or FID: docs/evaluation.md)"
    )
    add_query_arguments(
        pacs,
        store="store every edit's DICOM objects back with STOW-RS (into the film's own study)",
    )
    pacs.add_argument(
        "-i",
        "--instruction",
        dest="instructions",
        action="append",
        metavar="INSTRUCTION",
        help="an edit of every DICOMweb film; repeat for several",
    )
    assess.add_argument(
        "--modes", help="comma-separated region modes (default: all four, none, relevance, prior, rse)"
    )
    assess.add_argument(
        "--classifiers",
        default="cohort-v2",
        help="cohort-v2 (phantoms), torchxrayvision (real films) or a train-classifiers folder",
    )
    assess.add_argument(
        "--weights-dir",
        type=Path,
        help="folder holding torchxrayvision's three weight "
        "files (default: its cache); nothing is downloaded",
    )
    assess.add_argument("--limit", type=int, help="evaluate the first N pairs only")
    assess.add_argument("--batch-size", type=int, default=4)
    assess.add_argument("--seed", type=int, default=0)
    assess.add_argument("--resolution", type=int, help="edit resolution (default: the model's own)")
    assess.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    assess.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95 %% intervals")
    assess.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="what runs the networks, as instructx2x edit --backend: openvino (the CPU), torch, or "
        "auto: what measured fastest on this CPU kind",
    )
    assess.add_argument("--no-progress", action="store_true")

    stress = commands.add_parser(
        "stress-test",
        help="counterfactual edits that test whether classifiers read a finding or a shortcut "
        "(a kept device); also under accelerate launch",
    )
    stress.add_argument("output", type=Path, help="new folder, or an interrupted one to resume")
    stress.add_argument(
        "--classifier",
        dest="classifiers",
        action="append",
        metavar="CLASSIFIER",
        help="cohort-v2 (default), torchxrayvision, a train-classifiers folder or a TorchScript "
        "file with its JSON (docs/evaluation.md); repeat to read the same edits with several",
    )
    stress.add_argument(
        "--counterfactuals",
        choices=("model", "truth"),
        default="model",
        help="model: the editing model's edits (default); truth: each stress-films phantom rendered "
        "again with the edit, the true counterfactual (no model loads)",
    )
    stress.add_argument("--model", help="the editing model (default: demo; not with --counterfactuals truth)")
    stress.add_argument("--films", type=Path, help="folder of films (stress-films writes one)")
    stress.add_argument(
        "--dataset", type=Path, help="MIMIC-EDIT-INSTRUCTION folder: its split's source films"
    )
    stress.add_argument("--split", default="test")
    add_query_arguments(
        stress.add_argument_group(
            "DICOMweb films (every radiograph a QIDO-RS query matches, fetched into OUTPUT/films; "
            "docs/evaluation.md)"
        )
    )
    stress.add_argument(
        "--edits",
        type=Path,
        help='JSON list of edits, [{"instruction": "Remove the finding of pneumothorax", "keep": '
        '"chest drain"}, ...] (default: add, remove and raise the level of each finding)',
    )
    stress.add_argument(
        "--weights-dir", type=Path, help="torchxrayvision's weight files (nothing is downloaded)"
    )
    stress.add_argument("--limit", type=int, help="the first N films only")
    stress.add_argument("--batch-size", type=int, default=4)
    stress.add_argument("--seed", type=int, default=0)
    stress.add_argument("--resolution", type=int, help="edit resolution (default: the model's own)")
    stress.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    stress.add_argument("--bootstrap", type=int, default=1000, help="resamples for the 95 %% intervals")
    stress.add_argument("--no-progress", action="store_true")

    films = commands.add_parser(
        "stress-films", help="phantom films with devices (chest drain, ...) and their masks, for stress-test"
    )
    films.add_argument("output", type=Path)
    films.add_argument("--count", type=int, default=40)
    films.add_argument("--seed", type=int, default=5000, help="a seed the classifiers never trained on")
    films.add_argument("--resolution", type=int, default=128)
    films.add_argument("--finding-probability", type=float, default=0.35)
    films.add_argument("--drain-with-pneumothorax", type=float, default=1.0)
    films.add_argument("--drain-without-pneumothorax", type=float, default=0.0)
    films.add_argument("--other-devices", type=float, default=0.0)
    films.add_argument("--workers", type=int, default=1)

    masks = commands.add_parser("pseudo-masks", help="build the 8 pseudo masks from MS-CXR")
    masks.add_argument("output", type=Path)
    masks.add_argument("--ms-cxr", type=Path, required=True, help="MS_CXR_Local_Alignment_v1.1.0.csv")
    masks.add_argument("--metadata", type=Path, required=True, help="mimic-cxr-2.0.0-metadata.csv(.gz)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code. SIGTERM cancels as Ctrl-C does."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with sigterm_cancels():
        return _main(args)


def _main(args: argparse.Namespace) -> int:
    """The command ``args`` names, with every way it can end turned into an exit code."""
    result: dict[str, Any]  # printed as JSON
    try:
        if args.command == "synthetic-cohort":
            result = generate_cohort(
                args.output,
                CohortConfig(
                    patients=args.patients,
                    seed=args.seed,
                    rows=args.rows,
                    columns=args.columns,
                    write_dicom=args.dicom,
                    gzip_tables=not args.plain_csv,
                    workers=args.workers,
                ),
            )
        elif args.command == "pure-pairs":
            result = write_pure_pairs(
                args.output,
                PurePairsConfig(
                    pairs=args.pairs,
                    seed=args.seed,
                    resolution=args.resolution,
                    findings=tuple(args.findings),
                    operations=tuple(args.operations),
                    split=args.split,
                    validation_fraction=args.validation_fraction,
                    other_finding_probability=args.other_finding_probability,
                    backgrounds=str(args.backgrounds or ""),
                    workers=args.workers,
                ),
            )
        elif args.command == "build-dataset":
            manifest = build_dataset(
                BuildConfig(
                    mimic_cxr=args.mimic_cxr,
                    diff_vqa=args.diff_vqa,
                    resolution=args.resolution,
                    registration_threshold=args.registration_threshold,
                    no_finding_ratio=args.no_finding_ratio,
                    multi_finding=args.multi_finding,
                    workers=args.workers,
                    seed=args.seed,
                    image_format=args.image_format,
                ),
                args.output,
            )
            result = {k: manifest[k] for k in ("kept_pairs", "instructions", "counts", "per_split")}
        elif args.command == "train":
            from .train import train
            from .train_config import load_config

            outcome = train(
                load_config(args.config, args.overrides),
                resume=args.resume,
                progress_bar=not args.no_progress,
            )
            result = {
                "model": str(outcome.model),
                "steps": outcome.steps,
                "final_loss": outcome.final_loss,
                "checkpoints": [str(p) for p in outcome.checkpoints],
            }
        elif args.command == "evaluate-demo":
            from .demo_acceptance import evaluate_demo

            report = evaluate_demo(
                args.model,
                args.output,
                pairs=args.pairs,
                seed=args.seed,
                count=args.count,
                resolution=args.resolution,
                ablation_count=args.ablation_count,
                guidance_scale=args.guidance_scale,
                image_guidance_scale=args.image_guidance_scale,
            )
            result = {"verdicts": report["verdicts"], "report": str(args.output / "acceptance.md")}
        elif args.command == "train-classifiers":
            from .classifiers import ClassifierConfig, DeviceDraw, train_classifiers

            card = train_classifiers(
                args.output,
                ClassifierConfig(
                    films=args.films,
                    held_out=args.held_out,
                    resolution=args.resolution,
                    render_resolution=args.render_resolution,
                    width=args.width,
                    steps=args.steps,
                    batch=args.batch,
                    seed=args.seed,
                    workers=args.workers,
                    devices=DeviceDraw(
                        args.drain_with_pneumothorax, args.drain_without_pneumothorax, args.other_devices
                    ),
                ),
            )
            result = {
                "output": str(args.output),
                "held_out": card["held_out"],
                "held_out_devices_independent": card["held_out_devices_independent"],
                "training_seconds": card["training_seconds"],
            }
        elif args.command == "evaluate":
            from .evaluation import EvaluationConfig, evaluate

            modes = {} if args.modes is None else {"modes": tuple(m.strip() for m in args.modes.split(","))}
            query, credentials = query_from_arguments(args)
            if query is not None and args.split is not None:
                raise ParameterError("--split names a dataset's split; DICOMweb films have none.")
            report = evaluate(
                args.output,
                EvaluationConfig(
                    model=args.model,
                    dataset=str(args.dataset) if args.dataset else None,
                    split=args.split or "test",
                    dicomweb=query,
                    instructions=tuple(args.instructions or ()),
                    store=args.dicomweb_store,
                    **modes,
                    classifiers=args.classifiers,
                    weights_dir=str(args.weights_dir) if args.weights_dir else None,
                    limit=args.limit,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    resolution=args.resolution,
                    steps=args.steps,
                    bootstrap=args.bootstrap,
                    backend=args.backend,
                ),
                progress_bar=not args.no_progress,
                credentials=credentials,
            )
            if not report:  # a non-main process under accelerate launch
                return 0
            result = {
                "report": str(args.output / "evaluation.md"),
                "cmig": {name: row["cmig"] for name, row in report["rows"].items()},
            }
        elif args.command == "stress-test":
            from .stress_test import StressConfig, read_edits, stress_test

            query, credentials = query_from_arguments(args)
            report = stress_test(
                args.output,
                StressConfig(
                    model=args.model,
                    classifiers=tuple(args.classifiers or ("cohort-v2",)),
                    films=str(args.films) if args.films else None,
                    dataset=str(args.dataset) if args.dataset else None,
                    split=args.split,
                    dicomweb=query,
                    edits=read_edits(args.edits) if args.edits else (),
                    weights_dir=str(args.weights_dir) if args.weights_dir else None,
                    limit=args.limit,
                    batch_size=args.batch_size,
                    seed=args.seed,
                    resolution=args.resolution,
                    steps=args.steps,
                    bootstrap=args.bootstrap,
                    counterfactuals=args.counterfactuals,
                ),
                progress_bar=not args.no_progress,
                credentials=credentials,
            )
            if not report:  # a non-main process under accelerate launch
                return 0
            result = {"report": str(args.output / "stress-test.md"), "verdicts": report["verdicts"]}
        elif args.command == "stress-films":
            from .classifiers import DeviceDraw
            from .stress_test import write_stress_films

            result = write_stress_films(
                args.output,
                args.count,
                args.seed,
                args.resolution,
                args.finding_probability,
                DeviceDraw(args.drain_with_pneumothorax, args.drain_without_pneumothorax, args.other_devices),
                args.workers,
            )
        else:
            result = build_pseudo_masks(args.ms_cxr, args.metadata, args.output)
    except KeyboardInterrupt:
        print(RESUME_HINTS.get(args.command, "interrupted: nothing was written."), file=sys.stderr)
        return 130
    except InstructX2XError as error:  # the library's families: disk full while saving, ...
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except (ValueError, TableError, FileNotFoundError, FileExistsError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
