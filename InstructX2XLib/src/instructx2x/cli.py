"""``instructx2x``: edit, preview, inspect and push to a PACS from the command line.

Argument parsing over the job layer (``jobs.py``): the CLI builds an ``EditJob``, checks
every input before the model is loaded, then runs it. ``--progress jsonl`` prints one JSON
object per line (``started``, ``progress`` with ``eta_s``, ``export``, then ``done``,
``error`` or ``cancelled``), which the Slicer panel reads. Every failure ends with a
specific message and the exit code of its family (``errors.py``): 2 input or parameters,
3 model, 4 memory or disk, 5 PACS, 130 cancelled. Only light modules are imported at the
top, so even a Ctrl-C during the heavy imports ends cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from . import __version__
from .errors import EditCancelled, ErrorEvent, InternalError, ParameterError, error_event
from .jobs import EditJob, prepare, run_job, run_jobs_file
from .parameters import (
    ASPECT_MODES,
    COMPOSITE_MODES,
    GUIDANCE_SCALE,
    IMAGE_GUIDANCE_SCALE,
    RELEVANCE_TIMESTEP,
    SCHEDULER_NAMES,
    TAU,
    EditParameters,
    RegionMode,
)
from .provenance import to_json
from .termination import sigterm_cancels

__all__ = ["main", "build_parser"]

logger = logging.getLogger("instructx2x")

MODEL_ENV = "INSTRUCTX2X_MODEL"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    from .dicomweb_options import add_query_arguments

    parser = argparse.ArgumentParser(
        prog="instructx2x",
        description=("Counterfactual chest X-ray editing with InstructX2X (Region-Specific Editing)."),
    )
    parser.add_argument("--version", action="version", version=f"instructx2x {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--model",
        default=os.environ.get(MODEL_ENV),
        help=(
            "diffusers directory, .ckpt/.safetensors file, 'demo' (the bundled model trained on "
            f"synthetic phantoms) or 'untrained-tiny' (default: ${MODEL_ENV}, else demo)"
        ),
    )
    model.add_argument(
        "--model-config",
        type=Path,
        help=(
            "for a single-file checkpoint: directory with unet/, vae/, text_encoder/ config.json "
            "(default: the shipped Stable Diffusion 1.x InstructPix2Pix configs)"
        ),
    )
    model.add_argument(
        "--allow-hub", action="store_true", help="allow downloading a hub model id (off: nothing is fetched)"
    )
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    model.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto: bf16 on GPUs and on CPUs with bf16 instructions, else fp32",
    )
    model.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "torch", "openvino"],
        help="what runs the networks: openvino (the CPU; converted once per model into "
        "$INSTRUCTX2X_CACHE/openvino or ~/.cache/instructx2x/openvino), torch, or auto: what "
        "measured fastest on this CPU kind (instructx2x info says which and why)",
    )
    model.add_argument(
        "--scheduler",
        default="auto",
        choices=["auto", *SCHEDULER_NAMES],
        help="sampler; auto: the authors' DDIM on CUDA, DPM-Solver++ elsewhere",
    )
    model.add_argument(
        "--decode",
        default="auto",
        choices=["auto", "mask", "full"],
        help="VAE decode of the full grid (auto) or of the mask's region only (faster on "
        "CPU, approximate: see docs/benchmarks.md)",
    )
    model.add_argument(
        "--priors",
        type=Path,
        help="directory of exact pseudo masks (from "
        "instructx2x-train pseudo-masks); default: the shipped approximation",
    )

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument(
        "input", type=Path, nargs="?", help="radiograph: DICOM (CR, DX, SC) file or folder, or PNG/JPEG"
    )
    job.add_argument("-i", "--instruction", help='e.g. "Add the finding of pleural effusion"')
    job.add_argument(
        "--series",
        nargs="+",
        metavar="STEP",
        help=(
            "a progression series of one radiograph: instructions in order of severity, or levels "
            'that fill the {level} of -i (-i "Add the finding of {level} edema" --series mild '
            "moderate severe); one seed and one edit region for every step; writes step-NN.png "
            "(and .dcm, one DICOM series), strip.png and manifest.json"
        ),
    )
    job.add_argument(
        "--jobs",
        type=Path,
        metavar="FILE.csv",
        help=(
            "many edits in one process: a CSV with columns image, instruction[, mask, keep_mask, "
            "seed]; writes OUTPUT/NNNN-<image>/ per row and OUTPUT/results.csv"
        ),
    )
    job.add_argument(
        "--batch-size",
        type=int,
        default=1,
        metavar="N",
        help="with --jobs: edit up to N rows per pipeline call (default 1)",
    )
    job.add_argument("-o", "--output", type=Path, required=True, help="output folder (must not exist)")
    job.add_argument("--mode", default="rse", choices=[m.value for m in RegionMode])
    job.add_argument("--tau", type=float, default=TAU)
    job.add_argument("--relevance-timestep", type=int, default=RELEVANCE_TIMESTEP)
    job.add_argument(
        "--relevance-draws",
        type=int,
        metavar="K",
        help="noise draws averaged into the relevance map (default: the model card's, else 1)",
    )
    job.add_argument(
        "--steps",
        type=int,
        dest="num_inference_steps",
        metavar="N",
        help="denoising steps (default: the model card's few_step_solver_steps, else 3, "
        "for dpm++ and unipc; 100 for the others)",
    )
    job.add_argument(
        "--guidance-scale",
        type=float,
        help=f"text guidance s_T (default: the model card's, else {GUIDANCE_SCALE:g})",
    )
    job.add_argument(
        "--image-guidance-scale",
        type=float,
        help=f"image guidance s_I (default: the model card's, else {IMAGE_GUIDANCE_SCALE:g})",
    )
    job.add_argument("--eta", type=float, default=0.0)
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--resolution", type=int, help="model grid in pixels (default: the model's native size)")
    job.add_argument(
        "--no-lateralize",
        action="store_true",
        help="do not narrow lung priors to the side the instruction names",
    )
    job.add_argument("--mask", type=Path, help="edit mask, PNG or .npy (replaces the prior)")
    job.add_argument("--keep-mask", type=Path, help="mask of what must never change, PNG or .npy")
    job.add_argument(
        "--reference-mask",
        type=Path,
        help="a known lesion (e.g. a phantom's ground truth), outlined on figure.png; PNG or .npy",
    )
    job.add_argument(
        "--aspect",
        default="squash",
        choices=list(ASPECT_MODES),
        help="squash to the square model grid (as trained) or pad to a square",
    )
    job.add_argument(
        "--composite",
        default="change",
        choices=list(COMPOSITE_MODES),
        help="change: native image + the model's change inside the mask (keeps "
        "native detail); replace: the model's upsampled output inside it",
    )
    job.add_argument(
        "--verify",
        nargs="?",
        const="auto",
        metavar="SET",
        help=(
            "check the edit with classifiers and write verification.json/.txt: auto (default; the "
            "set that fits the input), cohort-v2, torchxrayvision or a folder"
        ),
    )
    job.add_argument(
        "--include-demographics",
        action="store_true",
        help=(
            "with --verify: also write the classifiers' age, sex and race estimates (model "
            "estimates, not recorded patient data) into verification.json/.txt"
        ),
    )
    job.add_argument("--progress", default="bar", choices=["bar", "jsonl", "none"])
    dicom = job.add_argument_group("DICOM")
    dicom.add_argument(
        "--voi",
        default="first",
        help="display transform: first (VOI LUT or window), a window index, minmax or percentile",
    )
    dicom.add_argument(
        "--allow-non-chest", action="store_true", help="accept images whose BodyPartExamined is not a chest"
    )
    dicom.add_argument(
        "--feather",
        type=int,
        default=0,
        metavar="PX",
        help="blend band inside the mask at native resolution (pixels)",
    )
    dicom.add_argument(
        "--push-cstore", metavar="HOST:PORT:AET", help="send the new series to a PACS with C-STORE"
    )
    dicom.add_argument("--push-stow", metavar="URL", help="send the new series with STOW-RS")
    cohort = job.add_argument_group(
        "DICOMweb cohort (edit every radiograph a QIDO-RS query matches, with -i; docs/cli.md)"
    )
    add_query_arguments(
        cohort, store="store each row's DICOM objects back with STOW-RS (into the film's own study)"
    )

    commands.add_parser("edit", parents=[model, job], help="edit a radiograph")
    commands.add_parser(
        "preview", parents=[model, job], help="guidance maps and edit mask only (fast: no denoising)"
    )
    commands.add_parser("info", parents=[model], help="model, device, precision and versions")
    serve = commands.add_parser(
        "serve",
        parents=[model],
        help=("long-lived worker: load the model once, take jobs as JSON lines (see instructx2x.serve)"),
    )
    transport = serve.add_mutually_exclusive_group(required=True)
    transport.add_argument(
        "--stdio",
        action="store_true",
        help="one client: JSON lines on stdin and stdout (what a panel starts)",
    )
    transport.add_argument(
        "--socket",
        metavar="PATH",
        help="a shared worker on a Unix socket (mode 0600): several panels, one model, one job at a time",
    )
    push = commands.add_parser("push", help="send a written series (a folder's .dcm files) to a PACS")
    push.add_argument("folder", type=Path, help="the folder of the series' .dcm files")
    push.add_argument("--cstore", required=True, metavar="HOST:PORT:AET", help="the PACS, by C-STORE")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # Third-party INFO lines (highdicom's) quote source UIDs: keep them out of the log.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    emit = _emitter("jsonl" if args.command == "serve" else getattr(args, "progress", "none"))
    if args.command == "serve":
        return _run(args, emit)  # serve handles SIGTERM itself
    with sigterm_cancels():
        return _run(args, emit)


def _run(args: argparse.Namespace, emit: Callable[[dict], None]) -> int:
    """``_main`` with every way it can end turned into an exit code and a final event."""
    try:
        return _main(args, emit)
    except (KeyboardInterrupt, EditCancelled):
        emit({"event": "cancelled"})
        if getattr(args, "jobs", None) or getattr(args, "dicomweb", None):
            print(
                "interrupted: the finished rows are kept; rerun the same command to resume.", file=sys.stderr
            )
        else:
            print("cancelled: nothing was written.", file=sys.stderr)
        return EditCancelled.exit_code
    except Exception as error:  # noqa: BLE001 - the panel must always get a final event
        event = error_event(error)
        if event.kind == InternalError.__name__:
            if os.environ.get("INSTRUCTX2X_DEBUG") == "1":
                traceback.print_exc()
            event = replace(event, message=f"{event.message}; set INSTRUCTX2X_DEBUG=1 for the traceback")
        return _fail(emit, event)


def _main(args: argparse.Namespace, emit) -> int:
    if args.command == "push":
        return _push(args.folder, args.cstore)
    if args.model is None:
        from .parameters import DEMO_MODEL_NAME

        args.model = DEMO_MODEL_NAME
        print(
            f"no --model given: using the bundled demo model (trained on synthetic phantoms, "
            f"not for clinical use); pass --model DIR or set ${MODEL_ENV} for your own.",
            file=sys.stderr,
        )
    prepared = jobs = None
    from .backends import check_backend

    check_backend(args.backend, args.device)  # the package and the cache, before any input is read
    if args.command == "serve" and args.socket:  # checked before the model loads
        from .serve import check_socket_path

        check_socket_path(Path(args.socket))
    if args.command in ("edit", "preview") and (args.jobs is not None or args.dicomweb is not None):
        jobs = _jobs_run(args)  # every row read and checked before the model is loaded
    elif args.command in ("edit", "preview"):
        from .dicomweb_options import query_from_arguments

        query_from_arguments(args)  # a DICOMweb cohort's options without --dicomweb URL: refused
        instruction = _series_instruction(args) if args.series else args.instruction
        if args.input is None or instruction is None:
            raise ParameterError("give an input radiograph and -i INSTRUCTION (or --jobs FILE.csv).")
        prepared = prepare(_job(args, args.input, instruction))  # checked before the model loads
    from .editor import InstructX2XEditor
    from .outputs import UNTRAINED_NOTICE
    from .priors import PriorSet

    emit({"event": "loading", "model": Path(args.model).name})
    priors = None if args.priors is None else PriorSet.from_directory(args.priors)
    editor = InstructX2XEditor.from_model(
        args.model,
        device=jobs.shard.device if jobs is not None and args.device == "auto" else args.device,
        dtype=args.dtype,
        scheduler=args.scheduler,
        allow_hub=args.allow_hub,
        single_file_config=args.model_config,
        decode=args.decode,
        backend=args.backend,
    )
    if priors is not None:
        editor.pipeline.prior_set = priors
    if args.command == "serve":
        from .serve import serve, serve_socket

        return serve_socket(editor, args.socket) if args.socket else serve(editor)
    if jobs is not None:
        summary = run_jobs_file(
            jobs.prepared,
            args.output,
            editor,
            emit,
            progress_bar=args.progress == "bar",
            batch_size=args.batch_size,
            shard=jobs.shard,
            settings=jobs.settings,
            after_row=jobs.after_row,
        )
        if summary and args.progress != "jsonl":  # printed by the main process alone
            print(to_json(summary))
        return 0
    if prepared is None:
        print(to_json(_info(editor, args.model)))
        return 0
    if editor.model_info.trained is False:
        print(f"WARNING: {UNTRAINED_NOTICE}", file=sys.stderr)
    summary = run_job(
        prepared, editor, emit, progress_bar=args.progress == "bar" and prepared.job.command == "edit"
    )
    if args.progress != "jsonl":
        print(to_json(summary))
    return 0


def _series_instruction(args: argparse.Namespace) -> str:
    """The instruction of a ``--series`` job: -i, the template holding {level}, when the steps
    are levels; else the first step (the steps checked first, so that their errors come first)."""
    from .instructions import LEVEL_PLACEHOLDER, parse_series

    if args.instruction is None:
        return parse_series(args.series).instructions[0]
    if LEVEL_PLACEHOLDER not in args.instruction:
        raise ParameterError(
            f"with --series, -i is a template holding {LEVEL_PLACEHOLDER} for the levels to fill "
            f'(-i "Add the finding of {LEVEL_PLACEHOLDER} edema" --series mild severe); give '
            "instructions to --series without -i."
        )
    return args.instruction


def _jobs_run(args: argparse.Namespace):
    """The rows of ``--jobs FILE.csv`` or of a ``--dicomweb`` cohort, checked (``job_sources``)."""
    from .job_sources import prepare_jobs_run

    if args.jobs is not None and args.dicomweb is not None:
        raise ParameterError("give --jobs FILE.csv or --dicomweb URL, not both.")
    source = "--jobs" if args.jobs is not None else "--dicomweb"
    if args.series:
        raise ParameterError(f"--series edits one radiograph; give it without {source}.")
    if args.input is not None or (args.jobs is not None and args.instruction is not None):
        raise ParameterError(f"{source} takes the images from its source; give no input radiograph with it.")
    if args.dicomweb is not None and args.instruction is None:
        raise ParameterError("--dicomweb edits every film with one instruction: give -i INSTRUCTION.")
    if args.push_cstore or args.push_stow:
        raise ParameterError(f"{source} does not push with --push-*; use --dicomweb-store or push each row.")
    if args.reference_mask is not None:
        raise ParameterError(f"--reference-mask outlines one image's lesion; give it without {source}.")
    from .dicomweb_options import query_from_arguments

    cohort, credentials = query_from_arguments(args)  # cohort options without --dicomweb: refused
    # the template's input (and, for a CSV, instruction) are placeholders each row replaces
    return prepare_jobs_run(
        _job(args, Path("."), args.instruction or "placeholder"),
        args.batch_size,
        jobs_file=args.jobs,
        cohort=cohort,
        credentials=credentials,
        store=args.dicomweb_store,
        model=args.model,
        scheduler=args.scheduler,
        dtype=args.dtype,
        decode=args.decode,
        backend=args.backend,
        priors=None if args.priors is None else str(args.priors),
    )


def _push(folder: Path, cstore: str) -> int:
    """Send every ``.dcm`` file in ``folder`` to the C-STORE target (checked before connecting)."""
    from .dicom.pacs import CStoreTarget, push_cstore

    target = CStoreTarget.parse(cstore)
    if not folder.is_dir():
        raise ParameterError(f"{folder.name} is not a folder of DICOM files.")
    files = sorted(folder.glob("*.dcm"))
    if not files:
        raise ParameterError(f"{folder.name} holds no .dcm file to send.")
    push_cstore(files, target)
    print(f"sent {len(files)} files to {target.called_ae_title} at {target.host}:{target.port}")
    return 0


def _job(args: argparse.Namespace, source: Path, instruction: str) -> EditJob:
    parameters = EditParameters(
        instruction=instruction,
        region_mode=args.mode,
        tau=args.tau,
        relevance_timestep=args.relevance_timestep,
        relevance_draws=args.relevance_draws,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        image_guidance_scale=args.image_guidance_scale,
        eta=args.eta,
        seed=args.seed,
        resolution=args.resolution,
        lateralize_prior=not args.no_lateralize,
        aspect=args.aspect,
        composite=args.composite,
    )
    return EditJob(
        command=args.command,
        input=source,
        output=args.output,
        parameters=parameters,
        mask=args.mask,
        keep_mask=args.keep_mask,
        voi=int(args.voi) if args.voi.isdigit() else args.voi,
        allow_non_chest=args.allow_non_chest,
        feather_px=args.feather,
        push_cstore=args.push_cstore,
        push_stow=args.push_stow,
        reference_mask=args.reference_mask,
        verify=args.verify,
        include_demographics=args.include_demographics,
        series=tuple(args.series or ()),
    )


def _fail(emit, event: ErrorEvent) -> int:
    emit(event.to_dict())
    print(f"error: {event.message}", file=sys.stderr)
    return event.exit_code


def _emitter(kind: str):
    if kind != "jsonl":
        return lambda event: None

    def emit(event: dict) -> None:
        print(to_json(event, indent=None), flush=True)

    return emit


def _info(editor, model: str) -> dict:
    import diffusers
    import torch
    import transformers

    from .model_digest import folder_digest
    from .serve import PROTOCOL_VERSION

    described = editor.model_info.to_dict()
    if Path(model).is_dir():  # what the folder's model.sha256 pins (model_digest)
        described["folder_sha256"] = folder_digest(model)
    return {
        "instructx2x": __version__,
        "worker_protocol": PROTOCOL_VERSION,
        "model": described,
        "device": str(editor.device),
        "dtype": str(editor.dtype).replace("torch.", ""),
        "precision": editor.precision,
        "backend": editor.backend_info,
        "native_resolution": editor.native_resolution,
        "defaults": editor.sampling(),
        "cuda_available": torch.cuda.is_available(),
        "scheduler": type(editor.pipeline.scheduler).__name__,
        "priors": {"version": editor.prior_set.version, "source": editor.prior_set.source},
        "versions": {
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "transformers": transformers.__version__,
        },
    }


if __name__ == "__main__":
    sys.exit(main())
