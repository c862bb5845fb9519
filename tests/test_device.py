"""The one device resolver (hpc.distributed.device): used by training, the loader, predict,
evaluate and demo. On a GPU machine each local rank gets its own GPU and it becomes current."""
from __future__ import annotations

import pytest
import torch

from hpc.distributed.device import resolve_device
from hpc.errors import ConfigError

from helpers import run_hpc


def test_cpu_and_auto_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU path, also on a GPU machine
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", 3) == torch.device("cpu")
    with pytest.raises(ConfigError, match="--device=cuda but no CUDA device is visible"):
        resolve_device("cuda", what="--device")
    with pytest.raises(ValueError, match="'tpu' is not one of auto, cpu, cuda"):
        resolve_device("tpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (run on the device machine)")
def test_local_rank_picks_the_gpu(monkeypatch):
    n = torch.cuda.device_count()
    monkeypatch.setenv("LOCAL_RANK", str(n))  # wraps around: LOCAL_RANK mod the visible GPUs
    assert resolve_device("auto") == torch.device("cuda", 0) == torch.device("cuda", torch.cuda.current_device())
    assert resolve_device("cuda", n + n - 1) == torch.device("cuda", n - 1)
    assert torch.cuda.current_device() == n - 1


def test_cli_refuses_cuda_without_a_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    r = run_hpc("evaluate", "--checkpoint", tmp_path / "none.pt", "--study", "a", "b", "c", "-o", tmp_path / "ev",
                "--device", "cuda")
    assert r.returncode == 2 and "--device=cuda but no CUDA device is visible" in r.stderr
