"""train.ema: the moving average of the weights is the recurrence it claims, is what validation
scores and `hpc predict` runs, survives a resume bitwise, and is refused where it cannot be."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hpc.config import load_config
from hpc.errors import ConfigError
from hpc.repair.inference import load_repairer
from hpc.train import checkpoint as ck
from hpc.train.ema import EMA, inference_weights
from hpc.train.train import train

from helpers import TINY, make_dataset, run_hpc


def net() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))


def test_the_average_follows_its_recurrence_with_the_short_memory_at_the_start():
    model = net()
    ema = EMA(model, decay=0.9)
    expect = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    for n in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))  # a stand-in for an optimizer step
            model[1].running_mean.add_(1.0)
            model[1].num_batches_tracked += 1
        ema.update()
        d = min(0.9, (1 + n) / (10 + n))  # 0.1, 0.18, ... then 0.9
        for k, v in model.state_dict().items():
            if k in expect:
                expect[k] = d * expect[k] + (1 - d) * v
    got = ema.weights()
    for k, v in expect.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)
    assert int(got["1.num_batches_tracked"]) == 30  # integers: as trained, not averaged
    assert ema.updates == 30


def test_applied_swaps_the_average_in_and_restores_the_trained_weights_bitwise():
    model = net()
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    ema.update()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3)
    model.eval()
    with ema.applied():
        assert torch.equal(model[0].weight, ema.weights()["0.weight"])
        assert not torch.equal(model[0].weight, trained["0.weight"])
        out = model(x)
    fresh = net().eval()
    fresh.load_state_dict(ema.weights())
    assert torch.equal(out, fresh(x))  # inside: exactly the network of the saved average
    for k, v in model.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_state_round_trip_and_refusals():
    a, b = EMA(net(), 0.99), EMA(net(), 0.99)
    with torch.no_grad():
        a.model[0].bias.add_(3.0)
    a.update()
    b.load_state_dict(a.state_dict())
    assert b.updates == 1 and all(torch.equal(x, y) for x, y in zip(a.shadow, b.shadow, strict=True))
    other = EMA(torch.nn.Sequential(torch.nn.Linear(5, 2), torch.nn.BatchNorm1d(2)), 0.99)
    with pytest.raises(ValueError, match="0.weight"):
        other.load_state_dict(a.state_dict())
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="EMA decay"):
            EMA(net(), bad)
    assert inference_weights({"model": {"w": 1}, "ema": None}) == {"w": 1}
    assert inference_weights({"model": {"w": 1}, "ema": {"model": {"w": 2}}}) == {"w": 2}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds") / "ds", studies=3, views=16, bins=16, mask=True, counts=True)


def cfg(dataset: Path, run: Path, *extra: str):
    return load_config(TINY, [f"data.path={dataset}", f"train.run_dir={run}", "train.ema=0.9", *extra])


def test_training_validates_saves_and_predicts_with_the_average_and_resumes_it_bitwise(dataset, tmp_path):
    whole = train(cfg(dataset, tmp_path / "whole"))
    state = ck.load(whole["checkpoint"])
    assert state["ema"]["updates"] == 64 // 4 and state["ema"]["decay"] == 0.9  # one per optimizer step
    assert any(not torch.equal(v, state["model"][k]) for k, v in state["ema"]["model"].items())  # an average
    rep = load_repairer(whole["checkpoint"], torch.device("cpu"))  # hpc predict / export / evaluate
    for k, v in rep.model.state_dict().items():
        assert torch.equal(v, state["ema"]["model"][k]), k
    shown = run_hpc("inspect", whole["checkpoint"], check=True).stdout
    assert "runs its moving average (decay 0.9, 16 steps)" in shown
    # the same run stopped at 32 samples and resumed: the average continues exactly
    half = tmp_path / "half"
    train(cfg(dataset, half, "train.samples=32"))
    resumed = ck.load(train(cfg(dataset, half))["checkpoint"])
    assert resumed["ema"]["updates"] == state["ema"]["updates"]
    for k, v in state["ema"]["model"].items():
        assert torch.equal(v, resumed["ema"]["model"][k]), k
    assert resumed["metrics"]["nmse_gap"] == pytest.approx(state["metrics"]["nmse_gap"], rel=1e-6)


def test_the_validated_metrics_are_those_of_the_average(dataset, tmp_path):
    """Same seed and steps with and without the average: the trained weights are identical, the
    validation differs, so the metrics come from the averaged network."""
    plain = ck.load(train(cfg(dataset, tmp_path / "plain", "train.ema=0"))["checkpoint"])
    avg = ck.load(train(cfg(dataset, tmp_path / "avg"))["checkpoint"])
    for k, v in plain["model"].items():
        assert torch.equal(v, avg["model"][k]), k
    assert plain["ema"] is None
    assert avg["metrics"]["nmse_gap"] != plain["metrics"]["nmse_gap"]


def test_turning_the_average_on_in_a_run_without_one_is_one_line(dataset, tmp_path):
    run = tmp_path / "run"
    train(cfg(dataset, run, "train.ema=0", "train.samples=16", "train.val_every=0"))
    r = run_hpc("train", "--config", str(TINY), f"data.path={dataset}", f"train.run_dir={run}", "train.ema=0.99")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "train.ema=0.0 in the run, 0.99 now" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_decay_outside_its_range_is_refused_at_parse_time(dataset, tmp_path):
    with pytest.raises(ConfigError, match=r"train.ema=1.0: must be in \[0, 1\)"):
        cfg(dataset, tmp_path / "r", "train.ema=1.0")
