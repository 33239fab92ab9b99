"""The fine-tuning recipe as one typed config: a YAML/TOML file plus ``--set key=value``.

Defaults are the paper's and the authors' (docs/method.md section 6): AdamW at 1e-4 constant, EMA
0.9999, conditioning dropout 0.05, 4,500 steps, checkpoints every 1,500. Every key is known:
an unknown one is an error, never ignored. The resolved config is saved beside every
checkpoint, and a resumed run must match it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from instructx2x.parameters import is_integer

__all__ = [
    "TrainConfig",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "BatchConfig",
    "EMAConfig",
    "CheckpointConfig",
    "ValidationConfig",
    "VAEPretrainingConfig",
    "ConfigError",
    "load_config",
    "RESUME_COMPATIBLE_KEYS",
]


class ConfigError(ValueError):
    """A config file or override that cannot describe a training run."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The MIMIC-EDIT-INSTRUCTION folder (``instructx2x-train build-dataset``) and augmentation."""

    dataset: str = ""
    split: str = "train"
    resolution: int = 512  # the crop the model trains on (the authors' 512)
    rotation_degrees: float = 2.0
    flip_probability: float = 0.5
    # Encode each image once with the frozen VAE (latent_cache.py); needs rotation 0 and images
    # already at ``resolution`` (no crop). Folder: latent_cache_dir, else OUTPUT/latent-cache.
    latent_cache: bool = False
    latent_cache_dir: str = ""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Where the weights start.

    ``base``: a diffusers InstructPix2Pix folder, an original single-file checkpoint
    (``.ckpt``/``.safetensors``, conv_in already 8 channels), ``untrained-tiny``, or
    ``fresh`` for a new architecture whose sizes ``fresh_unet``, ``fresh_vae`` and
    ``fresh_text_encoder`` give (diffusers / transformers config keys).
    """

    base: str = ""
    single_file_config: str = ""  # for a single-file base of another architecture (unet/, vae/, ...)
    fresh_unet: dict = dataclasses.field(default_factory=dict)
    fresh_vae: dict = dataclasses.field(default_factory=dict)
    fresh_text_encoder: dict = dataclasses.field(default_factory=dict)
    train_text_encoder: bool = False  # off for the paper; on for small models from scratch
    gradient_checkpointing: bool = False
    name: str = "instructx2x-finetuned"
    intended_use: str = "research; not for clinical use"


@dataclasses.dataclass(frozen=True)
class VAEPretrainingConfig:
    """For ``model.base: fresh``: train the new autoencoder on the dataset's films first
    (vae_training.py), then freeze it. ``steps`` 0: keep the fresh VAE as built."""

    steps: int = 0
    batch: int = 16
    crop: int = 64  # random square crops (the autoencoder is convolutional)
    learning_rate: float = 1e-3
    kl_weight: float = 1e-6
    gradient_weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW and its schedule (diffusers' names)."""

    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    conditioning_dropout_prob: float = 0.05
    # Extra loss weight on the latent cells where the pair's ground-truth masks say the two
    # films differ (pure counterfactual pairs): w = 1 + change_region_weight * region. 0 is
    # the paper's plain MSE; > 0 needs a dataset with .masks.npz beside its images.
    change_region_weight: float = 0.0
    # Extra loss weight on the change region's mirror image across the film's midline (where
    # the region itself is not): what an edit of the named side must leave alone. Needs masks.
    mirror_region_weight: float = 0.0

    @property
    def weighs_regions(self) -> bool:
        """Whether the loss is weighted by the pairs' ground-truth regions (which need masks)."""
        return self.change_region_weight > 0 or self.mirror_region_weight > 0


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """How the effective batch is reached: per device x devices x accumulation.

    ``effective`` (optional) states the intended total; a run whose product differs is
    refused rather than silently trained with another batch (the paper's is 576).
    """

    per_device: int = 1
    gradient_accumulation_steps: int = 1
    effective: int | None = None


