"""torchxrayvision's published classifiers as a ``ClassifierSet`` (docs/method.md section 7),
for real films.

DenseNet-121 (``densenet121-res224-all`` or ``-mimic_ch``) for the five pathologies and the
pooled features, Emory HITI's RaceModel and RIKEN's AgeModel. The three files lie in
torchxrayvision's cache (``~/.torchxrayvision/models_data``) or in one folder the user names.

torchxrayvision unpickles the DenseNet file (``torch.load(weights_only=False)``) and loads the
age model with ``torch.jit.load``: loading a file runs code from it. So no file reaches its
loaders unchecked. Every file is first copied into a private temporary folder (in $TMPDIR,
removed after loading) while its SHA-256 is computed; the copy is loaded only when that digest is the pinned one, so a file
planted in (or swapped into) the cache is refused with its name, and what the loaders read is
the verified copy. A file without a pinned digest is refused too, and the message says how
to pin it: a digest file the user names in ``$INSTRUCTX2X_XRV_SHA256`` (``sha256sum``
lines, ``<digest>  <file name>``), which must lie outside the weights folder. torchxrayvision
downloads a missing file from inside its constructors; missing files are refused first, with
the list of files and the folder they go in, so nothing reaches the network.
torchxrayvision needs torchvision, which the inference library does not: install the
``eval`` extra (docs/evaluation.md says which torch/torchvision pair).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .classifier_set import PATHOLOGIES, RACES, ClassifierSet, Predictions
from .errors import ModelLoadError, ResourceError

__all__ = [
    "TorchXRayVisionClassifiers",
    "XRV_CACHE",
    "RACE_WEIGHTS",
    "AGE_WEIGHTS",
    "DENSENET_FILES",
    "PINNED_SHA256",
    "DIGESTS_ENV",
    "required_files",
    "torchxrayvision_ready",
]

# torchxrayvision's own cache: RaceModel and AgeModel read only this folder.
XRV_CACHE = Path("~/.torchxrayvision/models_data")
RACE_WEIGHTS = "resnet_race_detection_val-loss_0.157_mimic_public.pt"
AGE_WEIGHTS = "baseline_models_riken_xray_age_every_model_age_senet154_v2_tl_26_ft_7_fp32.pt"
# each DenseNet's file in torchxrayvision's v1 release (the base name of its model_urls entry)
DENSENET_FILES = {
    "densenet121-res224-all": "nih-pc-chex-mimic_ch-google-openi-kaggle-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
    "densenet121-res224-mimic_ch": "mimic_ch-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt",
}
DENSENET_WEIGHTS = tuple(DENSENET_FILES)
# SHA-256 of the release files this module loads without a digest file of the user's.
# torchxrayvision publishes no digests (neither its v1 release nor its code lists one), so
# a file is pinned here only where public projects that fetched it from the v1 release agree
# on its digest. densenet121-res224-all (28,382,008 bytes): 56524913..., as in
# github.com/25csdaksh/Nidan_AI backend/models/weights/manifest.json (commit da31c06, with
# the release URL and size) and the same in every other public project found that records it.
# The mimic_ch DenseNet, RaceModel and AgeModel have no digest in such a source: they load
# only once the user pins them (DIGESTS_ENV).
PINNED_SHA256 = {
    DENSENET_FILES[
        "densenet121-res224-all"
    ]: "56524913dd16a906422e8d8b66a7a5c46be1d82eb7ac012d8103776f1aa68899",
}
DIGESTS_ENV = "INSTRUCTX2X_XRV_SHA256"
PATHOLOGY_SIDE, DEMOGRAPHY_SIDE = 224, 320
_DIGEST_LINE = re.compile(r"([0-9a-fA-F]{64}) [ *](\S.*)")
_BLOCK = 1 << 20


def _import_xrv():
    try:
        import torchxrayvision
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        raise ModelLoadError(
            "the torchxrayvision classifiers need torchxrayvision and a torchvision matched to "
            f"torch ({type(error).__name__}: {error}); install the eval extra as docs/evaluation.md "
            "says."
        ) from None
    return torchxrayvision


def torchxrayvision_ready() -> bool:
    """True when torchxrayvision imports and its three default weight files are in its cache
    (present; ``TorchXRayVisionClassifiers.from_weights`` checks their digests)."""
    files = required_files(DENSENET_WEIGHTS[0], XRV_CACHE.expanduser())
    if not all(path.is_file() for path in files.values()):
        return False
    try:
        _import_xrv()
    except ModelLoadError:
        return False
    return True


def required_files(densenet: str, weights_dir: Path) -> dict[str, Path]:
    """Where each weight file must lie: all three in ``weights_dir``."""
    return {
        densenet: weights_dir / DENSENET_FILES[densenet],
        "RaceModel": weights_dir / RACE_WEIGHTS,
        "AgeModel": weights_dir / AGE_WEIGHTS,
    }


def _user_digests(weights_dir: Path) -> dict[str, str]:
    """The digests the user pins in the file ``$INSTRUCTX2X_XRV_SHA256`` names (none when unset)."""
    named = os.environ.get(DIGESTS_ENV)
    if not named:
        return {}
    path = Path(named).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"${DIGESTS_ENV} names {path}, which is not a file.")
    if path.resolve().is_relative_to(weights_dir.resolve()):
        raise ModelLoadError(
            f"${DIGESTS_ENV} names {path}, inside the weights folder {weights_dir}: whoever can "
            "put a weight file there could change its digest too; keep the digest file elsewhere."
        )
    digests = {}
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _DIGEST_LINE.fullmatch(line.strip())
        if match is None:
            raise ModelLoadError(
                f"{path.name} line {number}: expected `<SHA-256>  <file name>` as sha256sum prints it."
            )
        digests[os.path.basename(match.group(2))] = match.group(1).lower()
    return digests


def _expected_digests(files: dict[str, Path], weights_dir: Path) -> dict[str, str]:
    """Each file's pinned digest: the user's digest file first, then ``PINNED_SHA256``."""
    pinned = {**PINNED_SHA256, **_user_digests(weights_dir)}
    unpinned = [f"{name}: {path}" for name, path in files.items() if path.name not in pinned]
    if unpinned:
        raise ModelLoadError(
            "these torchxrayvision weight files have no pinned SHA-256, and loading one runs code from it, "
            "so none is loaded: " + "; ".join(unpinned) + ". torchxrayvision publishes no digests: check "
            "each file (`sha256sum FILE`) against a copy or a digest from a source you trust, put the "
            f"lines sha256sum prints into a file outside the weights folder, and name that file in ${DIGESTS_ENV}."
        )
    return {name: pinned[path.name] for name, path in files.items()}


@contextlib.contextmanager
def _verified_cache(files: dict[str, Path], expected: dict[str, str]):
    """A private torchxrayvision cache holding copies of ``files`` whose SHA-256 is ``expected``.

    Yields the cache folder while $HOME points at its temporary home (RaceModel and AgeModel
    take no folder: they read ``~/.torchxrayvision/models_data``). The copies are made while
    hashing, so what the loaders read is what was checked; any mismatch is refused, listing
    every such file, before anything is loaded. HOME and the temporary folder are restored and
    removed afterwards.
    """
    home = Path(tempfile.mkdtemp(prefix="instructx2x-xrv-"))  # mode 0700: this user's only
    try:
        cache = home / XRV_CACHE.parent.name / XRV_CACHE.name
        cache.mkdir(parents=True)
        mismatched = []
        for name, path in files.items():
            digest = _copy_hashing(path, cache / path.name)
            if digest != expected[name]:
                mismatched.append(f"{name}: {path} has SHA-256 {digest}, not the pinned {expected[name]}")
        if mismatched:
            raise ModelLoadError(
                "torchxrayvision weight files that are not the pinned ones are never loaded (a "
                "planted or damaged file): " + "; ".join(mismatched) + "."
            )
        previous = os.environ.get("HOME")
        os.environ["HOME"] = str(home)
        try:
            yield cache
        finally:
            if previous is None:
                del os.environ["HOME"]
            else:
                os.environ["HOME"] = previous
    finally:
        shutil.rmtree(home)


def _copy_hashing(source: Path, copy: Path) -> str:
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as reader, open(copy, "xb") as writer:
            for block in iter(lambda: reader.read(_BLOCK), b""):
                digest.update(block)
                writer.write(block)
    except OSError as error:
        raise ResourceError(
            f"copying {source.name} into a private temporary folder to check it failed: "
            f"{error.strerror or error}."
        ) from None
    return digest.hexdigest()


def _to_xrv_input(xrv, images: list[np.ndarray] | np.ndarray, side: int) -> torch.Tensor:
    """torchxrayvision's own preprocessing: ``[0, 1]`` to its ``[-1024, 1024]`` scale, centre crop
    to a square, resize to ``side``."""
    crop, resize = xrv.datasets.XRayCenterCrop(), xrv.datasets.XRayResizer(side)
    films = [resize(crop(xrv.utils.normalize(np.asarray(image, np.float32), 1.0)[None])) for image in images]
    return torch.from_numpy(np.stack(films))


class TorchXRayVisionClassifiers(ClassifierSet):
    """DenseNet-121 pathologies and features, RaceModel, AgeModel; no sex model."""

    caveat = (
        "torchxrayvision's published classifiers, trained on real adult chest films: their "
        "figures mean little on phantoms"
    )

    def __init__(self, xrv, densenet, race_model, age_model, densenet_name: str) -> None:
        self.xrv = xrv
        self.densenet, self.race_model, self.age_model = densenet.eval(), race_model.eval(), age_model.eval()
        self.name = f"torchxrayvision ({densenet_name})"
        self.columns = [list(densenet.pathologies).index(name) for name in PATHOLOGIES]
        if list(race_model.targets) != list(RACES):
            raise ModelLoadError(f"RaceModel classes {race_model.targets} are not {list(RACES)}.")

    @classmethod
    def from_weights(
        cls, weights_dir: str | Path | None = None, densenet: str = DENSENET_WEIGHTS[0]
    ) -> TorchXRayVisionClassifiers:
        """Load the three models from files already on disk.

        Every file is checked against its pinned SHA-256 (module docstring) before any of
        torchxrayvision's loaders runs, and the loaders read the checked copies.

        Raises
        ------
        ModelLoadError
            torchxrayvision cannot be imported; weight files are missing (all of them are
            listed with the folder each goes in, before any model is built); files have no
            pinned digest (listed, with how to pin them) or not the pinned one (listed with
            both digests); the digest file ``$INSTRUCTX2X_XRV_SHA256`` names is malformed or
            lies in the weights folder; or a checked file still fails to load.
        ResourceError
            The checked copies cannot be written to the temporary folder.
        """
        if densenet not in DENSENET_WEIGHTS:
            raise ModelLoadError(f"DenseNet weights {densenet!r} are not one of {DENSENET_WEIGHTS}.")
        xrv = _import_xrv()
        named = os.path.basename(xrv.models.model_urls[densenet]["weights_url"])
        if named != DENSENET_FILES[densenet]:
            raise ModelLoadError(
                f"this torchxrayvision loads {named} for {densenet}, not the v1 release file "
                f"{DENSENET_FILES[densenet]} that this module checks."
            )
        folder = Path(weights_dir).expanduser() if weights_dir else XRV_CACHE.expanduser()
        files = required_files(densenet, folder)
        missing = [f"{name}: {path}" for name, path in files.items() if not path.is_file()]
        if missing:
            raise ModelLoadError(
                "torchxrayvision weights are missing, and they are never downloaded here; put "
                "these files (from torchxrayvision's v1 release) where listed: " + "; ".join(missing)
            )
        expected = _expected_digests(files, folder)
        # their constructors print progress and warnings on stdout: keep it out of reports
        with _verified_cache(files, expected) as cache, contextlib.redirect_stdout(io.StringIO()):
            try:
                models = (
                    xrv.models.DenseNet(weights=densenet, cache_dir=str(cache)),
                    xrv.baseline_models.emory_hiti.RaceModel(),
                    xrv.baseline_models.riken.AgeModel(),
                )
            except Exception as error:  # noqa: BLE001 - their loaders raise bare Exception on a bad file
                raise ModelLoadError(
                    f"a torchxrayvision weight file cannot be loaded: {type(error).__name__}: {error}"
                ) from None
        return cls(xrv, *models, densenet_name=densenet)

    @torch.no_grad()
    def predict(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 16) -> Predictions:
        parts: dict[str, list[np.ndarray]] = {"findings": [], "age": [], "race": [], "features": []}
        with contextlib.redirect_stdout(io.StringIO()):
            for start in range(0, len(images), batch_size):
                chunk = images[start : start + batch_size]
                pathology_input = _to_xrv_input(self.xrv, chunk, PATHOLOGY_SIDE)
                demography_input = _to_xrv_input(self.xrv, chunk, DEMOGRAPHY_SIDE)
                parts["findings"].append(self.densenet(pathology_input)[:, self.columns].numpy())
                parts["features"].append(self.densenet.features2(pathology_input).numpy())
                parts["race"].append(self.race_model(demography_input).exp().numpy())
                parts["age"].append(self.age_model(demography_input).reshape(-1).numpy())
        return Predictions(**{key: np.concatenate(value) for key, value in parts.items()})
