"""One small synthetic cohort and one build per test session (both take a few seconds)."""

import pytest

from instructx2x_train.cohort import CohortConfig, generate_cohort
from instructx2x_train.dataset import BuildConfig, build_dataset


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort") / "mimic"
    generate_cohort(root, CohortConfig(patients=30, seed=3, rows=288, columns=256))
    return root


@pytest.fixture(scope="session")
def built(cohort, tmp_path_factory):
    output = tmp_path_factory.mktemp("built") / "dataset"
    config = BuildConfig(mimic_cxr=cohort, diff_vqa=cohort, resolution=128)
    return config, output, build_dataset(config, output)
