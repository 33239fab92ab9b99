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
import json
import logging
import pickle
import re
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .errors import ModelLoadError, ParameterError
from .parameters import DEMO_MODEL_NAME, MAX_GUIDANCE_SCALE, MAX_RELEVANCE_DRAWS
from .pipeline import InstructX2XPipeline
from .schedulers import make_scheduler
from .untrained import UNTRAINED_MODEL_NAME, build_untrained_pipeline, load_clip_tokenizer

__all__ = [
    "ModelInfo",
    "ModelLoadError",
    "load_pipeline",
    "save_model",
    "hash_modules",
    "hash_files",
    "MODEL_CARD_NAME",
    "demo_model_path",
]

logger = logging.getLogger(__name__)
# diffusers' ModelMixin.to logs this for every dtype cast, also when the model keeps no module
# in float32 (the list it names is then empty, as for every UNet and autoencoder this library
# loads): a notice that asks nothing of the reader.
DIFFUSERS_MODELING_LOGGER = "diffusers.models.modeling_utils"
EMPTY_FP32_NOTICE = re.compile(r"should be kept in float32: \[\]\.")


class _DropEmptyFp32Notice(logging.Filter):
    """Keep diffusers' float32 notice out of view when it names no module to keep."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not EMPTY_FP32_NOTICE.search(record.getMessage())


def _quiet_notices_without_action() -> None:
    """Filter the empty float32 notice from diffusers' modelling logger (once per process).

    Called when a model is loaded, never at import; every other diffusers message, and this
    one when it names modules, still reaches the user.
    """
    diffusers_logger = logging.getLogger(DIFFUSERS_MODELING_LOGGER)
    if not any(isinstance(existing, _DropEmptyFp32Notice) for existing in diffusers_logger.filters):
        diffusers_logger.addFilter(_DropEmptyFp32Notice())


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """The model path does not exist (and is not a hub id the user allowed)."""


SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
COMPONENTS = ("unet", "vae", "text_encoder")
MODEL_CARD_NAME = "model_card.json"
# few_step_solver_steps: the step count a model measured best for DPM-Solver++ / UniPC when
# none is given (the package default is 3, chosen for Stable Diffusion-size models on CPU);
# guidance_scale / image_guidance_scale: the s_T / s_I a model measured best, used when none is
# given (the authors' 7.5 / 1.5 otherwise); relevance_draws: the noise draws averaged into its
# relevance map (the authors' one otherwise); classifiers: the classifier set that measures its
# edits (verification.choose_classifiers)
MODEL_CARD_FIELDS = (
    "name",
    "trained",
    "trained_on",
    "resolution",
    "intended_use",
    "few_step_solver_steps",
    "guidance_scale",
    "image_guidance_scale",
    "relevance_draws",
    "classifiers",
)


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Identity of the loaded weights, recorded in every result.

    Attributes
    ----------
    name: str
        Directory or file name, or ``untrained-tiny``.
    source: str
        ``directory``, ``single_file``, ``hub``, ``bundled`` (the demo model) or ``untrained``.
    sha256: str
        Hash of the weight files (or of the tensors for models built in memory).
    trained: bool | None
        What the model says of itself (its model card's ``trained``): False for random
        weights, whose edits mean nothing; None when the model carries no card.
    card: dict | None
        The model card (``MODEL_CARD_NAME``): name, trained_on, resolution, intended_use.
    scheduler_source: str
        ``model`` when the model's own scheduler/ config set the betas, else ``shipped``.
    """

    name: str
    source: str
    sha256: str
    trained: bool | None
    card: dict | None = None
    scheduler_source: str = "shipped"

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


