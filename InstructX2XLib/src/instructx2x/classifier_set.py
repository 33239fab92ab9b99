"""What every classifier set shares: the scored pathologies and races, ``Predictions`` and the
``ClassifierSet`` interface (docs/method.md section 7).

Torch-free, so ``classifiers`` (the cohort networks and ``load_classifiers``) and
``xrv_classifiers`` (torchxrayvision's published models) both build on it without importing
each other.
"""

from __future__ import annotations

import abc
import dataclasses

import numpy as np

__all__ = ["PATHOLOGIES", "FINDING_TO_PATHOLOGY", "RACES", "Predictions", "ClassifierSet"]

# The five pathologies the paper scores (torchxrayvision's names), in this order everywhere.
PATHOLOGIES = ("Atelectasis", "Cardiomegaly", "Edema", "Effusion", "Pneumothorax")
# Instruction findings (the parser's canonical names) that decide one of them.
FINDING_TO_PATHOLOGY = {
    "atelectasis": "Atelectasis",
    "cardiomegaly": "Cardiomegaly",
    "enlargement of the cardiac silhouette": "Cardiomegaly",
    "edema": "Edema",
    "pleural effusion": "Effusion",
    "pneumothorax": "Pneumothorax",
}
# torchxrayvision's RaceModel order, which the cohort classifiers share.
RACES = ("Asian", "Black", "White")


@dataclasses.dataclass(frozen=True)
class Predictions:
    """What a set says about ``N`` images.

    Attributes
    ----------
    findings: numpy.ndarray
        ``(N, 5)`` probabilities in ``PATHOLOGIES`` order; 0.5 is the operating point.
    age: numpy.ndarray
        ``(N,)`` predicted age in years.
    race: numpy.ndarray
        ``(N, 3)`` probabilities in ``RACES`` order.
    features: numpy.ndarray
        ``(N, D)`` pooled features (what FID is computed on).
    sex_female: numpy.ndarray | None
        ``(N,)`` probability of female sex; None when the set has no sex model.
    """

    findings: np.ndarray
    age: np.ndarray
    race: np.ndarray
    features: np.ndarray
    sex_female: np.ndarray | None = None


class ClassifierSet(abc.ABC):
    """A set of classifiers with one ``predict`` for whole films in ``[0, 1]``."""

    name: str
    caveat: str

    @abc.abstractmethod
    def predict(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 32) -> Predictions:
        """Predictions for films of any size (each ``(rows, columns)``, float in ``[0, 1]``)."""

    def describe(self) -> dict:
        """Name and caveat, for reports and manifests."""
        return {"name": self.name, "caveat": self.caveat}
