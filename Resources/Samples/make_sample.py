"""Make chest_pa.png from the real adult PA chest CR that the PyPI package pydicom-data ships.

RG1_UNCR.dcm (Philips CR, MONOCHROME1, 15-bit, 1955x1841; MIT licence) is the one real chest
radiograph reachable here. The PNG is inverted to MONOCHROME2, windowed to its 0.5-99.5
percentiles and reduced to 640 columns, so the main job runs in seconds.

Usage: python make_sample.py OUTPUT_PNG
"""

import sys
from typing import cast

import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file

dataset = pydicom.dcmread(
    cast(str, get_testdata_file("RG1_UNCR.dcm"))
)  # a path: a Dataset only with read=True
pixels = dataset.pixel_array.astype(np.float64)
if dataset.PhotometricInterpretation == "MONOCHROME1":
    pixels = pixels.max() - pixels
low, high = np.percentile(pixels, (0.5, 99.5))
scaled = np.clip((pixels - low) / (high - low), 0, 1)
image = Image.fromarray((scaled * 255).round().astype(np.uint8))
columns = 640
image = image.resize((columns, round(image.height * columns / image.width)), Image.Resampling.LANCZOS)
image.save(sys.argv[1], optimize=True)
