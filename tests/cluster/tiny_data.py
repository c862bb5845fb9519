"""A tiny converted dataset and training settings for the launch tests: 3 studies of 16 slices of
(32 views, 32 bins) Poisson counts, converted with the real `hpc convert`, and overrides that train
a 4-channel UNet on it in seconds on a CPU (thinning-only corruption: no scanner geometry)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

SHAPE = (1, 16, 32, 32)  # (TOF, sinograms, views, bins) per study
STUDIES = ("s0", "s1", "s2")


def make_dataset(root: Path) -> Path:
    """root/dataset (manifest.json + shards); built once, reused when it exists."""
    out = root / "dataset"
    if (out / "manifest.json").exists():
        return out
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    views, bins = np.meshgrid(np.arange(SHAPE[2]), np.arange(SHAPE[3]), indexing="ij")
    for i, study in enumerate(STUDIES):
        # a smooth sinusoid-like band, different per study and per slice, as Poisson counts
        rate = 50 + 40 * np.sin(views / 5.0 + i) * np.exp(-(((bins - 16) / 8.0) ** 2))
        rate = rate[None, None] * np.linspace(0.8, 1.2, SHAPE[1])[None, :, None, None]
        rng.poisson(rate).astype("<u2").tofile(root / f"{study}.raw")
    subprocess.run([sys.executable, "-m", "hpc", "convert", *(str(root / f"{s}.raw") for s in STUDIES),
                    "--shape", ",".join(map(str, SHAPE)), "--dtype", "uint16", "-o", str(out), "--quiet"],
                   check=True, capture_output=True, text=True, timeout=120)
    return out


def train_overrides(dataset: Path, samples: int) -> list[str]:
    """`section.key=value` overrides for a few-second CPU training run on make_dataset()."""
    return [f"data.path={dataset}", "data.train_studies=[s0, s1]", "data.val_studies=[s2]",
            "data.test_studies=[]", "data.batch_size=4", "data.workers=0", "data.context=1",
            "corrupt.dead_blocks=0", "corrupt.dose=0.5", "augment.enabled=false",
            "model.name=unet", "model.base=4", "model.depth=1", "model.inpaint=false",
            f"train.samples={samples}", f"train.val_every={samples // 2}", "train.val_batches=1",
            f"checkpoint.every={samples // 2}", "log.wandb=disabled", "log.progress=false", "log.images=false"]
