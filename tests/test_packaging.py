"""A plain (non-editable) `pip install .` outside the checkout is complete: the sbatch templates,
their partials and the configs ship inside the package (importlib.resources), so `hpc sbatch`,
`hpc demo` and config names work with no repository around (what the container images do)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import ROOT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with hpc installed from a copy of the files the Dockerfile copies. The test
    environment's site-packages are appended through a .pth file (torch & co. already satisfied: no
    downloads); hpc itself comes from the new venv, whose site-packages are searched first."""
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    shutil.copytree(ROOT / "hpc", src / "hpc", ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    venv = base / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(venv / "bin" / "python"), "-c", where], capture_output=True, text=True,
                             check=True).stdout.strip()
    (Path(purelib) / "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check", str(src)],
                       capture_output=True, text=True, timeout=600, env=_env(venv))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    shutil.rmtree(src)  # nothing may still point into the source tree
    return venv


def _env(venv: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HPC_LAUNCH_DIR", "VIRTUAL_ENV")}
    return env | {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"}


def _hpc(venv: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "hpc"), *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd, env=_env(venv))


def test_the_installed_package_is_a_copy_with_its_data(installed):
    r = subprocess.run([str(installed / "bin" / "python"), "-c",
                        "import hpc, importlib.resources as r; print(hpc.__file__); "
                        "print(sorted(p.name for p in (r.files('hpc') / 'configs').iterdir()))"],
                       capture_output=True, text=True, env=_env(installed), cwd="/")
    assert r.returncode == 0, r.stderr
    where, configs = r.stdout.splitlines()
    assert where.startswith(str(installed)) and "site-packages" in where
    assert {"tiny.yaml", "demo.yaml", "dgx.yaml"} <= set(eval(configs))  # noqa: S307 (our own list repr)


@pytest.mark.parametrize("template", ["plain", "dgx", "pyxis"])
def test_sbatch_renders_from_packaged_templates_and_config_names(installed, tmp_path, template):
    image = ["--image", "/images/hpc.sqsh"] if template == "pyxis" else []
    # a --workdir that is not on this machine: rendered without checking data.path there
    r = _hpc(installed, tmp_path, "sbatch", "-t", template, "--print", "--config", "configs/tiny.yaml",
             "--workdir", "/scratch/proj/hpc", *image)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("#!/bin/bash") and "{{" not in r.stdout
    assert "scontrol requeue" in r.stdout and "CONFIG=configs/tiny.yaml" in r.stdout


def test_demo_help_and_its_config_load(installed, tmp_path):
    r = _hpc(installed, tmp_path, "demo", "--help")
    assert r.returncode == 0 and "hpc demo --quick" in r.stdout, r.stderr
    r = subprocess.run([str(installed / "bin" / "python"), "-c",
                        "from hpc.demo import CONFIG; from hpc.config import load_config; "
                        "print(CONFIG.is_file(), load_config(CONFIG).model.name, load_config('tiny').model.name)"],
                       capture_output=True, text=True, env=_env(installed), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0] == "True" and r.stdout.split()[2] == "unet"


def test_an_unknown_config_name_lists_the_shipped_ones(installed, tmp_path):
    r = _hpc(installed, tmp_path, "sbatch", "-t", "plain", "--print", "--config", "nope.yaml")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "nope.yaml: config file not found (shipped with hpc: " in r.stderr and "tiny" in r.stderr