@dataclasses.dataclass(frozen=True)
class EMAConfig:
    """Exponential moving average of the UNet (diffusers' ``EMAModel``); the saved model."""

    enabled: bool = True
    decay: float = 0.9999
    # diffusers' default warm-up: the decay used at step t is min(decay, (1 + t) / (10 + t))
    warmup: bool = True


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every ``every`` steps and at the end; the last ``keep`` stay."""

    every: int = 1500
    keep: int = 3


@dataclasses.dataclass(frozen=True)
class ValidationConfig:
    """Every ``every`` steps (0: only at the end), edit ``pairs`` fixed pairs of ``split``
    with the library's RSE pipeline and the EMA weights; a PNG grid per validation."""

    every: int = 0
    pairs: int = 4
    split: str = "validation"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A whole training run."""

    output: str = ""
    steps: int = 4500
    seed: int = 0
    precision: str = "auto"  # auto, fp32, bf16, fp16 (fp16 on GPUs only)
    log_every: int = 10
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    vae_pretraining: VAEPretrainingConfig = dataclasses.field(default_factory=VAEPretrainingConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    batch: BatchConfig = dataclasses.field(default_factory=BatchConfig)
    ema: EMAConfig = dataclasses.field(default_factory=EMAConfig)
    checkpointing: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    validation: ValidationConfig = dataclasses.field(default_factory=ValidationConfig)

    def validate(self, devices: int = 1) -> None:
        """Refuse settings that cannot train, before any model is built.

        Raises
        ------
        ConfigError
            Naming the key and the value.
        """
        if not self.output:
            raise ConfigError("output is required: the folder for checkpoints and the model.")
        if not self.data.dataset:
            raise ConfigError("data.dataset is required: a folder from instructx2x-train build-dataset.")
        if not self.model.base:
            raise ConfigError(
                "model.base is required: a diffusers folder, a single-file "
                "checkpoint, untrained-tiny or fresh."
            )
        positive = {
            "steps": self.steps,
            "data.resolution": self.data.resolution,
            "batch.per_device": self.batch.per_device,
            "batch.gradient_accumulation_steps": self.batch.gradient_accumulation_steps,
            "checkpointing.every": self.checkpointing.every,
            "checkpointing.keep": self.checkpointing.keep,
            "log_every": self.log_every,
            "validation.pairs": self.validation.pairs,
        }
        for key, value in positive.items():
            if not is_integer(value) or value < 1:
                raise ConfigError(f"{key} must be an integer >= 1, got {value!r}.")
        if self.data.resolution % 8:
            raise ConfigError(f"data.resolution must be a multiple of 8, got {self.data.resolution}.")
        if not 0 <= self.optim.conditioning_dropout_prob <= 1 / 3:
            raise ConfigError(
                "optim.conditioning_dropout_prob must lie in [0, 1/3] (the rule "
                f"uses 3p), got {self.optim.conditioning_dropout_prob}."
            )
        for key in ("change_region_weight", "mirror_region_weight"):
            if not 0 <= getattr(self.optim, key) <= 100:
                raise ConfigError(f"optim.{key} must lie in [0, 100], got {getattr(self.optim, key)}.")
        if not 0 <= self.data.flip_probability <= 1 or self.data.rotation_degrees < 0:
            raise ConfigError("data.flip_probability must lie in [0, 1] and data.rotation_degrees be >= 0.")
        if self.data.latent_cache and self.data.rotation_degrees:
            raise ConfigError(
                "data.latent_cache needs data.rotation_degrees 0 (rotation happens in "
                "pixel space, before the VAE)."
            )
        if not 0 < self.ema.decay < 1:
            raise ConfigError(f"ema.decay must lie in (0, 1), got {self.ema.decay}.")
        if not is_integer(self.validation.every) or self.validation.every < 0:
            raise ConfigError(f"validation.every must be an integer >= 0, got {self.validation.every!r}.")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"precision must be auto, fp32, bf16 or fp16, got {self.precision!r}.")
        pretraining = self.vae_pretraining
        if (
            pretraining.steps < 0
            or pretraining.batch < 1
            or pretraining.learning_rate <= 0
            or pretraining.crop < 8
            or pretraining.crop % 8
        ):
            raise ConfigError(
                "vae_pretraining needs steps >= 0, batch >= 1, learning_rate > 0 and crop a multiple of 8."
            )
        if pretraining.steps and self.model.base != "fresh":
            raise ConfigError(
                "vae_pretraining.steps > 0 trains a new autoencoder: it needs "
                "model.base 'fresh' (a given model keeps its own VAE)."
            )
        if self.optim.learning_rate <= 0:
            raise ConfigError(f"optim.learning_rate must be > 0, got {self.optim.learning_rate}.")
        product = self.batch.per_device * devices * self.batch.gradient_accumulation_steps
        if self.batch.effective is not None and self.batch.effective != product:
            raise ConfigError(
                f"batch.effective is {self.batch.effective} but per_device {self.batch.per_device} "
                f"x {devices} device(s) x accumulation {self.batch.gradient_accumulation_steps} = "
                f"{product}; change one so that they agree (paper: 576 = 8 x 8 x 9)."
            )

    def effective_batch(self, devices: int = 1) -> int:
        """Samples per optimizer step."""
        return self.batch.per_device * devices * self.batch.gradient_accumulation_steps

    def to_dict(self) -> dict:
        """JSON-ready form (saved beside every checkpoint)."""
        return dataclasses.asdict(self)


# A resumed run may differ from its checkpoint only in these (where to stop, how often to save).
RESUME_COMPATIBLE_KEYS = (
    "steps",
    "log_every",
    "checkpointing.every",
    "checkpointing.keep",
    "validation.every",
    "validation.pairs",
)


def _toml_loads(text: str) -> dict:
    """Parse TOML with the standard library's tomllib (Python 3.11+) or tomli, its backport."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    return tomllib.loads(text)


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config and apply ``key=value`` overrides.

    Override values are read as YAML (``optim.learning_rate=5e-5``, ``ema.enabled=false``,
    ``model.fresh_unet={"in_channels": 8}``).

    Raises
    ------
    ConfigError
        An unreadable file, an unknown key, a value of the wrong type.
    """
    import yaml

    loader = _yaml_loader()
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            if path.suffix == ".toml":
                data = _toml_loads(text)
            elif path.suffix in (".yaml", ".yml"):
                data = yaml.load(text, Loader=loader) or {}
            else:
                raise ConfigError(f"{path.name}: a config is .yaml, .yml or .toml.")
        except (yaml.YAMLError, ValueError) as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError(f"{path.name}: cannot parse it ({error}).") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path.name}: the top level must be a mapping.")
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"an override reads key=value, got {override!r}.")
        node = data
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            node = node.setdefault(parent, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {parent!r} is not a section.")
        node[leaf] = yaml.load(value, Loader=loader)
    return _build(TrainConfig, data, "")


def _yaml_loader():
    """PyYAML's safe loader that also reads ``1e-4`` as a float (YAML 1.2 and JSON do; PyYAML's
    YAML 1.1 resolver wants ``1.0e-4``), so a learning rate is never silently a string."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"),
    )
    return Loader


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key(s) {[prefix + k for k in unknown]}; known: "
            f"{sorted(prefix + k for k in fields)}."
        )
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name) if not dataclasses.is_dataclass(fields[name].type) else None
        nested = (
            fields[name].default_factory if fields[name].default_factory is not dataclasses.MISSING else None
        )
        if nested is not None and dataclasses.is_dataclass(nested):
            values[name] = _build(nested, value, f"{prefix}{name}.")
            continue
        values[name] = _coerce(value, default, prefix + name)
    return cls(**values)


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check a value against its default's type (ints are accepted where floats are)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kinds = {
            bool: "true or false",
            int: "an integer",
            float: "a number",
            str: "a string",
            dict: "a mapping",
        }
        raise ConfigError(f"{key} must be {kinds.get(type(default), type(default).__name__)}, got {value!r}.")
    return value


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two resolved configs."""
    keys = sorted(set(saved) | set(current))
    differences = []
    for key in keys:
        a, b = saved.get(key), current.get(key)
        if (
            isinstance(a, dict)
            and isinstance(b, dict)
            and key not in ("fresh_unet", "fresh_vae", "fresh_text_encoder")
        ):
            differences += config_differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            differences.append(prefix + key)
    return differences
