"""``instructx2x``: edit, preview and inspect from the command line.

It is also the Slicer module's worker: ``--progress jsonl`` prints one JSON object per line
(``{"event": "progress", "step": 3, "total": 100}``, then ``done`` or ``error``), which the
panel reads to drive its progress bar.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from diffusers.utils import logging as diffusers_logging

from . import __version__
from .dicom.export import write_dicom_edit
from .dicom.pacs import CStoreTarget, PacsError, push_cstore, push_stow
from .dicom.read import read_dicom
from .editor import ASPECT_MODES, EditParameters, InstructX2XEditor
from .guidance import RegionMode
from .image_io import Radiograph, is_dicom_file, read_image, read_mask
from .outputs import UNTRAINED_NOTICE, atomic_output_dir, write_png_result
from .pipeline import EditCancelled
from .priors import PriorSet
from .schedulers import SCHEDULERS

__all__ = ["main", "build_parser"]

logger = logging.getLogger("instructx2x")

MODEL_ENV = "INSTRUCTX2X_MODEL"
EXIT_ERROR = 2
EXIT_CANCELLED = 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="instructx2x", description=(
        "Counterfactual chest X-ray editing with InstructX2X (Region-Specific Editing)."))
    parser.add_argument("--version", action="version", version=f"instructx2x {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("--model", default=os.environ.get(MODEL_ENV), help=(
        f"diffusers directory, .ckpt/.safetensors file, or 'untrained-tiny' (default: ${MODEL_ENV})"))
    model.add_argument("--model-config", type=Path, help=(
        "for a single-file checkpoint: directory with unet/, vae/, text_encoder/ config.json "
        "(default: the shipped Stable Diffusion 1.x InstructPix2Pix configs)"))
    model.add_argument("--allow-hub", action="store_true",
                       help="allow downloading a hub model id (off: nothing is fetched)")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    model.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    model.add_argument("--scheduler", default="auto", choices=["auto", *sorted(SCHEDULERS)],
                       help="sampler; auto: the authors' DDIM on CUDA, DPM-Solver++ elsewhere")
    model.add_argument("--priors", type=Path, help="directory of exact pseudo masks (from "
                       "instructx2x-train pseudo-masks); default: the shipped approximation")

    job = argparse.ArgumentParser(add_help=False)
    job.add_argument("input", type=Path,
                     help="radiograph: DICOM (CR, DX, SC) file or folder, or PNG/JPEG")
    job.add_argument("-i", "--instruction", required=True,
                     help='e.g. "Add the finding of pleural effusion"')
    job.add_argument("-o", "--output", type=Path, required=True,
                     help="output folder (must not exist)")
    job.add_argument("--mode", default="rse", choices=[m.value for m in RegionMode])
    job.add_argument("--tau", type=float, default=0.1)
    job.add_argument("--relevance-timestep", type=int, default=800)
    job.add_argument("--steps", type=int, dest="num_inference_steps", metavar="N",
                     help="denoising steps (default: 3 for dpm++ and unipc, else 100)")
    job.add_argument("--guidance-scale", type=float, default=7.5, help="text guidance s_T")
    job.add_argument("--image-guidance-scale", type=float, default=1.5, help="image guidance s_I")
    job.add_argument("--eta", type=float, default=0.0)
    job.add_argument("--seed", type=int, default=0)
    job.add_argument("--resolution", type=int, default=512)
    job.add_argument("--no-lateralize", action="store_true",
                     help="do not narrow lung priors to the side the instruction names")
    job.add_argument("--mask", type=Path, help="edit mask image (replaces the prior)")
    job.add_argument("--keep-mask", type=Path, help="mask of what must never change")
    job.add_argument("--aspect", default="squash", choices=list(ASPECT_MODES),
                     help="squash to the square model grid (as trained) or pad to a square")
    job.add_argument("--progress", default="bar", choices=["bar", "jsonl", "none"])
    dicom = job.add_argument_group("DICOM")
    dicom.add_argument("--voi", default="first",
                       help="display transform: first (VOI LUT or window), a window index, "
                            "minmax or percentile")
    dicom.add_argument("--allow-non-chest", action="store_true",
                       help="accept images whose BodyPartExamined is not a chest")
    dicom.add_argument("--feather", type=int, default=0, metavar="PX",
                       help="blend band inside the mask at native resolution (pixels)")
    dicom.add_argument("--push-cstore", metavar="HOST:PORT:AET",
                       help="send the new series to a PACS with C-STORE")
    dicom.add_argument("--push-stow", metavar="URL", help="send the new series with STOW-RS")

    commands.add_parser("edit", parents=[model, job], help="edit a radiograph")
    commands.add_parser("preview", parents=[model, job],
                        help="guidance maps and edit mask only (fast: no denoising)")
    commands.add_parser("info", parents=[model], help="model, device and versions")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # Third-party INFO lines (highdicom's) quote source UIDs: keep them out of the log.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    diffusers_logging.set_verbosity_error()  # dtype-cast notices are noise for CLI users
    emit = _emitter(getattr(args, "progress", "none"))
    try:
        if args.model is None:
            raise ValueError(f"no model given: pass --model DIR|FILE (or set ${MODEL_ENV}); "
                             "'--model untrained-tiny' runs a random-weight test model.")
        editor = InstructX2XEditor.from_model(args.model, device=args.device, dtype=args.dtype,
                                              scheduler=args.scheduler, allow_hub=args.allow_hub,
                                              single_file_config=args.model_config)
        if args.priors is not None:
            editor.pipeline.prior_set = PriorSet.from_directory(args.priors)
        if args.command == "info":
            print(json.dumps(_info(editor), indent=2))
            return 0
        return _run_job(args, editor, emit)
    except KeyboardInterrupt:
        emit({"event": "cancelled"})
        print("cancelled: nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except EditCancelled as error:
        emit({"event": "cancelled"})
        print(f"cancelled: {error}; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, NotImplementedError) as error:
        emit({"event": "error", "message": str(error)})
        print(f"error: {error}", file=sys.stderr)
        return EXIT_ERROR


def _run_job(args: argparse.Namespace, editor: InstructX2XEditor, emit) -> int:
    if args.output.exists():
        raise FileExistsError(f"output folder {args.output} already exists; choose a new one.")
    parameters = EditParameters(
        instruction=args.instruction, region_mode=args.mode, tau=args.tau,
        relevance_timestep=args.relevance_timestep, num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale, image_guidance_scale=args.image_guidance_scale,
        eta=args.eta, seed=args.seed, resolution=args.resolution,
        lateralize_prior=not args.no_lateralize, aspect=args.aspect)
    parameters = editor.resolve(parameters)
    if args.feather < 0:
        raise ValueError(f"--feather must be >= 0, got {args.feather}.")
    target = None if args.push_cstore is None else CStoreTarget.parse(args.push_cstore)
    if args.push_stow is not None and not args.push_stow.startswith(("http://", "https://")):
        raise ValueError(f"--push-stow must be an http(s) URL, got {args.push_stow!r}.")
    # Read and check every input before any model work or any file is written.
    paths = _input_files(args.input)
    images = [_read(path, args) for path in paths]
    if (args.mask or args.keep_mask) and len(images) > 1:
        raise ValueError("--mask and --keep-mask apply to one image; the input is a folder.")
    shape = images[0].pixels.shape
    mask = None if args.mask is None else read_mask(args.mask, shape)
    keep = None if args.keep_mask is None else read_mask(args.keep_mask, shape)
    if (target or args.push_stow) and (args.command != "edit" or images[0].format != "dicom"):
        raise ValueError("pushing to a PACS needs a DICOM input and the edit command.")
    if not editor.model_info.trained:
        print(f"WARNING: {UNTRAINED_NOTICE}", file=sys.stderr)

    total = parameters.num_inference_steps * len(images)
    emit({"event": "started", "command": args.command, "total": total, "images": len(images)})
    results = []
    with _progress_reporter(args.progress if args.command == "edit" else "none", total,
                            emit) as report:
        for index, image in enumerate(images):
            if args.command == "preview":
                results.append(editor.preview(image, parameters, mask, keep))
                continue
            offset = index * parameters.num_inference_steps
            results.append(editor.edit(image, parameters, mask, keep,
                                       progress=lambda step, _, offset=offset: report(offset + step, total)))
    with atomic_output_dir(args.output) as staging:
        written = []
        for index, (image, result) in enumerate(zip(images, results)):
            folder = staging if len(images) == 1 else staging / f"image-{index + 1:03d}"
            folder.mkdir(exist_ok=True)
            if image.format == "dicom" and result.edited is not None:
                names = write_dicom_edit(folder, image, result, feather_px=args.feather)
            else:
                names = [p.name for p in write_png_result(folder, image, result)]
            written += [str((folder / n).relative_to(staging)) for n in names]
    summary = {"event": "done", "output": str(args.output), "files": written,
               "prior": results[0].manifest["prior"],
               "edit_fraction": results[0].manifest["edit_fraction"],
               "untrained": results[0].untrained}
    dicom_files = [args.output / name for name in written if name.endswith(".dcm")]
    try:
        if target is not None:
            push_cstore(dicom_files, target)
            summary["pushed_cstore"] = f"{target.host}:{target.port}:{target.called_ae_title}"
        if args.push_stow is not None:
            push_stow(dicom_files, args.push_stow)
            summary["pushed_stow"] = True
    except PacsError as error:
        emit({"event": "error", "message": f"written to {args.output}, but not pushed: {error}"})
        print(f"error: written to {args.output}, but not pushed: {error}", file=sys.stderr)
        return EXIT_ERROR
    emit(summary)
    if args.progress != "jsonl":
        print(json.dumps(summary, indent=2))
    return 0


def _input_files(path: Path) -> list[Path]:
    """The file itself, or the DICOM files directly in a folder (sorted by name)."""
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and is_dicom_file(p))
        if not files:
            raise FileNotFoundError(f"no DICOM files in folder {path.name}.")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"input image not found: {path.name}")
    return [path]


def _read(path: Path, args: argparse.Namespace) -> Radiograph:
    if is_dicom_file(path):
        voi = int(args.voi) if args.voi.isdigit() else args.voi
        return read_dicom(path, voi=voi, allow_non_chest=args.allow_non_chest)
    return read_image(path)


class _progress_reporter:
    """A tqdm bar (``bar``), JSON lines (``jsonl``) or nothing, as a step callback."""

    def __init__(self, kind: str, total: int, emit) -> None:
        self.kind, self.total, self.emit, self.bar = kind, total, emit, None

    def __enter__(self):
        if self.kind == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, desc="denoising", unit="step", file=sys.stderr)
        return self.report

    def report(self, step: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update(1)
        elif self.kind == "jsonl":
            self.emit({"event": "progress", "step": step, "total": total})

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()


def _emitter(kind: str):
    if kind != "jsonl":
        return lambda event: None

    def emit(event: dict) -> None:
        print(json.dumps(event, default=str), flush=True)
    return emit


def _info(editor: InstructX2XEditor) -> dict:
    import diffusers
    import torch
    import transformers

    prior_set = editor.pipeline.prior_set or PriorSet.default()
    return {
        "instructx2x": __version__,
        "model": editor.model_info.to_dict(),
        "device": str(editor.device),
        "dtype": str(editor.dtype).replace("torch.", ""),
        "cuda_available": torch.cuda.is_available(),
        "scheduler": type(editor.pipeline.scheduler).__name__,
        "priors": {"version": prior_set.version, "source": prior_set.source},
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__},
    }


if __name__ == "__main__":
    sys.exit(main())
