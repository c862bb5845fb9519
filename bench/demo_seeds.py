"""The demo's verdicts over several seeds: is "the UNet ties reproject" (repair) and "physics wins"
(denoising) a property of the method or of seed 0? Each seed is a whole `hpc demo` (new studies,
new dead blocks, new training), read back from its metrics.json files; the JSON lists per seed each
learned method's ratio to the best baseline with its paired bootstrap 95 % interval, and the
pooled NMSE of every method.

    python bench/demo_seeds.py --seeds 0,1,2 -o /tmp/seeds --json docs/results/demo-seeds.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

TABLES = {"repair": ("eval", "nmse_gap_true"), "denoise": ("eval-denoise", "nmse_all_true")}


def one_seed(out: Path, seed: int) -> dict:
    """Run the demo for ``seed`` (a subprocess: each run starts from a fresh interpreter) and read its verdicts."""
    run = out / f"seed{seed}"
    if not (run / "eval-denoise" / "report.md").is_file():
        env = {**os.environ, "WANDB_MODE": "disabled"}
        subprocess.run([sys.executable, "-m", "hpc", "demo", "--seed", str(seed), "-o", str(run)], check=False,
                       env=env, stdout=subprocess.DEVNULL)
    row = {"seed": seed}
    for task, (folder, metric) in TABLES.items():
        m = json.loads((run / folder / "metrics.json").read_text())
        comp = m["comparison"][metric]
        row[task] = {"metric": metric, "reference": comp["reference"],
                     "nmse": {k: v["nmse"] for k, v in comp["methods"].items()},
                     "unet": {k: comp["methods"]["unet"][k] for k in ("ratio", "low", "high", "verdict")}}
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("-o", "--output", type=Path, required=True, help="one demo directory per seed (reused if complete)")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    rows = [one_seed(args.output, int(s)) for s in args.seeds.split(",")]
    for r in rows:
        print(f"seed {r['seed']}: " + "; ".join(
            f"{t}: unet/{r[t]['reference']} x{r[t]['unet']['ratio']:.3f} [{r[t]['unet']['low']:.3f}, "
            f"{r[t]['unet']['high']:.3f}] {r[t]['unet']['verdict']}" for t in TABLES))
    if args.json:
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
