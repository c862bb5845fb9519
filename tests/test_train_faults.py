"""A distributed run whose peer stops answering or dies ends every surviving rank with one line,
never a hang or a traceback: a rank that hangs (SIGSTOP) makes the others' next collective time out
after dist.timeout_s -> exit 75, so launchers requeue the job; a rank that dies (SIGKILL) makes them
exit 1 ("another rank went away"). Two `hpc train` processes with torch's variables set by hand, so
that no launcher steps in. tests/test_multinode.py cuts a real link between two Slurm nodes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import TINY, hpc_cmd, make_dataset

TIMEOUT_S = 5


def _start_two_ranks(tmp_path: Path) -> list[subprocess.Popen]:
    import socket

    ds = make_dataset(tmp_path / "ds", studies=3, views=16, bins=16, mask=True, counts=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_", "PMI", "WANDB_"))}
    procs = []
    for rank in (0, 1):
        rank_env = env | {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(
            hpc_cmd("train", "--config", TINY, f"data.path={ds}", f"train.run_dir={tmp_path / 'run'}",
                    "train.samples=100000", "log.every=8", f"dist.timeout_s={TIMEOUT_S}"),
            env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not metrics.exists() or not [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["step"] >= 16]:
        assert all(p.poll() is None for p in procs), [p.stderr.read()[-2000:] for p in procs if p.poll() is not None]
        assert time.monotonic() < deadline, "the two ranks did not start training"
        time.sleep(0.1)
    return procs


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_a_hung_or_dead_peer_ends_the_other_rank_with_one_line(tmp_path, fault):
    procs = _start_two_ranks(tmp_path)
    try:
        procs[1].send_signal(signal.SIGSTOP if fault == "hang" else signal.SIGKILL)
        _, err = procs[0].communicate(timeout=TIMEOUT_S + 60)  # ends by itself: no hang
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = [ln for ln in err.splitlines() if ln.startswith("hpc train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert lines[0].startswith("hpc train: error: rank 0 (")
    if fault == "hang":
        assert procs[0].returncode == 75 and f"within dist.timeout_s={TIMEOUT_S}" in lines[0], err[-2000:]
    else:
        assert procs[0].returncode == 1 and "another rank went away" in lines[0], err[-2000:]
