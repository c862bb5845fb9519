"""The trainer's components in process: TrainState (the checkpoint's keys defined once, restored
bit for bit into a fresh trainer) and the Validator (metrics reduced as sums, baselines scored once)."""
from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
import torch

from hpc.baselines.stack import baseline_batch
from hpc.config import load_config
from hpc.train.metrics import MetricAccumulator
from hpc.train.state import KEYS
from hpc.train.train import Trainer

from helpers import TINY, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


def trainer(dataset: Path, run_dir: Path, *overrides: str) -> Trainer:
    cfg = load_config(TINY,
                      [f"data.path={dataset}", f"train.run_dir={run_dir}", "checkpoint.resume=false", *overrides])
    return Trainer(cfg)


def test_state_dict_has_the_checkpoint_keys_in_order(dataset, tmp_path):
    t = trainer(dataset, tmp_path / "run")
    state = t.state.state_dict()
    assert tuple(state) == KEYS
    assert state["data"]["slice_shape"] == [16, 16] and state["step"] == 0 and len(state["rng"]) == 1
    assert state["config"]["data"]["path"] == str(dataset) and state["version"]
    t.log.close()


def test_load_state_dict_restores_a_fresh_trainer_exactly(dataset, tmp_path):
    """Two steps, save (through bytes, weights_only, as a checkpoint file is read); a trainer with
    another seed restores it; from the restored state both take the same next step, bit for bit."""
    a = trainer(dataset, tmp_path / "a")
    batches = a._batches()
    for _ in range(2):
        a.train_step(batches)
        a.state.step += 4
    a.state.best, a.state.metrics = 0.25, {"nmse": 0.25}
    buf = io.BytesIO()
    torch.save(a.state.state_dict(), buf)

    def saved() -> dict:  # a fresh copy each time: a loaded state shares tensors with the optimizer
        return torch.load(io.BytesIO(buf.getvalue()), weights_only=True)

    b = trainer(dataset, tmp_path / "b", "train.seed=7")
    assert not torch.equal(next(iter(a.model.parameters())), next(iter(b.model.parameters())))
    b.state.load_state_dict(saved())
    assert (b.state.step, b.state.best, b.state.metrics) == (8, 0.25, {"nmse": 0.25})
    assert b.loader.state_dict() == a.loader.state_dict()
    losses = []
    for t in (a, b):  # the RNG streams are per process: restore them right before each step
        t.state.load_state_dict(saved())
        losses.append(t.train_step(t._batches()))
    assert losses[0] == losses[1]
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    for s, r in zip(a.optimizer.state.values(), b.optimizer.state.values(), strict=True):
        assert torch.equal(s["exp_avg_sq"], r["exp_avg_sq"])
    a.log.close()
    b.log.close()


def test_improved_follows_best_mode(dataset, tmp_path):
    t = trainer(dataset, tmp_path / "run", "train.best_mode=max")
    assert t.state.best == -math.inf
    assert t.state.improved(0.5) and t.state.best == 0.5
    assert not t.state.improved(0.4) and t.state.best == 0.5
    assert not t.state.improved(math.inf) and t.state.best == 0.5  # never a non-finite best (issue 12)
    t.log.close()


def test_validator_baselines_once_and_metrics_by_hand(dataset, tmp_path):
    """The linear baseline equals baseline_batch on the same batches, scored on the first pass only;
    the model's metrics equal a MetricAccumulator fed the cropped predictions."""
    from hpc.data.preprocess import crop, floor_counts

    t = trainer(dataset, tmp_path / "run", "train.val_batches=0")
    v = t.validator
    t.net.eval()
    metrics, panels = v(t._forward)
    assert set(v.baselines) == {"linear", "biharmonic"} and panels["prediction"].shape == (16, 16)
    model, lin = MetricAccumulator(), MetricAccumulator()
    with torch.no_grad():
        for batch in v.loader:
            pred, _ = t._forward(batch)
            p, tg, m = (crop(x.float(), batch.pad) for x in (pred, batch.target, batch.mask))
            model.update(floor_counts(p, t.cfg.data.normalize, batch.norm), tg, m)
            centre = crop(batch.input[:, 1:2], batch.pad)
            lin.update(floor_counts(baseline_batch("linear", centre, m), t.cfg.data.normalize, batch.norm), tg, m)
    want = MetricAccumulator.compute(model.state())
    for k, val in want.items():
        assert metrics[k] == pytest.approx(val, nan_ok=True), k
    assert v.baselines["linear"] == pytest.approx(MetricAccumulator.compute(lin.state()), nan_ok=True)
    first = v.baselines
    v(t._forward)
    assert v.baselines is first  # not recomputed: the validation set is fixed
    t.log.close()
