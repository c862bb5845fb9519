"""Carry DALI's wheels (~195 MiB) to a GPU node in parts, one part per call, each small enough that
it travels with the repository (64 MiB a call), reassembled on the node in an ignored folder. The
calls must follow each other while the node is warm: a warm node keeps ignored folders between
calls, a cold one starts bare (then `receive` reports every part missing again).

Here (once):
    python bench/gpu_wheels.py --dali           # .dali/wheels-cp312/: DALI + what the image lacks
    python bench/dali_parts.py split            # .dali/parts/: part-000..N and manifest.json
Then for each part K, here and then on the node (carrying .dali-carry):
    python bench/dali_parts.py stage K          # .dali-carry/ := part K + the manifest
    python3 bench/dali_parts.py receive         # node: checks it, keeps it in .dali/received/
The call with the last part reassembles and runs the DALI stage in the same command:
    python3 bench/dali_parts.py receive --complete && bash bench/gpu_check.sh --dali --wheels .dali/wheels

`receive` checks each part's SHA-256 against the manifest, and the whole bundle's before unpacking
it into .dali/wheels/. --complete: exit 3 unless every part is there. Bad input: one line, exit 2.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
TRAVEL = 64 * MIB


class PartWriter:
    """A write-only stream cut into files of ``size`` bytes, each hashed as it is written."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.size = folder, size
        self.parts: list[dict] = []
        self.whole = hashlib.sha256()
        self._file = None

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        while view:
            if self._file is None or self.parts[-1]["bytes"] == self.size:
                self._next()
            take = min(len(view), self.size - self.parts[-1]["bytes"])
            self._file.write(view[:take])
            self._hash.update(view[:take])
            self.whole.update(view[:take])
            self.parts[-1]["bytes"] += take
            view = view[take:]
        return len(data)

    def _next(self) -> None:
        self._close_part()
        name = f"part-{len(self.parts):03d}"
        self._file, self._hash = open(self.folder / name, "wb"), hashlib.sha256()
        self.parts.append({"name": name, "bytes": 0})

    def _close_part(self) -> None:
        if self._file is not None:
            self._file.close()
            self.parts[-1]["sha256"] = self._hash.hexdigest()

    def close(self) -> None:
        self._close_part()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MIB):
            h.update(block)
    return h.hexdigest()


