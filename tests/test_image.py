"""The container recipes, built and run for real (no Docker engine here: buildah, chroot isolation).

containers/Dockerfile is built with `buildah bud --isolation chroot` on a local stand-in for the NGC
base (tests/image/make-base.sh: Debian 12 + Python + the CPU torch wheel), and containers/hpc.def is
built from the same base by following its sections (%files, %post, %environment, %test) with
buildah, as apptainer would (no apptainer package in Debian 12). In both images, as the non-root user,
`hpc --version` answers and a tiny `hpc train` runs on a bind-mounted dataset. The user step works
whether or not the base already has uid 1000 (NGC on Ubuntu 24.04 has `ubuntu`).

Slow the first time on a machine (debootstrap + PyPI downloads, ~10 min); cached afterwards in
$HPC_CI_CACHE (default /var/cache/hpc-ci) and buildah's storage, so a rerun takes about a minute.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, def_sections, require

pytestmark = [pytest.mark.container, pytest.mark.slow]
CACHE = Path(os.environ.get("HPC_CI_CACHE", "/var/cache/hpc-ci"))
MAKE_BASE = ROOT / "tests" / "image" / "make-base.sh"
USER_ID = "uid=1000(hpc) gid=1000(hpc) groups=1000(hpc)"
TIMEOUT = 1800  # a cold build: debootstrap and every wheel from PyPI


def buildah(*args: str, timeout: float = TIMEOUT, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args[:3])}... failed ({r.returncode}):\n"
                             f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def _drop_other_tags(keep: str) -> None:
    """Remove older builds tagged like `keep` (same name up to the content key), so that the cache
    does not grow by an image with every change."""
    prefix = keep[:-12]  # the key is the last 12 hex digits
    for name in buildah("images", "--format", "{{.Name}}:{{.Tag}}", check=False).stdout.split():
        if name.startswith(prefix) and name != keep:
            buildah("rmi", name, check=False)


def _wheels() -> Path:
    """The CPU torch wheel this environment runs (and numpy), with their dependencies, for the base."""
    import numpy
    import torch

    out = CACHE / f"wheels-torch{torch.__version__}-numpy{numpy.__version__}"
    if not (out / "done").exists():
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "-d", str(out),
                            f"torch=={torch.__version__}", f"numpy=={numpy.__version__}"],
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        (out / "done").touch()
    return out


def _base() -> str:
    """The local base image's tag; built by make-base.sh unless this exact one is cached."""
    wheels = _wheels()
    key = hashlib.sha256(MAKE_BASE.read_bytes())
    for name in sorted(p.name for p in wheels.glob("*.whl")):
        key.update(name.encode())
    key.update(Path("/etc/ssl/certs/ca-certificates.crt").read_bytes())
    tag = f"localhost/hpc-ci-base:{key.hexdigest()[:12]}"
    r = subprocess.run(["bash", str(MAKE_BASE), tag, str(wheels)], capture_output=True, text=True,
                       timeout=TIMEOUT, env={**os.environ, "HPC_CI_CACHE": str(CACHE)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    _drop_other_tags(tag)
    return tag


@pytest.fixture(scope="module")
def base() -> str:
    if os.geteuid() != 0:
        require("buildah (as root)", False, "buildah bud/run need root here")
    missing = [t for t in ("buildah", "debootstrap") if shutil.which(t, path=os.environ["PATH"] + ":/usr/sbin") is None]
    require("container tools", not missing, f"missing {', '.join(missing)}: bash tests/cluster/install-system.sh")
    CACHE.mkdir(parents=True, exist_ok=True)
    return _base()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    from cluster.tiny_data import make_dataset

    return make_dataset(tmp_path_factory.getbasetemp() / "launch-data")


class Container:
    """A working container from an image; commands run with chroot isolation."""

    def __init__(self, image: str):
        self.id = buildah("from", "--pull-never", image).stdout.strip().splitlines()[-1]

    def run(self, *cmd: str, user: str = "", volumes: tuple[str, ...] = (), check: bool = True):
        args = ["run", "--isolation", "chroot"] + (["--user", user] if user else [])
        for v in volumes:
            args += ["-v", v]
        return buildah(*args, self.id, "--", *cmd, timeout=900, check=check)

    def remove(self) -> None:
        buildah("rm", self.id, check=False)


def _train_in(image: str, dataset: Path, out: Path, cmd_prefix: tuple[str, ...]) -> Path:
    """A tiny `hpc train` as uid 1000 with the dataset bind-mounted read-only; returns the run dir."""
    from cluster.tiny_data import train_overrides

    out.mkdir(mode=0o777, exist_ok=True)
    out.chmod(0o777)  # the image's user (uid 1000) writes here
    ctr = Container(image)
    try:
        ctr.run(*cmd_prefix, "hpc", "train", "--config", "configs/tiny.yaml",
                *train_overrides(Path("/data"), 16), "corrupt.use_stored_mask=false", "train.run_dir=/out/run",
                user="1000:1000", volumes=(f"{dataset}:/data:ro", f"{out}:/out"))
    finally:
        ctr.remove()
    return out / "run"


def _check_run(run: Path) -> None:
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*.pt")) == ["step-00000008.pt", "step-00000016.pt"]
    assert (run / "metrics.jsonl").stat().st_uid == 1000  # written by the non-root user


# --- the Dockerfile --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def docker_image(base) -> str:
    tag = "localhost/hpc-ci-image:dockerfile"
    buildah("bud", "--isolation", "chroot", "--layers", "--format", "docker", "--pull-never",
            "--build-arg", f"BASE_IMAGE={base}", "-f", "containers/Dockerfile", "-t", tag, ".", cwd=ROOT)
    return tag


def test_dockerfile_image_runs_hpc_as_the_non_root_user(docker_image):
    from hpc import __version__

    cfg = buildah("inspect", "--type", "image", "--format", "{{.Docker.Config.User}} {{.Docker.Config.Entrypoint}}",
                  docker_image).stdout.split()
    assert cfg == ["1000:1000", "[hpc]"]
    ctr = Container(docker_image)
    try:
        assert ctr.run("id", user="1000:1000").stdout.strip() == USER_ID
        assert ctr.run("hpc", "--version", user="1000:1000").stdout.strip() == f"hpc {__version__}"
        # the compiled list-mode kernel where it can cache nowhere (read-only site-packages, no HOME):
        # compiled in the process, and equal to numpy
        out = ctr.run("env", "HOME=/nonexistent", "python3", "-c", LISTMODE_IN_IMAGE, user="1000:1000").stdout
        assert out.split()[-1] == "equal", out
    finally:
        ctr.remove()


LISTMODE_IN_IMAGE = """
import tempfile, numpy as np
from hpc.io import listmode as L
from hpc.io.lmhistogram import DEFAULT_DEVICE, histogram
from hpc.physics import geometry as G, projdata as P
from hpc.simulate.listmode import write_random_listmode
sc = G.get_scanner("mmr")
d = tempfile.mkdtemp()
hdr = L.read_header(write_random_listmode(d + "/scan", P.cti_layout(sc, 1, 60), 20000, np.random.default_rng(0))[0])
(a,), (b,) = histogram(hdr, device="numba", workers=2), histogram(hdr, device="numpy")
assert DEFAULT_DEVICE == "numba" and a.stats == b.stats and a.stats["prompts"] > 0, a.stats
print("equal" if np.array_equal(a.prompts, b.prompts) and np.array_equal(a.delayeds, b.delayeds) else "differ")
"""


def test_dockerfile_image_trains_on_a_bind_mounted_dataset(docker_image, dataset, tmp_path):
    _check_run(_train_in(docker_image, dataset, tmp_path / "out", ()))


# --- the user step on either kind of base ------------------------------------------------------------
@pytest.mark.parametrize("existing", ["", "ubuntu"])
def test_user_step_gives_hpc_uid_1000_with_or_without_an_existing_uid_1000(base, existing):
    ctr = Container(base)
    try:
        buildah("copy", ctr.id, str(ROOT / "containers" / "setup-image.sh"), "/tmp/setup-image.sh")
        if existing:  # like NGC on Ubuntu 24.04
            ctr.run("sh", "-c", f"groupadd -g 1000 {existing} && useradd -m -u 1000 -g 1000 {existing}")
        ctr.run("bash", "/tmp/setup-image.sh", "user")
        assert ctr.run("id", "hpc").stdout.strip() == USER_ID
        assert ctr.run("stat", "-c", "%u %g", "/home/hpc", "/workspace").stdout.split() == ["1000"] * 4
        if existing:
            assert ctr.run("getent", "passwd", existing, check=False).returncode != 0  # renamed, not added
    finally:
        ctr.remove()


# --- the Apptainer definition, followed section by section ------------------------------------------------
@pytest.fixture(scope="module")
def def_image(base, tmp_path_factory) -> str:
    """containers/hpc.def built the way apptainer does it: From (BASE_IMAGE = the local base), %files
    copied, %post run by /bin/sh, %environment for every later command. Cached by content."""
    sec = def_sections(ROOT / "containers" / "hpc.def")
    files = [line.split() for line in sec["files"].splitlines() if line.strip() and not line.lstrip().startswith("#")]
    key = hashlib.sha256((base + sec["post"] + sec["files"]).encode())
    for src, _ in files:
        for p in sorted((ROOT / src).rglob("*")) if (ROOT / src).is_dir() else [ROOT / src]:
            if p.is_file() and "__pycache__" not in p.parts:
                key.update(str(p.relative_to(ROOT)).encode() + p.read_bytes())
    tag = f"localhost/hpc-ci-image:def-{key.hexdigest()[:12]}"
    if buildah("inspect", "--type", "image", tag, check=False).returncode == 0:
        return tag
    assert "{{ BASE_IMAGE }}" in sec["header"]
    stage = tmp_path_factory.mktemp("def-files")  # what %files copies, without __pycache__
    ctr = Container(base)
    try:
        for src, dst in files:
            if (ROOT / src).is_dir():
                shutil.copytree(ROOT / src, stage / src, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                (stage / src).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / src, stage / src)
            buildah("copy", ctr.id, str(stage / src), dst)
        ctr.run("/bin/sh", "-ec", sec["post"])
        buildah("commit", "--quiet", ctr.id, tag)
    finally:
        ctr.remove()
    _drop_other_tags(tag)
    return tag


def test_apptainer_def_image_passes_its_test_and_trains(def_image, dataset, tmp_path):
    from hpc import __version__

    env = def_sections(ROOT / "containers" / "hpc.def")["environment"]
    test = def_sections(ROOT / "containers" / "hpc.def")["test"]
    ctr = Container(def_image)
    try:
        r = ctr.run("/bin/sh", "-ec", f"{env}\n{test}", user="1000:1000")
        assert r.stdout.strip() == f"hpc {__version__}"
    finally:
        ctr.remove()
    _check_run(_train_in(def_image, dataset, tmp_path / "out", ("/bin/sh", "-ec", f'{env}\nexec "$@"', "sh")))
