"""``instructx2x-train train``: fine-tune InstructPix2Pix into InstructX2X (docs/method.md section 6).

One script from a laptop smoke test to the paper's 8-GPU run: accelerate places the models,
runs mixed precision and synchronises gradients (DDP under ``accelerate launch``); this
module owns the recipe. Layout of ``output/``::

    config.json                       the resolved config
    log.csv                           step, loss, lr, grad norm, samples/s, memory
                                      (and TensorBoard events when tensorboard is installed)
    loss.png                          the loss curve, at the end
    validation/step-NNNNNN.png        input | edited | guidance overlay | target per pair
    checkpoints/checkpoint-NNNNNN/    every N steps and at the end (written, then renamed):
        model/                        EMA weights as a diffusers folder with a model card:
                                      ``instructx2x edit --model`` loads it unchanged
        unet/ (text_encoder/)         the raw weights, for resuming
        training_state.pt             optimizer, lr schedule, EMA, step
        config.json
    model/                            the final EMA model (a copy of the last checkpoint's)

Randomness is stateless per step: every draw of step s on rank r comes from a generator
seeded with (seed, s, r, micro-batch), and the data order of epoch e from (seed, e). A
resumed run therefore draws exactly what the uninterrupted one did.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import importlib.util
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from instructx2x.errors import ModelLoadError
from instructx2x.loading import hash_modules, load_pipeline, save_model
from instructx2x.outputs import atomic_output_dir
from instructx2x.pipeline import InstructX2XPipeline
from instructx2x.schedulers import make_scheduler

from .latent_cache import LatentCache
from .objective import PairLatents, change_weights, encode_pair, training_loss
from .pairs import EditPairs, augment_pair
from .train_config import RESUME_COMPATIBLE_KEYS, ConfigError, TrainConfig, config_differences
from .validation import plot_loss, validation_grid, validation_pairs

__all__ = ["train", "TrainResult", "mixed_precision", "latest_checkpoint", "make_ema", "sample_indices"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"


@dataclasses.dataclass
class TrainResult:
    """Where a run ended."""

    output: Path
    model: Path
    steps: int
    final_loss: float
    checkpoints: list[Path]
    unet_sha256: str  # of this process's raw UNet weights: equal on every rank of a DDP run


def train(
    config: TrainConfig,
    resume: str | None = None,
    events: Callable[[dict], None] | None = None,
    progress_bar: bool = True,
) -> TrainResult:
    """Run (or resume) a training run.

    Parameters
    ----------
    config: TrainConfig
        The recipe (``train_config.load_config``).
    resume: str | None
        ``latest`` or a checkpoint folder; its config must match ``config`` except
        ``RESUME_COMPATIBLE_KEYS``.
    events: Callable[[dict], None] | None
        Receives ``step`` and ``checkpoint`` events.
    progress_bar: bool
        A tqdm bar with loss and ETA.

    Raises
    ------
    ConfigError
        Bad settings, dataset, output or resume point (checked before training starts).
    ModelLoadError
        A base model that is not an 8-channel InstructPix2Pix.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    emit = events or (lambda event: None)
    output = Path(config.output)
    accelerator = Accelerator(
        gradient_accumulation_steps=1,
        mixed_precision=mixed_precision(config.precision, fresh_unet_parameters(config)),
        log_with="tensorboard" if importlib.util.find_spec("tensorboard") else None,
        project_dir=str(output),
    )
    try:
        return _train(accelerator, config, resume, emit, progress_bar)
    finally:
        # accelerate keeps one process-wide state (precision, device); forget it so that
        # another run in this process (a notebook, the tests) may choose other settings.
        AcceleratorState._reset_state(reset_partial_state=True)


