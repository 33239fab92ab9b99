"""Run one training under ``accelerate launch`` and print this rank's weight hash (test helper)."""

import json
import os
import sys

from instructx2x_train.train import train
from instructx2x_train.train_config import load_config

result = train(load_config(sys.argv[1], sys.argv[2:]), progress_bar=False)
print(
    json.dumps(
        {
            "rank": int(os.environ["RANK"]),
            "world": int(os.environ["WORLD_SIZE"]),
            "unet_sha256": result.unet_sha256,
        }
    ),
    flush=True,
)
