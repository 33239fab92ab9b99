"""Precomputed VAE latents for a frozen VAE: encode each training image once, not every step.

An entry is keyed by the VAE's weights (hash) and the image file's bytes (hash), so changing
either makes a new entry rather than reusing a stale one. Each entry holds the posterior
(mean, std) of the image and, when the run flips, of its mirror image, so the horizontal flip
keeps working exactly; rotation and cropping happen in pixel space and cannot be cached (the config
refuses the cache with them).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from instructx2x.loading import hash_modules
from instructx2x.outputs import atomic_output_dir

from .objective import PairLatents

__all__ = ["LatentCache"]


class LatentCache:
    """Latent moments of image files under ``folder/<vae hash>/``."""

    def __init__(self, folder: str | Path, vae, mirrored: bool = True) -> None:
        self.vae = vae
        self.mirrored = mirrored  # also encode the mirror image (runs that flip)
        self.folder = Path(folder) / (hash_modules(vae)[:16] + ("" if mirrored else "-unmirrored"))
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def moments(self, path: Path, image: torch.Tensor, flipped: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) ``(1, 4, h, w)`` of ``image`` (the file ``path``, mirrored if ``flipped``)."""
        entry = self.folder / f"{hashlib.sha256(path.read_bytes()).hexdigest()[:24]}"
        if (entry / "moments.pt").is_file():
            self.hits += 1
        else:
            self.misses += 1
            if flipped and not self.mirrored:
                raise ValueError("this latent cache holds no mirror images (made for a run without flips).")
            views = [image, image.flip(-1)] if self.mirrored else [image]
            pixels = torch.stack(views).expand(-1, 3, -1, -1) * 2 - 1
            device = next(self.vae.parameters()).device
            with torch.no_grad():
                posterior = self.vae.encode(pixels.to(device, self.vae.dtype)).latent_dist
            moments = {"mean": posterior.mean.float().cpu(), "std": posterior.std.float().cpu()}
            try:
                with atomic_output_dir(entry) as staging:  # two ranks may race: first one wins
                    torch.save(moments, staging / "moments.pt")
            except FileExistsError:
                pass
        stored = torch.load(entry / "moments.pt", map_location="cpu", weights_only=True)
        index = 1 if flipped else 0
        return stored["mean"][index : index + 1], stored["std"][index : index + 1]

    def pair(
        self, past_path: Path, past: torch.Tensor, current_path: Path, current: torch.Tensor, flipped: bool
    ) -> PairLatents:
        """A pair's latents; the past image's mode is its mean (a Gaussian posterior)."""
        target_mean, target_std = self.moments(current_path, current, flipped)
        condition, _ = self.moments(past_path, past, flipped)
        return PairLatents(target_mean, target_std, condition)