def _train(accelerator, config: TrainConfig, resume: str | None, emit, progress_bar: bool) -> TrainResult:
    output = Path(config.output)
    config.validate(devices=accelerator.num_processes)
    checkpoint = None
    if resume == "latest" and latest_checkpoint(output) is None and (output / "pretrained-vae").is_dir():
        emit(
            {
                "event": "restart",
                "reason": "stopped before the first checkpoint; the trained autoencoder is kept",
            }
        )
    elif resume:
        checkpoint = _resume_point(output, resume, config)
    elif output.exists() and any(output.iterdir()):
        raise ConfigError(
            f"output folder {output.name} exists; pass --resume latest to continue it or choose a new folder."
        )
    data = EditPairs(config.data.dataset, config.data.split, config.data.resolution)
    if config.data.latent_cache and tuple(data[0]["past"].shape[-2:]) != (config.data.resolution,) * 2:
        raise ConfigError(
            f"data.latent_cache needs the dataset's images at data.resolution "
            f"({config.data.resolution}); they are {tuple(data[0]['past'].shape[-2:])} "
            "(cropping happens in pixel space)."
        )
    if config.optim.weighs_regions:
        data.require_masks()

    pipe = _base_pipeline(config)
    if config.vae_pretraining.steps:
        pipe.vae = _pretrained_vae(accelerator, config, data, output, progress_bar)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = _noise_scheduler(pipe)
    vae.requires_grad_(False)  # frozen, as in the paper (docs/method.md section 6)
    text_encoder.requires_grad_(config.model.train_text_encoder)
    unet.train()
    if config.model.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    trained = [unet] + ([text_encoder] if config.model.train_text_encoder else [])
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(
        parameters,
        lr=config.optim.learning_rate,
        betas=(config.optim.adam_beta1, config.optim.adam_beta2),
        weight_decay=config.optim.adam_weight_decay,
        eps=config.optim.adam_epsilon,
    )
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        config.optim.lr_scheduler,
        optimizer,
        num_warmup_steps=config.optim.lr_warmup_steps,
        num_training_steps=config.steps,
    )
    ema = make_ema(unet, config) if config.ema.enabled else None
    start = 0
    if checkpoint is not None:
        start = _load_checkpoint(checkpoint, trained, optimizer, lr_scheduler, ema)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    if config.model.train_text_encoder:  # wrapped too, so that its gradients are synchronised
        text_encoder = accelerator.prepare(text_encoder)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    cache = (
        LatentCache(
            config.data.latent_cache_dir or output / "latent-cache",
            vae,
            mirrored=config.data.flip_probability > 0,
        )
        if config.data.latent_cache
        else None
    )
    if ema is not None:
        ema.to(accelerator.device)

    pairs = validation_pairs(config) if accelerator.is_main_process else []
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    if accelerator.log_with:
        accelerator.init_trackers("instructx2x")

    def validate(step: int) -> None:
        if accelerator.is_main_process and pairs:
            grid = _validate(
                accelerator.unwrap_model(unet),
                pipe,
                ema,
                pairs,
                output / "validation" / f"step-{step:06d}.png",
                config.seed,
            )
            emit({"event": "validation", "step": step, "path": str(grid)})

    rank, world = accelerator.process_index, accelerator.num_processes
    accumulation = config.batch.gradient_accumulation_steps
    bar = _bar(progress_bar and accelerator.is_main_process, start, config.steps)
    loss_value, checkpoints = math.nan, []
    completed = start  # optimizer steps applied to the weights
    try:
        for step in range(start + 1, config.steps + 1):
            started = time.perf_counter()
            losses = []
            for micro in range(accumulation):
                generator = torch.Generator().manual_seed(_stream(config.seed, step, rank, micro))
                # the frozen VAE encodes in its own precision, as the latent cache does
                latents, instructions, weights = _batch(
                    data, config, step, micro, rank, world, generator, vae, cache
                )
                sync = contextlib.nullcontext() if micro == accumulation - 1 else accelerator.no_sync(unet)
                with sync, accelerator.autocast():
                    loss = training_loss(
                        unet,
                        text_encoder,
                        tokenizer,
                        noise_scheduler,
                        latents,
                        vae.config.scaling_factor,
                        instructions,
                        generator,
                        config.optim.conditioning_dropout_prob,
                        weights,
                    )
                    accelerator.backward(loss / accumulation)
                losses.append(loss.detach())
            grad_norm = accelerator.clip_grad_norm_(parameters, config.optim.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(accelerator.unwrap_model(unet).parameters())
            completed = step
            loss_value = float(accelerator.gather(torch.stack(losses).mean()[None]).mean())
            seconds = time.perf_counter() - started
            record = {
                "step": step,
                "loss": loss_value,
                "lr": lr_scheduler.get_last_lr()[0],
                "grad_norm": float(grad_norm),
                "samples_per_s": config.effective_batch(world) / seconds,
                "memory_gib": _memory_gib(accelerator.device),
            }
            if accelerator.is_main_process and (step % config.log_every == 0 or step == config.steps):
                _log(output / "log.csv", record)
                accelerator.log(record, step=step)
            if config.validation.every and step % config.validation.every == 0 and step != config.steps:
                validate(step)
            emit({"event": "step", **record})
            if bar is not None:
                bar.set_postfix(loss=f"{loss_value:.4f}")
                bar.update(1)
            if step % config.checkpointing.every == 0 or step == config.steps:
                checkpoints.append(
                    _save(accelerator, config, step, pipe, unet, optimizer, lr_scheduler, ema, trained, data)
                )
                emit({"event": "checkpoint", "step": step, "path": str(checkpoints[-1])})
    except KeyboardInterrupt:  # Ctrl-C: a resumable checkpoint of the steps completed
        if completed > start and not (checkpoints and checkpoints[-1].name.endswith(f"{completed:06d}")):
            _save(accelerator, config, completed, pipe, unet, optimizer, lr_scheduler, ema, trained, data)
        raise
    finally:
        if bar is not None:
            bar.close()
    validate(config.steps)
    model = output / "model"
    last = checkpoints[-1] if checkpoints else latest_checkpoint(output)
    assert last is not None  # the last step is checkpointed, by this run or the run it resumes
    if accelerator.is_main_process:
        if model.exists():
            shutil.rmtree(model)
        shutil.copytree(last / "model", model)
        plot_loss(output / "log.csv", output / "loss.png")
    accelerator.wait_for_everyone()
    unet_sha256 = hash_modules(accelerator.unwrap_model(unet))
    accelerator.end_training()  # last: it also ends the process group of a distributed run
    return TrainResult(output, model, config.steps, loss_value, checkpoints, unet_sha256)


def make_ema(unet, config: TrainConfig):
    """diffusers' ``EMAModel`` as the config asks: with warm-up, the decay at optimizer step t
    is min(decay, (1 + t') / (10 + t')) with t' = t - 1 (the first update copies the weights);
    without, it is ``decay`` from the second update on."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        unet.parameters(), decay=config.ema.decay, min_decay=0.0 if config.ema.warmup else config.ema.decay
    )


def latest_checkpoint(output: Path) -> Path | None:
    """The newest complete checkpoint of a run (staging folders are never complete)."""
    folder = Path(output) / CHECKPOINTS
    found = (
        sorted(p for p in folder.glob("checkpoint-*") if (p / STATE_FILE).is_file())
        if folder.is_dir()
        else []
    )
    return found[-1] if found else None


def _stream(seed: int, step: int, rank: int, micro: int) -> int:
    """A distinct, reproducible generator seed per (seed, step, rank, micro-batch)."""
    return (seed * 1_000_003 + step * 10_007 + rank * 101 + micro) % (2**63)


def sample_indices(config: TrainConfig, size: int, step: int, micro: int, rank: int, world: int) -> list[int]:
    """Dataset indices of one rank's micro-batch: consecutive samples of a per-epoch
    permutation, ranks interleaved, so every rank sees different pairs and a step's samples
    never depend on where a run was resumed."""
    per_device, accumulation = config.batch.per_device, config.batch.gradient_accumulation_steps
    first = (((step - 1) * accumulation + micro) * world + rank) * per_device
    indices = []
    for sample in range(first, first + per_device):
        epoch, position = divmod(sample, size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(config.seed + epoch))
        indices.append(int(order[position]))
    return indices


def _batch(
    data: EditPairs,
    config: TrainConfig,
    step: int,
    micro: int,
    rank: int,
    world: int,
    generator: torch.Generator,
    vae,
    cache: LatentCache | None,
) -> tuple[PairLatents, list[str], torch.Tensor | None]:
    """This rank's micro-batch, augmented and encoded (from the latent cache when it is on),
    with its change-region loss weights when the recipe asks for them."""
    latents, instructions, regions = [], [], []
    weighted = config.optim.weighs_regions
    for index in sample_indices(config, len(data), step, micro, rank, world):
        item = data[index]
        region = data.change_region(index, tuple(item["past"].shape[-2:])) if weighted else None
        past, current, instruction, region, flipped = augment_pair(
            item["past"], item["current"], item["instruction"], config.data, generator, region
        )
        if cache is None:
            latents.append(encode_pair(vae, past[None], current[None]))
        else:
            past_path, current_path = data.paths(index)
            latents.append(cache.pair(past_path, item["past"], current_path, item["current"], flipped))
        instructions.append(instruction)
        regions.append(region)
    stacked = PairLatents.stack(latents)
    weights = (
        change_weights(
            torch.stack(regions),
            (stacked.condition.shape[-2], stacked.condition.shape[-1]),
            config.optim.change_region_weight,
            config.optim.mirror_region_weight,
        )
        if weighted
        else None
    )
    return stacked, instructions, weights


def _base_pipeline(config: TrainConfig) -> InstructX2XPipeline:
    if config.model.base != "fresh":
        pipe, _ = load_pipeline(
            config.model.base, scheduler="ddim", single_file_config=config.model.single_file_config or None
        )
        return pipe
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from instructx2x.untrained import load_clip_tokenizer

    fresh = config.model
    if not (fresh.fresh_unet and fresh.fresh_vae and fresh.fresh_text_encoder):
        raise ConfigError("model.base 'fresh' needs model.fresh_unet, fresh_vae and fresh_text_encoder.")
    if fresh.fresh_unet.get("in_channels") != 8:
        raise ModelLoadError("model.fresh_unet.in_channels must be 8 (4 noisy + 4 image latents).")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            unet = UNet2DConditionModel(**fresh.fresh_unet)
            vae = AutoencoderKL(**fresh.fresh_vae)
            text_encoder = CLIPTextModel(CLIPTextConfig(**fresh.fresh_text_encoder))
    except TypeError as error:
        raise ConfigError(f"model.fresh_*: {error}") from None
    return InstructX2XPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=load_clip_tokenizer(),
        unet=unet,
        scheduler=make_scheduler("ddim"),
    )


def _pretrained_vae(accelerator, config: TrainConfig, data: EditPairs, output: Path, progress_bar: bool):
    """The new model's autoencoder, trained once on the dataset's films (OUTPUT/pretrained-vae;
    a resumed run reuses it)."""
    from diffusers import AutoencoderKL

    from .vae_training import train_vae

    folder = output / "pretrained-vae"
    if accelerator.is_main_process and not folder.is_dir():
        output.mkdir(parents=True, exist_ok=True)
        train_vae(data, config.model.fresh_vae, config.vae_pretraining, config.seed, folder, progress_bar)
    accelerator.wait_for_everyone()
    return AutoencoderKL.from_pretrained(folder)


def _noise_scheduler(pipe: InstructX2XPipeline):
    """DDPM on the model's own training schedule (SD 1.x scaled_linear unless it says otherwise)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config({**dict(pipe.scheduler.config), "clip_sample": False})


def mixed_precision(precision: str, unet_parameters: int | None = None) -> str:
    """accelerate's name: bf16/fp16 on GPUs; on CPUs bf16 where the CPU has bf16 instructions
    and the UNet is large enough for it to pay (the rule inference follows,
    ``instructx2x.devices.CPU_BF16_MIN_PARAMETERS``; None: a large UNet), else none."""
    if precision == "fp32":
        return "no"
    if precision != "auto":
        if precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("precision fp16 needs a GPU; use bf16 or fp32 on CPU.")
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    from instructx2x.devices import CPU_BF16_MIN_PARAMETERS, cpu_has_native_bf16

    if not cpu_has_native_bf16():
        return "no"
    return "no" if unet_parameters is not None and unet_parameters < CPU_BF16_MIN_PARAMETERS else "bf16"


def fresh_unet_parameters(config: TrainConfig) -> int | None:
    """The parameters of a ``fresh`` model's UNet, counted without allocating its weights; None
    for a base model read from disk (known only once loaded) or a UNet config that does not build
    (``_base_pipeline`` says why)."""
    if config.model.base != "fresh" or not config.model.fresh_unet:
        return None
    from diffusers import UNet2DConditionModel

    try:
        with torch.device("meta"):
            unet = UNet2DConditionModel(**config.model.fresh_unet)
    except (TypeError, ValueError):
        return None
    return sum(parameter.numel() for parameter in unet.parameters())


def _resume_point(output: Path, resume: str, config: TrainConfig) -> Path:
    checkpoint = latest_checkpoint(output) if resume == "latest" else Path(resume)
    if checkpoint is None or not (checkpoint / STATE_FILE).is_file():
        raise ConfigError(f"no checkpoint to resume at {resume!r} (looked in {output.name}/{CHECKPOINTS}).")
    saved = json.loads((checkpoint / "config.json").read_text())
    differences = [k for k in config_differences(saved, config.to_dict()) if k not in RESUME_COMPATIBLE_KEYS]
    if differences:
        raise ConfigError(
            f"checkpoint {checkpoint.name} was made with another config: "
            f"{', '.join(differences)} differ. Only {', '.join(RESUME_COMPATIBLE_KEYS)} "
            "may change on resume."
        )
    return checkpoint


def _load_checkpoint(checkpoint: Path, trained, optimizer, lr_scheduler, ema) -> int:
    from safetensors.torch import load_file

    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    for module in trained:
        name = _module_name(module)
        module.load_state_dict(
            load_file(checkpoint / name / "diffusion_pytorch_model.safetensors")
            if (checkpoint / name / "diffusion_pytorch_model.safetensors").is_file()
            else load_file(checkpoint / name / "model.safetensors")
        )
    optimizer.load_state_dict(state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    return int(state["step"])


def _module_name(module) -> str:
    from diffusers import UNet2DConditionModel

    return "unet" if isinstance(module, UNet2DConditionModel) else "text_encoder"


def _save(
    accelerator,
    config: TrainConfig,
    step: int,
    pipe,
    unet,
    optimizer,
    lr_scheduler,
    ema,
    trained,
    data: EditPairs,
) -> Path:
    """Write checkpoint-NNNNNN (staging folder, then rename) and keep the last K."""
    accelerator.wait_for_everyone()
    folder = Path(config.output) / CHECKPOINTS / f"checkpoint-{step:06d}"
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(unet)
        with atomic_output_dir(folder) as staging:
            for module in trained:
                (raw if _module_name(module) == "unet" else module).save_pretrained(
                    staging / _module_name(module)
                )
            torch.save(
                {
                    "step": step,
                    "optimizer": optimizer.state_dict(),
                    "lr_scheduler": lr_scheduler.state_dict(),
                    "ema": None if ema is None else ema.state_dict(),
                },
                staging / STATE_FILE,
            )
            (staging / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
            _save_model(staging / "model", config, pipe, raw, ema, step, data)
        for old in sorted((folder.parent).glob("checkpoint-*"))[: -config.checkpointing.keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return folder


def _save_model(folder: Path, config: TrainConfig, pipe, unet, ema, step: int, data: EditPairs) -> None:
    """The EMA weights (the model a user edits with) as a diffusers folder with its card."""
    import copy

    model_unet = copy.deepcopy(unet).eval()
    if ema is not None:
        ema.copy_to(model_unet.parameters())
    model = InstructX2XPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=model_unet.to("cpu", torch.float32),
        scheduler=make_scheduler("ddim", dict(pipe.scheduler.config)),
    )
    card = {
        "name": config.model.name,
        "trained": True,
        "trained_on": f"{Path(config.data.dataset).name} ({len(data)} {config.data.split} pairs), "
        f"{step} steps, effective batch {config.effective_batch()}",
        "resolution": config.data.resolution,
        "intended_use": config.model.intended_use,
    }
    save_model(model, folder, card)


def _validate(unet, pipe, ema, pairs: list[dict], path: Path, seed: int) -> Path:
    """A validation grid with the EMA weights, the training weights put back afterwards."""
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    unet.eval()
    try:
        model = InstructX2XPipeline(
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            unet=unet,
            scheduler=pipe.scheduler,
        )
        return validation_grid(model, pairs, path, seed)
    finally:
        unet.train()
        if ema is not None:
            ema.restore(unet.parameters())


def _log(path: Path, record: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(record))
        if new:
            writer.writeheader()
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in record.items()})


def _memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _bar(enabled: bool, start: int, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="training", unit="step")
