"""The pipeline's networks run by OpenVINO on the CPU (``--backend openvino``).

One pipeline, two ways to run its networks: ``OpenVINORuntime`` converts the UNet, the
autoencoder's encoder and decoder and the text encoder with ``openvino.convert_model`` and
puts stand-ins for them into the ``InstructX2XPipeline``, which calls them exactly as it calls
the torch modules. Schedulers, guidance, masks, composite and DICOM stay the pipeline's and the
editor's own code.

- **Shapes.** The UNet and the encoder are converted for the model's own resolution (its
  latent grid fixed, the batch free) and compiled with every dimension fixed for the shape a
  call brings: the three-member guidance batch, the two-member relevance call (docs/method.md
  section 2). The decoder's grid is left free, so that ``--decode mask`` can decode a window;
  the full grid is compiled fixed like the rest.
- **Precision.** A stand-in follows ``Module.to(dtype)`` as a torch module does, so the
  editor's ``--dtype`` and the pipeline's fp32 relevance call (a cast of the UNet to float32 and
  back) pick the compiled model's inference precision: ``f32`` or ``bf16``, set explicitly
  (OpenVINO defaults to bf16 on CPUs that have it). Where OpenVINO's CPU plugin has no bf16
  (no AVX-512 BF16 or AMX, or its kernels capped below them: ``OV_CPU_MAX_ISA`` with
  ``ONEDNN_MAX_CPU_ISA``) it compiles bf16 as f32, and so does this runtime: a bf16 pipeline
  then keeps one f32 UNet for both calls, as an f32 one does. Weights are saved in float32.
- **Cache.** Converting an SD-1.5-size model takes minutes, so the converted models are kept
  in a cache folder (``backends.cache_folder``: ``$INSTRUCTX2X_CACHE/openvino``, else the
  user's cache folder) under a key of the weights' SHA-256 (``ModelInfo.sha256``), the networks' configs,
  the resolution, the weight format and the versions of OpenVINO, torch, diffusers and
  transformers. An entry is written whole (a folder renamed into place) with the size and
  SHA-256 of every file; one that does not match its record, or whose key differs, is never
  used: it is removed and converted again (an entry that cannot be removed is a
  ``ResourceError`` naming it). Entries of the same weights that other versions wrote (an
  OpenVINO update) are named in a warning before the conversion and removed after it; the
  runtime's ``cache`` note (``describe``: the panels show it) says how this load got its
  networks. A new process compiles from the entry (about 12 s
  for both UNets of an SD-1.5-size model); OpenVINO's own compiled-model cache (``CACHE_DIR``)
  is not used: it imported slower than this compiles, held 3 GB more at its peak and took
  7 GB of disk (docs/benchmarks.md section 3), and OpenVINO 2026.4 keys its blobs without the
  inference precision (a bf16 text encoder imported from an f32 blob gave NaN).

``import instructx2x.openvino_runtime`` does not import OpenVINO; only a runtime does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import CACHE_ENV, check_cache_folder
from .errors import ModelLoadError, ParameterError, ResourceError

__all__ = ["EXPORT_FORMAT", "OpenVINORuntime", "cache_key", "entry_problem"]

logger = logging.getLogger(__name__)

# How this module exports the networks; a change of it makes every cache entry stale.
EXPORT_FORMAT = 1
ENTRY_RECORD = "entry.json"
NETWORKS = ("text_encoder", "vae_encoder", "vae_decoder", "unet")
PRECISION_HINTS = {torch.float32: "f32", torch.bfloat16: "bf16"}
_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclasses.dataclass
class _Network:
    """One network as it is exported: the torch module, example inputs and the input shapes
    the converted model keeps (-1: free)."""

    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    shapes: list[list[int]]


class _UNetExport(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor):
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


class _EncoderExport(torch.nn.Module):
    """``AutoencoderKL.encode`` up to the posterior's moments (mean and log-variance)."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vae: Any = self.vae  # diffusers' AutoencoderKL, untyped here
        hidden = vae.encoder(pixels)
        return hidden if vae.quant_conv is None else vae.quant_conv(hidden)


