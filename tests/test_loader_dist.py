"""Two real processes under gloo: each rank's loader gets disjoint, equal-sized work every epoch,
reshuffled per epoch, and the ranks agree on the number of batches (no DDP hang)."""
from __future__ import annotations

import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hpc.data import build_loader

from helpers import loader_cfg, make_dataset


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = loader_cfg(root, batch_size=3)
    loader = build_loader(cfg, "train", rank, world, torch.device("cpu"))
    result = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        mine = torch.cat([b.index for b in loader]).tolist()
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"ids": mine, "len": len(loader)})
        result.append(gathered)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # docs/ARCHITECTURE.md "Shutting down": avoids gloo's occasional abort at interpreter exit


def test_two_ranks_disjoint_equal_shards(tmp_path):
    root = make_dataset(tmp_path / "d", studies=3, axial=(9,))  # 27 slices
    out = tmp_path / "ranks.json"
    # fork: the ranks inherit the imported modules (spawn would re-import torch in each)
    mp.start_processes(_rank, args=(2, _free_port(), str(root), str(out)), nprocs=2, start_method="fork")
    epochs = json.loads(out.read_text())
    for ranks in epochs:
        a, b = ranks[0]["ids"], ranks[1]["ids"]
        assert len(a) == len(b) == 12  # 27 // 2 = 13 windows per rank, 4 full batches of 3
        assert ranks[0]["len"] == ranks[1]["len"] == 4
        assert not set(a) & set(b) and len(set(a)) == len(a)
    assert epochs[0][0]["ids"] != epochs[1][0]["ids"]  # reshuffled per epoch