def load_pipeline(
    model: str | Path,
    *,
    allow_hub: bool = False,
    scheduler: str = "ddim",
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
    ModelNotFoundError
        When the path does not exist and hub access is off.
    ModelLoadError
        When the files are incomplete, corrupt, or not an 8-channel InstructPix2Pix model.
    """
    _quiet_notices_without_action()  # the caller places the pipeline with .to(device, dtype)
    scheduler_instance = make_scheduler(scheduler)
    if str(model) == UNTRAINED_MODEL_NAME:
        pipe = build_untrained_pipeline()
        pipe.scheduler = scheduler_instance
        info = ModelInfo(
            UNTRAINED_MODEL_NAME,
            "untrained",
            hash_modules(pipe.unet, pipe.vae, pipe.text_encoder),
            False,
            {"name": UNTRAINED_MODEL_NAME, "trained": False, "intended_use": "software tests only"},
        )
        return pipe, info
    path = Path(model).expanduser()
    if str(model) == DEMO_MODEL_NAME:
        pipe, info = _load_directory(demo_model_path(), scheduler)
        info = dataclasses.replace(info, name=DEMO_MODEL_NAME, source="bundled")
    elif path.is_dir():
        pipe, info = _load_directory(path, scheduler)
    elif path.is_file():
        pipe, info = _load_single_file(path, scheduler_instance, single_file_config)
    elif allow_hub and not path.is_absolute() and str(model).count("/") == 1:
        pipe, info = _load_hub(str(model), scheduler_instance)
    else:
        hint = "" if allow_hub else " (hub ids need --allow-hub)"
        raise ModelNotFoundError(f"model not found: {Path(str(model)).name}{hint}.")
    _check_components(pipe, info.name)
    return pipe, info


def demo_model_path() -> Path:
    """The bundled demo model's folder (installed with the package).

    Raises
    ------
    ModelNotFoundError
        When this installation lacks it.
    """
    path = Path(str(resources.files("instructx2x") / "resources" / "demo_model"))
    if not (path / "unet").is_dir():
        raise ModelNotFoundError(
            "the bundled demo model is missing from this installation; "
            "reinstall instructx2x or pass --model DIR."
        )
    return path


def save_model(pipe: InstructX2XPipeline, directory: str | Path, card: dict) -> Path:
    """Save a pipeline as a diffusers folder with its model card, loadable by ``load_pipeline``.

    Parameters
    ----------
    pipe: InstructX2XPipeline
        The components to save (the scheduler config goes to ``scheduler/``).
    directory: str | pathlib.Path
        Target folder; must not exist.
    card: dict
        Model card; ``name`` and ``trained`` are required, ``trained_on``, ``resolution`` and
        ``intended_use`` recommended. Travels into every manifest made with the model.

    Raises
    ------
    ParameterError
        When the card lacks a required field or ``trained`` is not a bool.
    OutputExistsError
        When the folder exists.
    """
    from .outputs import atomic_output_dir
    from .provenance import to_json

    if not isinstance(card.get("name"), str) or not isinstance(card.get("trained"), bool):
        raise ParameterError(f"a model card needs 'name' (str) and 'trained' (bool), got {sorted(card)}.")
    directory = Path(directory)
    with atomic_output_dir(directory) as staging:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / MODEL_CARD_NAME).write_text(to_json(card) + "\n")
    return directory


def _load_directory(path: Path, scheduler_name: str) -> tuple[InstructX2XPipeline, ModelInfo]:
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise ModelLoadError(
            f"{path.name} is not a diffusers InstructPix2Pix directory: missing "
            f"sub-folder(s) {', '.join(missing)}."
        )
    card = _read_json(path / MODEL_CARD_NAME, "model card")
    saved_scheduler = _read_json(path / "scheduler" / "scheduler_config.json", "scheduler config")
    scheduler = make_scheduler(scheduler_name, saved_scheduler)
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
        logger.info(
            "%s has no tokenizer/; using the Stable Diffusion CLIP tokenizer shipped with instructx2x.",
            path.name,
        )
        tokenizer = load_clip_tokenizer()
    pipe = InstructX2XPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    trained = None if card is None else card.get("trained")
    if card is None:
        logger.warning(
            "%s has no %s: its name, training data and whether it is trained are unknown to the manifest.",
            path.name,
            MODEL_CARD_NAME,
        )
    elif not isinstance(trained, bool):
        raise ModelLoadError(f"{path.name}/{MODEL_CARD_NAME}: 'trained' must be true or false.")
    for name, most in (("few_step_solver_steps", 1000), ("relevance_draws", MAX_RELEVANCE_DRAWS)):
        count = (card or {}).get(name)
        if count is not None and (
            isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= most
        ):
            raise ModelLoadError(
                f"{path.name}/{MODEL_CARD_NAME}: '{name}' must be an integer in 1..{most}, got {count!r}."
            )
    for name in ("guidance_scale", "image_guidance_scale"):
        scale = (card or {}).get(name)
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, (int, float))
            or not 0 <= scale <= MAX_GUIDANCE_SCALE
        ):
            raise ModelLoadError(
                f"{path.name}/{MODEL_CARD_NAME}: '{name}' must be a number in "
                f"[0, {MAX_GUIDANCE_SCALE:g}], got {scale!r}."
            )
    if not isinstance((card or {}).get("classifiers", ""), str):
        raise ModelLoadError(f"{path.name}/{MODEL_CARD_NAME}: 'classifiers' must name a classifier set.")
    card = None if card is None else {k: card[k] for k in MODEL_CARD_FIELDS if k in card}
    return pipe, ModelInfo(
        path.name,
        "directory",
        hash_files(weight_files, path),
        trained,
        card,
        "model" if saved_scheduler is not None else "shipped",
    )


def _read_json(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path.parent.name}/{path.name}: the {what} is not JSON ({error}).") from None
    if not isinstance(value, dict):
        raise ModelLoadError(f"{path.parent.name}/{path.name}: the {what} must be a JSON object.")
    return value


def _load_single_file(
    path: Path,
    scheduler,
    config: str | Path | None,
) -> tuple[InstructX2XPipeline, ModelInfo]:
    if path.suffix not in SINGLE_FILE_SUFFIXES:
        raise ModelLoadError(
            f"{path.name}: a single-file checkpoint must end in {' or '.join(SINGLE_FILE_SUFFIXES)}."
        )
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    config_root = resources.files("instructx2x") / "resources" / "sd15_ip2p"
    if config is not None and not Path(config).is_dir():
        raise ModelNotFoundError(f"single-file config directory not found: {Path(config).name}")
    try:
        with resources.as_file(config_root if config is None else Path(config)) as config_dir:
            converted = StableDiffusionInstructPix2PixPipeline.from_single_file(
                str(path),
                config=str(config_dir),
                local_files_only=True,
                tokenizer=load_clip_tokenizer(),
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    except (
        OSError,
        ValueError,
        RuntimeError,
        KeyError,
        pickle.UnpicklingError,
        SingleFileComponentError,
    ) as error:
        raise ModelLoadError(f"cannot convert the checkpoint {path.name}: {error}") from error
    pipe = InstructX2XPipeline(
        vae=converted.vae,
        text_encoder=converted.text_encoder,
        tokenizer=converted.tokenizer,
        unet=converted.unet,
        scheduler=scheduler,
    )
    return pipe, ModelInfo(path.name, "single_file", hash_files([path], path.parent), True)


def _load_hub(model_id: str, scheduler) -> tuple[InstructX2XPipeline, ModelInfo]:
    logger.warning("Downloading %s from the model hub (--allow-hub).", model_id)
    unet = UNet2DConditionModel.from_pretrained(model_id, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer")
    pipe = InstructX2XPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler
    )
    return pipe, ModelInfo(model_id, "hub", hash_modules(unet, vae, text_encoder), True)


def _check_components(pipe: InstructX2XPipeline, name: str) -> None:
    """Refuse at load time what would otherwise fail (or run wrongly) at the first edit."""
    unet = pipe.unet
    in_channels = unet.config.in_channels
    if in_channels != 8 or unet.conv_in.weight.shape[1] != 8:
        raise ModelLoadError(
            f"{name}: the UNet takes {in_channels} input channels; an "
            "InstructPix2Pix model needs 8 (4 noisy + 4 image latents)."
        )
    if pipe.vae.config.latent_channels != 4:
        raise ModelLoadError(
            f"{name}: the VAE has {pipe.vae.config.latent_channels} latent channels; the UNet expects 4 + 4."
        )
    width = pipe.text_encoder.config.hidden_size
    if width != unet.config.cross_attention_dim:
        raise ModelLoadError(
            f"{name}: the text encoder is {width} wide but the UNet's cross-"
            f"attention expects {unet.config.cross_attention_dim}; the components "
            "come from different models."
        )