class _DecoderExport(torch.nn.Module):
    """``AutoencoderKL.decode`` of unscaled latents."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        vae: Any = self.vae  # diffusers' AutoencoderKL, untyped here
        if vae.post_quant_conv is not None:
            latents = vae.post_quant_conv(latents)
        return vae.decoder(latents)


class _TextExport(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids)[0]


def _networks(pipeline, resolution: int) -> dict[str, _Network]:
    """The four networks with example inputs for a batch of one at ``resolution``."""
    latent = resolution // pipeline.vae_scale_factor
    channels = pipeline.vae.config.latent_channels
    tokens = pipeline.tokenizer.model_max_length
    width = pipeline.unet.config.cross_attention_dim
    ids = pipeline.tokenizer(["", ""], padding="max_length", max_length=tokens, return_tensors="pt").input_ids
    return {
        "text_encoder": _Network(_TextExport(pipeline.text_encoder), (ids,), [[-1, tokens]]),
        "vae_encoder": _Network(
            _EncoderExport(pipeline.vae),
            (torch.zeros(1, 3, resolution, resolution),),
            [[-1, 3, resolution, resolution]],
        ),
        "vae_decoder": _Network(
            _DecoderExport(pipeline.vae),
            (torch.zeros(1, channels, latent, latent),),
            [[-1, channels, -1, -1]],
        ),
        "unet": _Network(
            _UNetExport(pipeline.unet),
            (
                torch.zeros(3, 2 * channels, latent, latent),
                torch.tensor([500.0]),
                torch.zeros(3, tokens, width),
            ),
            [[-1, 2 * channels, latent, latent], [1], [-1, tokens, width]],
        ),
    }


def _versions() -> dict[str, str]:
    import diffusers
    import openvino
    import transformers

    return {
        "openvino": openvino.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
    }


def _config(value: Any) -> dict:
    """A network's config as JSON, without the private fields (where it was loaded from, which
    values were defaults: the same network either way)."""
    config = value.to_dict() if hasattr(value, "to_dict") else dict(value)
    public = {name: item for name, item in config.items() if not name.startswith("_")}
    return json.loads(json.dumps(public, sort_keys=True, default=str))


def cache_key(pipeline, sha256: str, resolution: int, weights: str = "f32") -> dict:
    """What a cache entry must match to be used: format, weights, configs, resolution, weight
    format and versions."""
    return {
        "format": EXPORT_FORMAT,
        "weights_sha256": sha256,
        "configs": {
            "unet": _config(pipeline.unet.config),
            "vae": _config(pipeline.vae.config),
            "text_encoder": _config(pipeline.text_encoder.config),
            "tokenizer_max_length": int(pipeline.tokenizer.model_max_length),
        },
        "resolution": int(resolution),
        "weights": weights,
        "versions": _versions(),
    }


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _file_record(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def entry_problem(folder: Path, key: dict) -> str | None:
    """Why the cache entry at ``folder`` must not be used for ``key``; None when it is whole
    and made for that key (every file's size and SHA-256 as recorded)."""
    record_path = folder / ENTRY_RECORD
    if not folder.is_dir():
        return "it is not a folder"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"its record {ENTRY_RECORD} is unreadable ({type(error).__name__})"
    if not isinstance(record, dict) or record.get("key") != key:
        written = record.get("key", {}).get("versions") if isinstance(record, dict) else None
        return f"it was written for another key (versions {written})"
    files = record.get("files")
    expected = {f"{name}.{suffix}" for name in NETWORKS for suffix in ("xml", "bin")}
    if not isinstance(files, dict) or set(files) != expected:
        return "its record does not list the converted networks"
    for name, recorded in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != recorded.get("bytes"):
            return f"{name} has {path.stat().st_size} bytes, not {recorded.get('bytes')}"
        if _file_record(path)["sha256"] != recorded.get("sha256"):
            return f"{name} does not match its SHA-256"
    return None


class _CompiledNetwork(torch.nn.Module):
    """A stand-in for one torch network: holds no weights, calls the compiled model.

    Its ``dtype`` follows ``Module.to`` (a buffer carries it), and picks the compiled model's
    inference precision; its outputs come back in that dtype, as a torch module's would.
    """

    def __init__(self, runtime: OpenVINORuntime, config) -> None:
        super().__init__()
        self.runtime = runtime
        self.config = config
        self.register_buffer("precision", torch.zeros((), dtype=torch.float32), persistent=False)

    precision: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def device(self) -> torch.device:
        return self.precision.device

    def _infer(self, network: str, *inputs: np.ndarray, dynamic: bool = False) -> torch.Tensor:
        compiled = self.runtime.compiled(network, self.dtype, [x.shape for x in inputs], dynamic)
        output = compiled(list(inputs))[0]
        return torch.from_numpy(np.array(output, copy=True)).to(self.dtype)


def _array(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().cpu().numpy()


class OpenVINOUNet(_CompiledNetwork):
    """``UNet2DConditionModel.forward`` for the pipeline's calls.

    A call at the model's own precision whose batch is not a multiple of three (the relevance
    call's two members a film, when it runs at the precision of the guidance batch's three) is
    padded with copies of its last member, whose predictions are dropped: one compiled UNet
    serves both calls, where a second would hold another copy of the weights (3.4 GB in f32 at
    SD-1.5 size). Each member's prediction is its own; the padding changes none.
    """

    def forward(self, sample, timestep, encoder_hidden_states, return_dict: bool = True):
        time_array = np.full([1], float(timestep), dtype=np.float32)
        sample, states = _array(sample), _array(encoder_hidden_states)
        count = sample.shape[0]
        same = self.runtime.precision(self.dtype) == self.runtime.precision(self.runtime.model_dtype)
        if same and count % 3:
            extra = 3 - count % 3
            sample = np.concatenate([sample, np.repeat(sample[-1:], extra, axis=0)])
            states = np.concatenate([states, np.repeat(states[-1:], extra, axis=0)])
        output = self._infer("unet", sample, time_array, states)[:count]
        if return_dict:
            from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

            return UNet2DConditionOutput(sample=output)
        return (output,)


class OpenVINOAutoencoder(_CompiledNetwork):
    """``AutoencoderKL.encode`` and ``decode`` for the pipeline's calls."""

    def encode(self, pixels: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(self._infer("vae_encoder", _array(pixels)))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, latents: torch.Tensor, return_dict: bool = True):
        from diffusers.models.autoencoders.vae import DecoderOutput

        grid = self.runtime.resolution // self.runtime.scale_factor
        window = tuple(latents.shape[-2:]) != (grid, grid)  # --decode mask: any window
        decoded = self._infer("vae_decoder", _array(latents), dynamic=window)
        return DecoderOutput(sample=decoded) if return_dict else (decoded,)


class OpenVINOTextEncoder(_CompiledNetwork):
    """``CLIPTextModel`` called on token ids: ``(last_hidden_state,)``."""

    def forward(self, input_ids: torch.Tensor):
        return (self._infer("text_encoder", input_ids.cpu().numpy().astype(np.int64)),)


class OpenVINORuntime:
    """The converted networks of one model at one resolution, compiled as calls need them.

    Parameters
    ----------
    pipeline: InstructX2XPipeline
        The loaded pipeline (float32 torch modules, on the CPU). ``install`` puts the
        stand-ins in place of its networks.
    sha256: str
        The weights' SHA-256 (``ModelInfo.sha256``).
    resolution: int
        The grid the UNet and the encoder are converted for (the model's native one).
    folder: str | pathlib.Path | None
        The cache folder (``backends.cache_folder``); it must be writable.
    name: str
        The model's name, the start of its entry's folder name.

    Attributes
    ----------
    converted: bool
        Whether this load converted the networks (False: they came from the cache).
    cache_note: str
        How: from the cache, converted on first use, or converted again and why.
    entry: pathlib.Path
        The cache entry in use.
    version: str
        OpenVINO's version.

    Raises
    ------
    ModelLoadError
        When a network does not convert (an operation or shape OpenVINO cannot take).
    ResourceError
        When the cache cannot be written (disk full, read-only), or holds an unusable entry
        that cannot be removed.
    """

    def __init__(
        self,
        pipeline,
        sha256: str,
        resolution: int,
        folder: str | Path | None = None,
        name: str = "model",
    ) -> None:
        import openvino

        self.resolution = int(resolution)
        self.scale_factor = int(pipeline.vae_scale_factor)
        self.version = openvino.__version__
        self.core = openvino.Core()
        # BF16 is missing where the CPU lacks it or the kernels are capped below it
        self.bf16 = "BF16" in self.core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
        self.threads = torch.get_num_threads()
        root = check_cache_folder(folder)
        self.key = cache_key(pipeline, sha256, self.resolution)
        safe_name = _UNSAFE_NAME.sub("-", name).strip("-.")[:40] or "model"
        self.entry = root / f"{safe_name}-{self.resolution}px-{_digest(self.key)[:24]}"
        self.converted = False
        self.convert_seconds = 0.0
        self.cache_note = "from the cache"  # how this load got its networks, for the panels
        unusable = None
        if self.entry.exists():
            problem = entry_problem(self.entry, self.key)
            if problem is not None:
                self._set_aside(problem)
                unusable = f"converted again: the cached entry was not usable ({problem})"
        if not self.entry.exists():
            self.cache_note = self._stale_note(root) or unusable or "converted on this first use"
            self._convert(pipeline, root)
        self._compiled: dict[tuple, Any] = {}
        self.compile_seconds = 0.0
        self.model_dtype = torch.float32

    # -- the cache ---------------------------------------------------------------------------
    def _set_aside(self, problem: str) -> None:
        """Remove the entry at ``self.entry``, which must not be used (``problem`` says why).

        Raises
        ------
        ResourceError
            When it cannot be removed (another user's files in a shared cache folder).
        """
        logger.warning(
            "The OpenVINO cache entry %s is not used (%s): converting again.", self.entry.name, problem
        )
        shutil.rmtree(self.entry, ignore_errors=True)
        if self.entry.exists():
            raise ResourceError(
                f"the OpenVINO cache entry {self.entry} is not usable ({problem}) and cannot be removed: "
                f"remove it, set {CACHE_ENV} to a folder of your own, or use --backend torch."
            )

    def _stale_note(self, root: Path) -> str | None:
        """Why this model is converted again although the cache holds it: entries of the same
        weights, resolution and weight format written by other versions (OpenVINO's, torch's...)
        or another export format. Logged as a warning, since the conversion takes minutes; the
        entries are removed once the new one is in place (``_remove_stale``). None when there
        are none."""
        wanted = self.key["versions"]
        others = []
        for key in self._stale_keys(root).values():
            versions = key.get("versions")
            if not isinstance(versions, dict):
                versions = {}
            changed = [
                f"{name} {_release(versions.get(name, '?'))}"
                for name, version in wanted.items()
                if versions.get(name) != version
            ]
            if key.get("format") != EXPORT_FORMAT:
                changed.append(f"export format {key.get('format')}")
            others.append(", ".join(changed) or "other networks' configs")
        if not others:
            return None
        note = (
            f"converted again for OpenVINO {_release(wanted['openvino'])}: the cache held this model converted "
            f"with {'; '.join(sorted(set(others)))}, which is not used"
        )
        logger.warning("%s; converting takes a while, once.", note[0].upper() + note[1:])
        return note

    def _stale_keys(self, root: Path) -> dict[Path, dict]:
        """The entries in ``root`` of the same weights, resolution and weight format whose key
        is not this one, by folder: they are never used again."""
        same = {name: self.key[name] for name in ("weights_sha256", "resolution", "weights")}
        found = {}
        for folder in root.iterdir():
            if folder == self.entry or not folder.is_dir():
                continue
            with contextlib.suppress(OSError, ValueError, AttributeError, KeyError, TypeError):
                key = json.loads((folder / ENTRY_RECORD).read_text(encoding="utf-8"))["key"]
                if all(key.get(name) == value for name, value in same.items()) and key != self.key:
                    found[folder] = key
        return found

    # -- conversion --------------------------------------------------------------------------
    def _convert(self, pipeline, root: Path) -> None:
        import openvino

        started = time.perf_counter()
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{self.entry.name}.partial-"))
        try:
            files = {}
            for name, network in _networks(pipeline, self.resolution).items():
                logger.info("Converting the %s to OpenVINO (once per model and version).", name)
                try:
                    with torch.no_grad(), warnings_quiet():
                        model = openvino.convert_model(
                            network.module.eval(),
                            example_input=network.example,
                            input=[openvino.PartialShape(shape) for shape in network.shapes],
                        )
                except Exception as error:
                    raise ModelLoadError(
                        f"the {name.replace('_', ' ')} does not convert to OpenVINO "
                        f"({type(error).__name__}: {_first_line(error)}); use --backend torch."
                    ) from error
                openvino.save_model(model, staging / f"{name}.xml", compress_to_fp16=False)
                del model
                for suffix in ("xml", "bin"):
                    files[f"{name}.{suffix}"] = _file_record(staging / f"{name}.{suffix}")
            record = {"key": self.key, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (staging / ENTRY_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
            try:
                os.rename(staging, self.entry)
            except OSError as error:
                if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or entry_problem(self.entry, self.key):
                    raise
                logger.info("Another process wrote %s first: using it.", self.entry.name)
        except OSError as error:
            raise ResourceError(
                f"cannot write the OpenVINO cache entry in {root} ({error.strerror or error}): free "
                f"disk space, set {CACHE_ENV} to another folder, or use --backend torch."
            ) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.converted = True
        self.convert_seconds = time.perf_counter() - started
        self._remove_stale(root)

    def _remove_stale(self, root: Path) -> None:
        """Remove the entries of the same weights, resolution and weight format that another
        export format or another version wrote (``_stale_keys``): they are never used again."""
        for folder in self._stale_keys(root):
            logger.info("Removing the stale OpenVINO cache entry %s.", folder.name)
            shutil.rmtree(folder, ignore_errors=True)

    # -- compilation -------------------------------------------------------------------------
    def precision(self, dtype: torch.dtype) -> str:
        """The inference precision a network at ``dtype`` compiles to: ``f32`` or ``bf16``, and
        ``f32`` for bf16 where the CPU plugin has no bf16 (``self.bf16``).

        Raises
        ------
        ParameterError
            For a dtype other than float32 and bfloat16.
        """
        try:
            hint = PRECISION_HINTS[dtype]
        except KeyError:
            raise ParameterError(f"the OpenVINO backend runs fp32 or bf16, not {dtype}.") from None
        return hint if self.bf16 else "f32"

    def compiled_description(self) -> list[dict]:
        """The compiled models of this process: network, input shapes, and the precision,
        threads and streams each runs with, as OpenVINO reports them."""
        return [
            {
                "network": network,
                "shapes": [list(shape) for shape in shapes],
                "precision": model.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                "threads": int(model.get_property("INFERENCE_NUM_THREADS")),
                "streams": int(model.get_property("NUM_STREAMS")),
            }
            for (network, _, shapes), model in self._compiled.items()
        ]

    def compiled(
        self, network: str, dtype: torch.dtype, shapes: list[tuple[int, ...]], dynamic: bool = False
    ):
        """The compiled model of ``network`` for inputs of ``shapes`` at ``dtype``'s precision
        (compiled on first use in this process). ``dynamic`` leaves the spatial dimensions free
        (the decoder's windows)."""
        hint = self.precision(dtype)
        fixed = [tuple(shape[:2]) + (-1,) * (len(shape) - 2) if dynamic else tuple(shape) for shape in shapes]
        key = (network, hint, tuple(fixed))
        if key not in self._compiled:
            import openvino

            started = time.perf_counter()
            model = self.core.read_model(self.entry / f"{network}.xml")
            model.reshape({index: openvino.PartialShape(list(shape)) for index, shape in enumerate(fixed)})
            config = {
                "INFERENCE_PRECISION_HINT": hint,
                "PERFORMANCE_HINT": "LATENCY",
                "INFERENCE_NUM_THREADS": self.threads,
            }
            try:
                self._compiled[key] = self.core.compile_model(model, "CPU", config)
            except RuntimeError as error:
                raise ModelLoadError(
                    f"OpenVINO cannot compile the {network.replace('_', ' ')} for inputs {fixed} "
                    f"({_first_line(error)}); use --backend torch."
                ) from error
            self.compile_seconds += time.perf_counter() - started
        return self._compiled[key]

    # -- the pipeline ------------------------------------------------------------------------
    def install(self, pipeline, dtype: torch.dtype = torch.float32) -> None:
        """Put the stand-ins in place of the pipeline's torch networks (which it then drops);
        ``dtype`` is the precision the pipeline will run at (its ``.to(dtype)``)."""
        self.model_dtype = dtype
        pipeline.unet = OpenVINOUNet(self, pipeline.unet.config)
        pipeline.vae = OpenVINOAutoencoder(self, pipeline.vae.config)
        pipeline.text_encoder = OpenVINOTextEncoder(self, pipeline.text_encoder.config)

    def describe(self) -> dict:
        """For manifests and ``instructx2x info``: version, entry, whether this load converted."""
        return {
            "openvino": self.version,
            "cache_entry": str(self.entry),
            "converted_on_load": self.converted,
            "cache": self.cache_note,
            "threads": self.threads,
        }


def _release(version: Any) -> str:
    """A version as its release number (OpenVINO's carries its build: 2026.4.1-22982-...)."""
    return str(version).split("-")[0]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no reason given"


@contextlib.contextmanager
def warnings_quiet():
    """Tracing warns about every shape-dependent branch of diffusers' code (the shapes are
    fixed by design here): keep those warnings out of the user's view."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield
