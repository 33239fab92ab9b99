"""Regenerate the approximate prior set shipped in the package (no MS-CXR needed).

Usage: python make_default_priors.py OUTPUT_DIR
"""

import sys
from pathlib import Path

from instructx2x.priors import PUBLISHED_MASK_EXTENTS, approximate_prior, write_prior_set

SOURCE = (
    "Approximation: a superellipse per category inscribed in the published extent of "
    "the authors' MS-CXR masks, sized to their published coverage (docs/method.md section 3). "
    "Rebuild the exact set with `instructx2x-train pseudo-masks`."
)

if __name__ == "__main__":
    masks = {c: approximate_prior(*spec) for c, spec in PUBLISHED_MASK_EXTENTS.items()}
    write_prior_set(Path(sys.argv[1]), masks, version="approx-v1", source=SOURCE)
