"""torchxrayvision's published classifiers as a ``ClassifierSet`` (SPEC section 7), for real films.

DenseNet-121 (``densenet121-res224-all`` or ``-mimic_ch``) for the five pathologies and the
pooled features, Emory HITI's RaceModel and RIKEN's AgeModel. torchxrayvision downloads a
missing weight file from inside its constructors; this module checks every file first and
refuses with the list of files and the folder they go in, so nothing reaches the network. The
three files lie in torchxrayvision's cache (``~/.torchxrayvision/models_data``) or in one folder
the user names.
torchxrayvision needs torchvision, which the inference library does not: install the
``eval`` extra (docs/evaluation.md says which torch/torchvision pair).
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .classifiers import PATHOLOGIES, RACES, ClassifierSet, Predictions
from .errors import ModelLoadError

__all__ = ["TorchXRayVisionClassifiers", "XRV_CACHE", "RACE_WEIGHTS", "AGE_WEIGHTS", "required_files",
           "torchxrayvision_ready"]

# torchxrayvision's own cache: RaceModel and AgeModel read only this folder.
XRV_CACHE = Path("~/.torchxrayvision/models_data")
RACE_WEIGHTS = "resnet_race_detection_val-loss_0.157_mimic_public.pt"
AGE_WEIGHTS = "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt"
DENSENET_WEIGHTS = ("densenet121-res224-all", "densenet121-res224-mimic_ch")
PATHOLOGY_SIDE, DEMOGRAPHY_SIDE = 224, 320


def _import_xrv():
    try:
        import torchxrayvision
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise ModelLoadError(
            "the torchxrayvision classifiers need torchxrayvision and a torchvision matched to "
            f"torch ({type(error).__name__}: {error}); install the eval extra as docs/evaluation.md "
            "says.") from None
    return torchxrayvision


def torchxrayvision_ready() -> bool:
    """True when torchxrayvision imports and its three default weight files are in its cache."""
    try:
        files = required_files(DENSENET_WEIGHTS[0], XRV_CACHE.expanduser())
    except ModelLoadError:
        return False
    return all(path.is_file() for path in files.values())


def required_files(densenet: str, weights_dir: Path) -> dict[str, Path]:
    """Where each weight file must lie: all three in ``weights_dir``."""
    xrv = _import_xrv()
    return {densenet: weights_dir / os.path.basename(xrv.models.model_urls[densenet]["weights_url"]),
            "RaceModel": weights_dir / RACE_WEIGHTS, "AgeModel": weights_dir / AGE_WEIGHTS}


@contextlib.contextmanager
def _cache_at(folder: Path):
    """Make torchxrayvision's fixed cache path lead to ``folder`` while its constructors run.

    RaceModel and AgeModel take no folder: they read ``~/.torchxrayvision/models_data``, with
    ``~`` from $HOME. For another folder, HOME points for that moment at a temporary home whose
    cache is a link to it; the link is removed afterwards (never the files).
    """
    if folder == XRV_CACHE.expanduser():
        yield
        return
    home = Path(tempfile.mkdtemp(prefix="instructx2x-xrv-"))
    (home / XRV_CACHE.parent.name).mkdir()
    (home / XRV_CACHE.parent.name / XRV_CACHE.name).symlink_to(folder.resolve(), target_is_directory=True)
    previous = os.environ.get("HOME")
    os.environ["HOME"] = str(home)
    try:
        yield
    finally:
        if previous is None:
            del os.environ["HOME"]
        else:
            os.environ["HOME"] = previous
        shutil.rmtree(home)


def _to_xrv_input(xrv, images: list[np.ndarray] | np.ndarray, side: int) -> torch.Tensor:
    """torchxrayvision's own preprocessing: ``[0, 1]`` to its ``[-1024, 1024]`` scale, centre crop
    to a square, resize to ``side``."""
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(side)
    films = [resize(crop(xrv.utils.normalize(np.asarray(image, np.float32), 1.0)[None])) for image in images]
    return torch.from_numpy(np.stack(films))


class TorchXRayVisionClassifiers(ClassifierSet):
    """DenseNet-121 pathologies and features, RaceModel, AgeModel; no sex model."""

    caveat = ("torchxrayvision's published classifiers, trained on real adult chest films: their "
              "figures mean little on phantoms")

    def __init__(self, xrv, densenet, race_model, age_model, densenet_name: str) -> None:
        self.xrv = xrv
        self.densenet, self.race_model, self.age_model = densenet.eval(), race_model.eval(), age_model.eval()
        self.name = f"torchxrayvision ({densenet_name})"
        self.columns = [list(densenet.pathologies).index(name) for name in PATHOLOGIES]
        if list(race_model.targets) != list(RACES):
            raise ModelLoadError(f"RaceModel classes {race_model.targets} are not {list(RACES)}.")

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None,
                     densenet: str = DENSENET_WEIGHTS[0]) -> "TorchXRayVisionClassifiers":
        """Load the three models from files already on disk.

        Raises
        ------
        ModelLoadError
            torchxrayvision cannot be imported, or weight files are missing (all of them are
            listed with the folder each goes in, before any model is built).
        """
        if densenet not in DENSENET_WEIGHTS:
            raise ModelLoadError(f"DenseNet weights {densenet!r} are not one of {DENSENET_WEIGHTS}.")
        folder = Path(weights_dir).expanduser() if weights_dir else XRV_CACHE.expanduser()
        files = required_files(densenet, folder)
        missing = [f"{name}: {path}" for name, path in files.items() if not path.is_file()]
        if missing:
            raise ModelLoadError(
                "torchxrayvision weights are missing, and they are never downloaded here; put "
                "these files (from torchxrayvision's v1 release) where listed: " + "; ".join(missing))
        xrv = _import_xrv()
        # their constructors print progress and warnings on stdout: keep it out of reports
        with contextlib.redirect_stdout(io.StringIO()), _cache_at(folder):
            try:
                models = (xrv.models.DenseNet(weights=densenet, cache_dir=str(folder)),
                          xrv.baseline_models.emory_hiti.RaceModel(),
                          xrv.baseline_models.riken.AgeModel())
            except Exception as error:  # their loaders raise bare Exception on a bad file
                raise ModelLoadError(f"a torchxrayvision weight file cannot be loaded: "
                                     f"{type(error).__name__}: {error}") from None
        return cls(xrv, *models, densenet_name=densenet)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 16) -> Predictions:
        parts: dict[str, list[np.ndarray]] = {"findings": [], "age": [], "race": [], "features": []}
        with contextlib.redirect_stdout(io.StringIO()):
            for start in range(0, len(images), batch_size):
                chunk = images[start:start + batch_size]
                pathology_input = _to_xrv_input(self.xrv, chunk, PATHOLOGY_SIDE)
                demography_input = _to_xrv_input(self.xrv, chunk, DEMOGRAPHY_SIDE)
                parts["findings"].append(self.densenet(pathology_input)[:, self.columns].numpy())
                parts["features"].append(self.densenet.features2(pathology_input).numpy())
                parts["race"].append(self.race_model(demography_input).exp().numpy())
                parts["age"].append(self.age_model(demography_input).reshape(-1).numpy())
        return Predictions(**{key: np.concatenate(value) for key, value in parts.items()})
