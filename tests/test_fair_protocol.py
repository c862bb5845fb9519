"""hpc evaluate's fair protocol (docs/EVALUATION.md, "Judging fairly"): free parameters chosen on
validation studies only, refusals, scores of what `hpc predict` writes, verdicts that follow the
bootstrap interval, and a summary that records the choices."""
from __future__ import annotations

import json

import numpy as np
import pytest

from hpc.cli import main
from hpc.evaluate import tuning
from hpc.evaluate.report import protocol_text
from hpc.io.sinogram import write_sinogram
from hpc.registry import BASELINES

from helpers import make_checkpoint, refuse

V, X, S = 16, 16, 4


def toy(stack, planes: np.ndarray, k: int = 1) -> np.ndarray:
    """Gaps filled with 10 k + 0.4 (an integer file stores 10 k: rounding decides its score)."""
    out = stack.y[planes].copy()
    out[stack.w[planes] < 1] = 10.0 * k + 0.4
    return out


@pytest.fixture
def toy_baseline():
    BASELINES.register("toy", order=99, tune={"k": (1, 2)})(toy)
    yield "toy"
    BASELINES.unregister("toy")


def flat_study(tmp_path, name: str, level: float, dtype: str = "<u2") -> list[str]:
    """A study of constant counts ``level`` (file type ``dtype``) with a band of gap bins."""
    target = np.full((S, V, X), level, dtype)
    mask = np.ones((S, V, X), np.uint8)
    mask[:, :, 5:9] = 0
    return [str(write_sinogram(tmp_path / f"{name}_gaps", target * mask, axial_counts=[S])),
            str(write_sinogram(tmp_path / name, target, axial_counts=[S])),
            str(write_sinogram(tmp_path / f"{name}_mask", mask, axial_counts=[S]))]


def evaluate(tmp_path, held: list[list[str]], tune: list[list[str]], *extra: str) -> dict:
    ckpt = tmp_path / "m.pt"
    if not ckpt.exists():
        make_checkpoint(ckpt, slice_shape=(V, X))
    argv = ["evaluate", "--checkpoint", str(ckpt), "-o", str(tmp_path / "ev"), "--baselines", "toy,linear",
            "--no-images", "--quiet", *extra]
    for files in held:
        argv += ["--study", *files]
    for files in tune:
        argv += ["--tune-study", *files]
    assert main(argv) == 0
    return json.loads((tmp_path / "ev" / "metrics.json").read_text())


def test_parameters_are_chosen_on_the_validation_studies_only(tmp_path, toy_baseline, capsys):
    """Validation studies at 10 counts (k = 1 exact), held-out ones at 20 (k = 2 would be exact):
    the chosen k is the validation's, and the held-out studies are scored with it."""
    val = [flat_study(tmp_path, f"v{i}", 10) for i in range(3)]
    held = [flat_study(tmp_path, f"h{i}", 20) for i in range(2)]
    m = evaluate(tmp_path, held, val)
    k = m["tuning"]["params"]["toy"]["k"]
    assert k["value"] == 1 and k["source"] == "tuned"
    assert k["scores"] == {"1": pytest.approx(0.0), "2": pytest.approx(1.0)}  # (20 - 10)^2 / 10^2
    assert sorted(m["tuning"]["studies"]) == ["v0", "v1", "v2"] and m["tuning"]["criterion"] == "nmse_gap_meas"
    assert m["results"]["overall"]["toy"]["nmse_gap_meas"] == pytest.approx(0.25)  # (10 - 20)^2 / 20^2
    assert set(m["comparison"]) == {"nmse_gap_meas", "nmse_all_meas"} and m["recommend"]["method"]
    out = capsys.readouterr().out
    assert "toy.k = 1: tuned on 3 validation studies" in out and "nmse_gap_meas: best" in out


def test_the_bootstrap_can_be_recomputed_from_metrics_json(tmp_path, toy_baseline):
    """metrics.json stores each study's reference energies: squared errors (nmse x energy) give back
    the stored comparison exactly, so a later method can be compared with baselines scored earlier."""
    from hpc.evaluate.protocol import compare

    val = [flat_study(tmp_path, f"v{i}", 10) for i in range(3)]
    held = [flat_study(tmp_path, f"h{i}", level) for i, level in enumerate((12, 20, 31))]
    m = evaluate(tmp_path, held, val, "--baselines", "toy")  # (linear is exact on flat studies: no ratio)
    assert m["energy"]["h1"]["gap_meas"] == pytest.approx(S * V * 4 * 20.0 ** 2)  # the band of 4 gap bins
    per_study = {s: {meth: (m["results"][s][meth]["nmse_gap_meas"] * m["energy"][s]["gap_meas"],
                            m["energy"][s]["gap_meas"]) for meth in ("toy", "unet")}
                 for s in ("h0", "h1", "h2")}
    again, stored = compare(per_study, {"unet"}), m["comparison"]["nmse_gap_meas"]
    assert again["reference"] == stored["reference"] == "toy" and again["best"] == stored["best"]
    for meth, row in stored["methods"].items():
        assert again["methods"][meth] == pytest.approx(row)