def tree_bytes() -> int:
    """Bytes of what travels with every call besides the carried folder (rehearse.py's count)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from rehearse import travelling

    return sum(travelling([])[1:])


def split(args: argparse.Namespace) -> int:
    wheels = sorted(w for d in [args.wheels, *args.also] for w in Path(d).glob("*.whl"))
    if not wheels:
        raise SystemExit(f"dali_parts: no wheels in {args.wheels} (python bench/gpu_wheels.py --dali)")
    tree = tree_bytes()
    if args.part_mib * MIB + tree > TRAVEL:
        raise SystemExit(f"dali_parts: --part-mib {args.part_mib} + the repository's {tree / MIB:.1f} MiB exceed "
                         f"the 64 MiB a call carries")
    shutil.rmtree(args.parts, ignore_errors=True)
    args.parts.mkdir(parents=True)
    out = PartWriter(args.parts, args.part_mib * MIB)
    with tarfile.open(fileobj=out, mode="w|") as tar:  # plain tar: wheels are compressed already
        for w in wheels:
            tar.add(w, arcname=w.name)
    out.close()
    manifest = {"bundle": out.whole.hexdigest(), "bytes": sum(p["bytes"] for p in out.parts),
                "wheels": [w.name for w in wheels], "parts": out.parts}
    (args.parts / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(f"dali_parts: {len(wheels)} wheels, {manifest['bytes'] / MIB:.1f} MiB in {len(out.parts)} parts of at "
          f"most {args.part_mib} MiB in {args.parts}; stage each with: python bench/dali_parts.py stage K")
    return 0


def stage(args: argparse.Namespace) -> int:
    manifest = json.loads((args.parts / "manifest.json").read_text()) if (args.parts / "manifest.json").is_file() \
        else None
    if manifest is None:
        raise SystemExit(f"dali_parts: no {args.parts}/manifest.json (python bench/dali_parts.py split)")
    n = len(manifest["parts"])
    if not 0 <= args.k < n:
        raise SystemExit(f"dali_parts: part {args.k}: there are parts 0 to {n - 1}")
    part = manifest["parts"][args.k]
    shutil.rmtree(args.carry, ignore_errors=True)
    args.carry.mkdir(parents=True)
    shutil.copy2(args.parts / part["name"], args.carry / part["name"])
    shutil.copy2(args.parts / "manifest.json", args.carry / "manifest.json")
    total = (tree_bytes() + part["bytes"]) / MIB
    last = " (the last: receive --complete && bash bench/gpu_check.sh --dali --wheels .dali/wheels)" \
        if args.k == n - 1 else ""
    print(f"dali_parts: part {args.k} of 0-{n - 1} ({part['bytes'] / MIB:.1f} MiB) in {args.carry}; "
          f"{total:.1f} MiB travel with the repository{last}")
    return 0


def assemble(manifest: dict, received: Path, wheels: Path) -> None:
    """Concatenate the parts into the bundle, check it, unpack its wheels into ``wheels``."""
    bundle = received / "bundle.tar"
    with open(bundle, "wb") as out:
        for p in manifest["parts"]:
            with open(received / p["name"], "rb") as f:
                shutil.copyfileobj(f, out, 4 * MIB)
    if sha256(bundle) != manifest["bundle"]:
        bundle.unlink()
        raise SystemExit("dali_parts: the reassembled bundle's SHA-256 differs from the manifest's")
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir(parents=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(wheels, filter="data")
    bundle.unlink()


def receive(args: argparse.Namespace) -> int:
    if not (args.carry / "manifest.json").is_file():
        raise SystemExit(f"dali_parts: no part carried in {args.carry} (carry it: python bench/dali_parts.py stage K)")
    manifest = json.loads((args.carry / "manifest.json").read_text())
    old = args.received / "manifest.json"
    if old.is_file() and json.loads(old.read_text())["bundle"] != manifest["bundle"]:
        shutil.rmtree(args.received)  # parts of another bundle: start over
    args.received.mkdir(parents=True, exist_ok=True)
    for p in manifest["parts"]:
        src = args.carry / p["name"]
        if src.is_file():
            if src.stat().st_size != p["bytes"] or sha256(src) != p["sha256"]:
                raise SystemExit(f"dali_parts: {src} does not match the manifest (size or SHA-256)")
            shutil.copy2(src, args.received / p["name"])
            print(f"dali_parts: received {p['name']} ({p['bytes'] / MIB:.1f} MiB)")
    shutil.copy2(args.carry / "manifest.json", old)
    missing = [p["name"] for p in manifest["parts"]
               if not (args.received / p["name"]).is_file() or (args.received / p["name"]).stat().st_size != p["bytes"]]
    if missing:
        print(f"dali_parts: {len(manifest['parts']) - len(missing)} of {len(manifest['parts'])} parts here; "
              f"missing: {', '.join(missing)}")
        return 3 if args.complete else 0
    if sorted(w.name for w in args.wheels.glob("*.whl")) != sorted(manifest["wheels"]):
        assemble(manifest, args.received, args.wheels)
    print(f"dali_parts: complete: {len(manifest['wheels'])} wheels ({manifest['bytes'] / MIB:.1f} MiB) in "
          f"{args.wheels}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="verb", required=True)
    s = sub.add_parser("split", help="here: the wheels -> parts + manifest")
    s.add_argument("--wheels", type=Path, default=ROOT / ".dali/wheels-cp312")
    s.add_argument("--also", type=Path, action="append", default=[],
                   help="more wheel folders in the bundle (e.g. .gpu-wheels when the node may be cold)")
    s.add_argument("--part-mib", type=int, default=60, help="part size (the repository travels too)")
    s = sub.add_parser("stage", help="here: put part K in the carried folder")
    s.add_argument("k", type=int)
    s = sub.add_parser("receive", help="on the node: keep the carried part; reassemble when complete")
    s.add_argument("--complete", action="store_true", help="exit 3 unless every part is there")
    s.add_argument("--received", type=Path, default=ROOT / ".dali/received")
    s.add_argument("--wheels", type=Path, default=ROOT / ".dali/wheels")
    for s in sub.choices.values():
        s.add_argument("--parts", type=Path, default=ROOT / ".dali/parts")
        s.add_argument("--carry", type=Path, default=ROOT / ".dali-carry")
    args = ap.parse_args(argv)
    if args.verb == "split" and not 1 <= args.part_mib <= 63:
        ap.error(f"--part-mib: 1 to 63, got {args.part_mib}")
    try:
        return {"split": split, "stage": stage, "receive": receive}[args.verb](args)
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
