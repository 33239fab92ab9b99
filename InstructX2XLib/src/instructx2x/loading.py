"""Load InstructX2X / InstructPix2Pix weights offline, and identify them by hash.

Three sources, checked in this order:

* a diffusers directory (the authors' release, e.g. ``Ix2x_V1_4500/`` with ``unet/``,
  ``vae/``, ``text_encoder/``, ``tokenizer/``; safetensors or bin);
* an original single-file checkpoint (``.ckpt`` / ``.safetensors``, as
  ``instruct-pix2pix-00-22000.ckpt``), converted with the Stable Diffusion 1.x configs that
  ship with this package;
* a model hub id, only when the caller passes ``allow_hub=True``.

Pickled files are only ever read through ``torch.load(weights_only=True)`` (diffusers does
this for ``.bin`` and ``.ckpt``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import pickle
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .pipeline import InstructX2XPipeline
from .schedulers import make_scheduler
from .untrained import UNTRAINED_MODEL_NAME, build_untrained_pipeline, load_clip_tokenizer

__all__ = ["ModelInfo", "ModelLoadError", "load_pipeline", "hash_modules", "hash_files"]

logger = logging.getLogger(__name__)

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
COMPONENTS = ("unet", "vae", "text_encoder")


class ModelLoadError(ValueError):
    """A model path exists but does not hold a usable InstructPix2Pix model."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded weights, recorded in every result.

    Attributes
    ----------
    name: str
        Directory or file name, or ``untrained-tiny``.
    source: str
        ``directory``, ``single_file``, ``hub`` or ``untrained``.
    sha256: str
        Hash of the weight files (or of the tensors for models built in memory).
    trained: bool
        False for the random-weight model: its edits mean nothing.
    """

    name: str
    source: str
    sha256: str
    trained: bool

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def hash_files(paths: list[Path], root: Path) -> str:
    """SHA-256 over the relative names and bytes of ``paths``, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def hash_modules(*modules: torch.nn.Module) -> str:
    """SHA-256 over the parameter names and raw bytes of models held in memory."""
    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_pipeline(model: str | Path, *, allow_hub: bool = False, scheduler: str = "ddim",
                  single_file_config: str | Path | None = None,
                  ) -> tuple[InstructX2XPipeline, ModelInfo]:
    """Build the InstructX2X pipeline from weights on disk (or the hub, if allowed).

    Parameters
    ----------
    model: str | pathlib.Path
        A diffusers directory, a single-file checkpoint, ``untrained-tiny``, or (with
        ``allow_hub``) a hub id such as ``timbrooks/instruct-pix2pix``.
    allow_hub: bool
        Permit network access to a model hub. Off by default: nothing is downloaded unless
        the user asks.
    scheduler: str
        Short scheduler name (see ``schedulers.SCHEDULERS``); DDIM as the authors run it.
    single_file_config: str | pathlib.Path | None
        For single-file checkpoints: a directory with ``unet/``, ``vae/`` and
        ``text_encoder/`` ``config.json`` files describing the architecture. Default: the
        Stable Diffusion 1.x InstructPix2Pix configs shipped with the package.

    Returns
    -------
    tuple[InstructX2XPipeline, ModelInfo]
        The pipeline on CPU in float32 (call ``.to()``), and the weights' identity.

    Raises
    ------
    FileNotFoundError
        When the path does not exist and hub access is off.
    ModelLoadError
        When the files are incomplete, corrupt, or not an 8-channel InstructPix2Pix model.
    """
    scheduler_instance = make_scheduler(scheduler)
    if str(model) == UNTRAINED_MODEL_NAME:
        pipe = build_untrained_pipeline()
        pipe.scheduler = scheduler_instance
        info = ModelInfo(UNTRAINED_MODEL_NAME, "untrained",
                         hash_modules(pipe.unet, pipe.vae, pipe.text_encoder), False)
        return pipe, info
    path = Path(model).expanduser()
    if path.is_dir():
        pipe, info = _load_directory(path, scheduler_instance)
    elif path.is_file():
        pipe, info = _load_single_file(path, scheduler_instance, single_file_config)
    elif allow_hub and not path.is_absolute() and str(model).count("/") == 1:
        pipe, info = _load_hub(str(model), scheduler_instance)
    else:
        hint = "" if allow_hub else " (hub ids need --allow-hub)"
        raise FileNotFoundError(f"model not found: {model}{hint}.")
    _check_unet(pipe.unet, info.name)
    return pipe, info


def _load_directory(path: Path, scheduler) -> tuple[InstructX2XPipeline, ModelInfo]:
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(f"{path.name} is not a diffusers InstructPix2Pix directory: missing "
                             f"sub-folder(s) {', '.join(missing)}.")
    weight_files = [f for c in COMPONENTS for f in (path / c).iterdir() if f.suffix in WEIGHT_SUFFIXES]
    try:
        unet = UNet2DConditionModel.from_pretrained(path / "unet", local_files_only=True)
        vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True)
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelLoadError(f"cannot load the weights in {path.name}: {error}") from error
    if (path / "tokenizer").is_dir():
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer", local_files_only=True)
    else:
        logger.info("%s has no tokenizer/; using the Stable Diffusion CLIP tokenizer shipped "
                    "with instructx2x.", path.name)
        tokenizer = load_clip_tokenizer()
    pipe = InstructX2XPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=unet, scheduler=scheduler)
    return pipe, ModelInfo(path.name, "directory", hash_files(weight_files, path), True)


def _load_single_file(path: Path, scheduler, config: str | Path | None,
                      ) -> tuple[InstructX2XPipeline, ModelInfo]:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(f"{path.name}: a single-file checkpoint must end in "
                             f"{' or '.join(SINGLE_FILE_SUFFIXES)}.")
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    config_root = resources.files("instructx2x") / "resources" / "sd15_ip2p"
    if config is not None and not Path(config).is_dir():
        raise FileNotFoundError(f"single-file config directory not found: {config}")
    try:
        with resources.as_file(config_root if config is None else Path(config)) as config_dir:
            converted = StableDiffusionInstructPix2PixPipeline.from_single_file(
                str(path), config=str(config_dir), local_files_only=True,
                tokenizer=load_clip_tokenizer(), scheduler=scheduler, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)
    except (OSError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError,
            SingleFileComponentError) as error:
        raise ModelLoadError(f"cannot convert the checkpoint {path.name}: {error}") from error
    pipe = InstructX2XPipeline(vae=converted.vae, text_encoder=converted.text_encoder,
                               tokenizer=converted.tokenizer, unet=converted.unet,
                               scheduler=scheduler)
    return pipe, ModelInfo(path.name, "single_file", hash_files([path], path.parent), True)


def _load_hub(model_id: str, scheduler) -> tuple[InstructX2XPipeline, ModelInfo]:
    logger.warning("Downloading %s from the model hub (--allow-hub).", model_id)
    unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    pipe = InstructX2XPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=unet, scheduler=scheduler)
    return pipe, ModelInfo(model_id, "hub", hash_modules(unet, vae, text_encoder), True)


def _check_unet(unet: UNet2DConditionModel, name: str) -> None:
    in_channels = unet.config.in_channels
    if in_channels != 8 or unet.conv_in.weight.shape[1] != 8:
        raise ModelLoadError(f"{name}: the UNet takes {in_channels} input channels; an "
                             "InstructPix2Pix model needs 8 (4 noisy + 4 image latents).")