def test_given_parameters_are_used_and_recorded_as_given(tmp_path, toy_baseline):
    held = [flat_study(tmp_path, "h0", 20)]
    m = evaluate(tmp_path, held, [], "--param", "toy.k=2")
    assert m["tuning"]["params"]["toy"]["k"] == {"value": 2, "source": "given", "scores": {}}
    assert m["tuning"]["studies"] == [] and m["results"]["overall"]["toy"]["nmse_gap_meas"] == pytest.approx(0.0)


def test_too_few_or_overlapping_tuning_studies_are_refused(tmp_path, toy_baseline, capsys):
    ckpt = tmp_path / "m.pt"
    make_checkpoint(ckpt, slice_shape=(V, X))
    val = [flat_study(tmp_path, f"v{i}", 10) for i in range(3)]
    held = flat_study(tmp_path, "h0", 20)
    base = ["evaluate", "--checkpoint", str(ckpt), "-o", str(tmp_path / "ev"), "--study", *held, "--quiet"]
    refuse(capsys, [*base, "--tune-study", *val[0], "--tune-study", *val[1]], words=["2 validation", "at least 3"])
    refuse(capsys, [*base, *[a for v in val[:2] for a in ("--tune-study", *v)], "--tune-study", *held],
           words=["h0", "held-out"])
    refuse(capsys, [*base, "--param", "toy.k"], words=["BASELINE.NAME=VALUE"])
    refuse(capsys, [*base, "--param", "toy.k=x"], words=["integer"])
    assert not (tmp_path / "ev" / "metrics.json").exists()
    m = evaluate(tmp_path, [held], val[:1], "--allow-few-tune-studies")
    assert m["tuning"]["studies"] == ["v0"]


@pytest.mark.parametrize("dtype, expected", [("<u2", 0.0), ("<f4", (0.4 / 10) ** 2)])
def test_scores_are_of_the_output_as_written(tmp_path, toy_baseline, dtype, expected):
    """The toy fills 10.4 where the truth is 10: a uint16 file stores 10 (NMSE 0), a float32 one 10.4."""
    held = [flat_study(tmp_path, "h0", 10, dtype)]
    m = evaluate(tmp_path, held, [], "--param", "toy.k=1")
    assert m["results"]["overall"]["toy"]["nmse_gap_meas"] == pytest.approx(expected, rel=1e-5, abs=1e-12)


def _comparison(unet_factor: float, spread: float) -> dict:
    rng = np.random.default_rng(1)
    per_study = {}
    for s in range(8):
        base = rng.uniform(1, 2)
        per_study[f"s{s}"] = {"reproject": (base, 10.0), "linear": (3 * base, 10.0),
                              "unet": (unet_factor * base * (1 + rng.uniform(-spread, spread)), 10.0)}
    from hpc.evaluate.protocol import compare
    return {"nmse_gap_true": compare(per_study, set(tuning.LEARNED))}


@pytest.mark.parametrize("factor, spread, word, method", [(0.8, 0.02, "wins", "unet"),
                                                         (1.0, 0.3, "ties", "reproject"),
                                                         (1.3, 0.02, "loses", "reproject")])
def test_verdict_wording_and_command_follow_the_interval(factor, spread, word, method):
    comp = _comparison(factor, spread)
    assert comp["nmse_gap_true"]["methods"]["unet"]["verdict"] == word
    tun = tuning.Tuning(["a", "b", "c"], {"reproject": {"iters": tuning.Choice(6, "tuned", {"4": 0.2, "6": 0.1})}})
    got, command = tuning.predict_command(comp, tun, "best.pt", False)
    assert got == method
    assert command.startswith(f"hpc predict --method {method}")
    assert ("--method-param iters=6" in command) == (method == "reproject")
    rec = {"method": got, "command": command}
    text = protocol_text({"tuning": tun.to_dict(), "comparison": comp, "recommend": rec})
    assert f" {word}" in text and "reproject.iters = 6: tuned on 3 validation studies" in text
    assert f"use: hpc predict --method {method}" in text


def test_candidates_come_from_every_registered_tune_including_whole_study(toy_baseline):
    BASELINES.register("toy3d", order=98, whole_study=True, tune={"iters": (1, 2)})(
        lambda stack, planes, iters=1: stack.y[planes])
    try:
        got = tuning.candidates(["toy", "toy3d", "linear"], {"toy": {"k": 2}})
        assert got == {"toy3d iters=1": ("toy3d", {"iters": 1}), "toy3d iters=2": ("toy3d", {"iters": 2})}
    finally:
        BASELINES.unregister("toy3d")


def test_a_whole_study_baseline_is_tuned_and_run_on_the_whole_study(tmp_path, toy_baseline):
    """A whole_study baseline sees every slice of the study in one call (as `hpc predict` runs it),
    on the tuning studies for each candidate and once per held-out study."""
    calls = []

    def whole(stack, planes, k: int = 1):
        calls.append((len(stack.y), len(planes), k))
        return toy(stack, planes, k)

    BASELINES.register("toywhole", order=97, whole_study=True, tune={"k": (1, 2)})(whole)
    try:
        val = [flat_study(tmp_path, f"v{i}", 20) for i in range(3)]
        held = [flat_study(tmp_path, "h0", 20)]
        m = evaluate(tmp_path, held, val, "--baselines", "toywhole")
    finally:
        BASELINES.unregister("toywhole")
    assert m["tuning"]["params"]["toywhole"]["k"]["value"] == 2
    assert calls == [(S, S, 1), (S, S, 2)] * 3 + [(S, S, 2)]
    assert m["results"]["overall"]["toywhole"]["nmse_gap_meas"] == pytest.approx(0.0)


def test_a_reproject_fill_network_has_its_fill_iterations_tuned(tmp_path, capsys):
    """A data.fill=reproject checkpoint: its fill's OSEM iterations are chosen on the validation
    studies over reproject's candidates (the lowest pooled in-gap NMSE), recorded with the scores,
    and the network is scored and recommended as `hpc predict --method hybrid` runs it; given with
    --param unet.fill_iters=K it is not tuned."""
    from helpers import make_reproject_checkpoint

    sim = tmp_path / "sim"
    assert main(["simulate", "-o", str(sim), "--studies", "4", "--test-studies", "1", "--scanner", "test",
                 "--counts", "2e5", "--dead-blocks", "1", "--seed", "3"]) == 0
    ckpt = make_reproject_checkpoint(tmp_path / "m.pt", fill_iters=4)
    base = ["evaluate", "--checkpoint", str(ckpt), "--simulation", str(sim), "--baselines", "linear", "--no-images",
            "--slices", "2", "--quiet"]
    assert main([*base, "-o", str(tmp_path / "ev"), "--tune-on", "s000,s001,s002"]) == 0
    m = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    net = m["tuning"]["network"]["fill_iters"]
    candidates = BASELINES.meta("reproject")["tune"]["iters"]
    assert net["source"] == "tuned" and set(net["scores"]) == {str(k) for k in candidates}
    assert net["value"] == int(min(net["scores"], key=net["scores"].get))
    assert "unet.fill_iters = " in capsys.readouterr().out
    assert main([*base, "-o", str(tmp_path / "ev2"), "--param", "unet.fill_iters=2"]) == 0
    m2 = json.loads((tmp_path / "ev2" / "metrics.json").read_text())
    assert m2["tuning"]["network"]["fill_iters"] == {"value": 2, "source": "given", "scores": {}}
    tun = tuning.Tuning([], {}, network=tuning.Choice(2, "given"), trained=4)
    assert tun.network_method() == "--method hybrid --method-param iters=2"


def test_a_tuned_value_at_the_largest_candidate_is_flagged():
    from hpc.evaluate.report import _params
    tuning = {"studies": ["a", "b", "c"], "criterion": "nmse_gap_meas", "scores": {},
              "params": {"reproject": {"iters": {"value": 8, "source": "tuned",
                                                 "scores": {"2": 0.3, "4": 0.2, "8": 0.1}}},
                         "toy": {"k": {"value": 4, "source": "tuned", "scores": {"2": 0.3, "4": 0.2, "8": 0.25}}}}}
    lines = _params(tuning)
    assert "optimum may lie beyond" in lines[0] and "optimum may lie beyond" not in lines[1]
