"""The fair protocol of `hpc evaluate` (docs/EVALUATION.md, "Judging fairly"): every method's free
parameters chosen on validation studies, never on the held-out ones, and the held-out verdicts read
from paired bootstrap intervals.

- Free parameters: each registered baseline's ``tune`` candidates (hpc.registry.BASELINES metadata,
  whole_study baselines included), every combination scored on the tuning studies by one criterion,
  ``CRITERION`` (in-gap NMSE against the measured target, pooled over the tuning studies' pixels),
  the lowest chosen. A value given on the command line (``--param reproject.iters=6``,
  ``--reproject-iters``) is used as given and recorded so; without tuning studies a value comes
  from the checkpoint's validation (metric ``<baseline>_<param>``), else the baseline's default.
  The network: a ``data.fill=reproject`` checkpoint's fill iterations are tuned alike, over
  reproject's candidates (the network then runs as `hpc predict --method hybrid --method-param
  iters=K`); given with ``--param unet.fill_iters=K``; otherwise the checkpoint runs as trained.
- Verdicts: per NMSE metric, every method's ratio to the best baseline on the held-out studies with a
  paired bootstrap interval (hpc.evaluate.protocol.compare); "wins" / "loses" only where it excludes 1.

    given = parse_param_items(["reproject.iters=6"], ["reproject", "linear"])
    tuned = choose(baselines, given, checkpoint_metrics, ["s1", "s2", "s3"], score)   # score: labels -> (sse, energy)
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hpc.baselines.reproject import DEFAULT_ITERS
from hpc.errors import InputError
from hpc.evaluate.protocol import compare
from hpc.evaluate.studies import Study
from hpc.registry import BASELINES, Registry
from hpc.repair.inference import Repairer, check_compatible
from hpc.repair.methods import free_parameters, hybrid_repairer, parse_params

# hpc.evaluate.evaluate's Options and StudyResult (it imports this module: typed by description here)
Options = Any
StudyResult = Any

MIN_TUNE_STUDIES = 3  # fewer only with --allow-few-tune-studies
CRITERION = "nmse_gap_meas"  # what chooses: in-gap NMSE against the measured target, pooled over studies
LEARNED = frozenset({"unet"})  # trained methods; the rest are baselines (the reference is the best of them)
METRICS = (("nmse_gap_true", "sino", "true", "gap"), ("nmse_gap_meas", "sino", "meas", "gap"),
           ("nmse_all_true", "sino", "true", "all"), ("nmse_all_meas", "sino", "meas", "all"),
           ("img_nmse_true", "image", "true", ""), ("img_nmse_full", "image", "full", ""))
NOT_METHODS = ("full", "gapped")  # image-domain versions that are references, not repairs
NETWORK, FILL_ITERS = "unet", "fill_iters"  # the network's free parameter: its reproject fill's iterations

Score = Callable[[dict[str, tuple[str, dict[str, Any]]]], dict[str, tuple[float, float]]]


@dataclass
class Choice:
    """One free parameter's value and where it came from."""
    value: Any
    source: str  # "tuned" | "given" | "checkpoint" (its training's validation) | "default" | "trained"
    scores: dict[str, float] = field(default_factory=dict)  # candidate -> criterion on the tuning studies

    def to_dict(self) -> dict[str, Any]:
        return {"value": self.value, "source": self.source, "scores": self.scores}


@dataclass
class Tuning:
    studies: list[str]  # the tuning (validation) studies, [] when nothing was tuned here
    choices: dict[str, dict[str, Choice]]  # baseline -> parameter -> Choice
    scores: dict[str, float] = field(default_factory=dict)  # every label scored on the tuning studies
    network: Choice | None = None  # the network's fill iterations (a data.fill=reproject checkpoint)
    trained: int = 0  # its data.fill_iters

    def params(self) -> dict[str, dict[str, Any]]:
        return {b: {k: c.value for k, c in ps.items()} for b, ps in self.choices.items()}

    def to_dict(self) -> dict[str, Any]:
        return {"studies": self.studies, "criterion": CRITERION, "scores": self.scores,
                "params": {b: {k: c.to_dict() for k, c in ps.items()} for b, ps in self.choices.items()},
                "network": {FILL_ITERS: self.network.to_dict()} if self.network else {}}

    def network_method(self) -> str:
        """How `hpc predict` runs the network as scored: unet, or hybrid at the chosen fill iterations."""
        if self.network is None or self.network.value == self.trained:
            return "--method unet"
        return f"--method hybrid --method-param iters={self.network.value}"


def parse_param_items(items: list[str], baselines: list[str]) -> dict[str, dict[str, Any]]:
    """``BASELINE.NAME=VALUE`` items -> {baseline: {name: value}} (typed as `hpc predict
    --method-param` types them); one line (InputError) for anything else."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        head, sep, value = item.partition("=")
        name, dot, key = head.strip().partition(".")
        if sep and name == NETWORK and key == FILL_ITERS:
            if not value.strip().isdigit() or int(value) < 1:
                raise InputError(f"--param {item}: {NETWORK}.{FILL_ITERS} takes a positive integer")
            out.setdefault(NETWORK, {})[FILL_ITERS] = int(value)
            continue
        if not (sep and dot and name in BASELINES):
            raise InputError(f"--param {item}: expected BASELINE.NAME=VALUE with BASELINE in "
                             f"{', '.join(BASELINES.names())} (e.g. reproject.iters=8), or {NETWORK}.{FILL_ITERS}=K")
        if name not in baselines:
            raise InputError(f"--param {item}: {name} is not among --baselines ({', '.join(baselines)})")
        out.setdefault(name, {})[key] = parse_params(name, [f"{key}={value}"])[key]
    return out


def check_studies(tune_ids: list[str], held_ids: list[str], allow_few: bool) -> None:
    """At least MIN_TUNE_STUDIES distinct tuning studies (unless ``allow_few``), none of them held out."""
    overlap = sorted(set(tune_ids) & set(held_ids))
    if overlap:
        raise InputError(f"--tune-on: {', '.join(overlap)} also scored as held-out; tune on other studies "
                         "(parameters chosen on a scored study flatter the method)")
    if len(set(tune_ids)) < MIN_TUNE_STUDIES and not allow_few:
        raise InputError(f"--tune-on: {len(set(tune_ids))} validation studies; the fair protocol tunes on at least "
                         f"{MIN_TUNE_STUDIES} (--allow-few-tune-studies to accept fewer)")


def _label(name: str, combo: dict[str, Any]) -> str:
    return f"{name} " + ",".join(f"{k}={v}" for k, v in combo.items())


def candidates(baselines: list[str], given: dict[str, dict[str, Any]], registry: Registry = BASELINES
               ) -> dict[str, tuple[str, dict[str, Any]]]:
    """label -> (baseline, parameters): every combination of each baseline's ``tune`` candidates for
    the parameters not given (given ones fixed), e.g. ``"reproject iters=4"``; ``registry``: where the
    names are registered (the denoisers' for `hpc evaluate --task denoise`)."""
    out = {}
    for name in baselines:
        tune = {k: tuple(v) for k, v in (registry.meta(name).get("tune") or {}).items()
                if k not in given.get(name, {})}
        for values in itertools.product(*tune.values()) if tune else ():
            combo = dict(zip(tune, values, strict=True))
            out[_label(name, combo)] = (name, {**given.get(name, {}), **combo})
    return out


def _fallback(name: str, key: str, metrics: dict[str, Any]) -> Choice:
    """A parameter nobody tuned here: the checkpoint's validated value, else the default."""
    if f"{name}_{key}" in metrics:
        return Choice(parse_params(name, [], {key: metrics[f"{name}_{key}"]})[key], "checkpoint")
    p = free_parameters(name)[key]
    if p.default is inspect.Parameter.empty:
        raise InputError(f"--baselines {name}: give --param {name}.{key}=VALUE (it has no default)")
    return Choice(p.default, "default")


def choose(baselines: list[str], given: dict[str, dict[str, Any]], metrics: dict[str, Any],
           tune_ids: list[str], score: Score | None) -> Tuning:
    """Every free parameter of every baseline: given, else tuned on ``tune_ids`` by ``score`` (labels
    -> pooled (sse, energy) of CRITERION over those studies; the network's scores come back as
    "unet"), else the checkpoint's ``metrics``, else the default."""
    tuning = bool(tune_ids) and score is not None
    variants = candidates(baselines, given) if tuning else {}
    pooled = score(variants) if tuning else {}
    scores = {k: (s / e if e > 0 else float("nan")) for k, (s, e) in pooled.items()}
    choices: dict[str, dict[str, Choice]] = {}
    for name in baselines:
        mine = {k: v for k, (b, v) in variants.items() if b == name and np.isfinite(scores.get(k, np.nan))}
        best = min(mine, key=lambda k: scores[k]) if mine else None
        out = choices.setdefault(name, {})
        for key in free_parameters(name):
            if key in given.get(name, {}):
                out[key] = Choice(given[name][key], "given")
            elif best is not None and key in mine[best]:
                cand = {str(v[key]): scores[k] for k, v in mine.items()}
                out[key] = Choice(mine[best][key], "tuned", cand)
            else:
                out[key] = _fallback(name, key, metrics)
    return Tuning(list(tune_ids) if tuning else [], choices, scores)


def paired_errors(results: dict, metric: str) -> dict[str, dict[str, tuple[float, float]]]:
    """{study: {method: (sse, energy)}} of an NMSE ``metric`` (METRICS) from per-study StudyResults."""
    _, domain, ref, region = next(m for m in METRICS if m[0] == metric)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for sid, res in results.items():
        for method, refs in (res.sino if domain == "sino" else res.image).items():
            if method in NOT_METHODS or ref not in refs:
                continue
            s = refs[ref]
            pair = (s.sums[f"sse_{region}"], s.sums[f"energy_{region}"]) if domain == "sino" else (s.sse, s.energy)
            out.setdefault(sid, {})[method] = pair
    return out


def comparisons(results: dict, seed: int = 0) -> dict[str, dict]:
    """Per NMSE metric (METRICS, those scored): hpc.evaluate.protocol.compare over the held-out studies."""
    out = {}
    for metric, *_ in METRICS:
        per_study = paired_errors(results, metric)
        if per_study and all(per_study.values()):
            out[metric] = compare(per_study, set(LEARNED), seed)
    return out


def predict_command(comp: dict[str, dict], tuned: Tuning, checkpoint: str, fill_aux: bool) -> tuple[str, str]:
    """(method, the `hpc predict` command that runs it): on the first metric compared, the learned
    method where it wins against the best baseline, else that baseline (nothing beats it for sure)."""
    if not comp:
        return "", ""
    c = next(iter(comp.values()))
    wins = [m for m in LEARNED if c["methods"].get(m, {}).get("verdict") == "wins"]
    method = min(wins, key=lambda m: c["methods"][m]["nmse"]) if wins else c["reference"]
    if method is None:
        return "", ""
    if method in LEARNED:
        aux = " --mult MULT --randoms RANDOMS" if fill_aux else ""
        net = tuned.network_method()
        return method, f"hpc predict {net} --checkpoint {checkpoint} INPUT --mask MASK{aux} -o OUTPUT"
    args = "".join(f" --method-param {k}={v}" for k, v in tuned.params().get(method, {}).items())
    return method, f"hpc predict --method {method}{args} INPUT --mask MASK [--mult MULT --randoms RANDOMS] -o OUTPUT"


# ---------------------------------------------------------------- running it (hpc.evaluate.evaluate)
RunStudy = Callable[[Repairer, Study, Options], StudyResult]  # hpc.evaluate.evaluate.evaluate_study


def tuning_scores(rep: Repairer, studies: list[Study], opts: Options, run_study: RunStudy,
                  variants: dict[str, tuple[str, dict[str, Any]]], network: bool = True
                  ) -> dict[str, tuple[float, float]]:
    """label -> (sse, energy) of CRITERION (in-gap, against the measured target) pooled over
    ``studies``: the candidates ``variants`` (and the network as ``unet``), sinograms only, as written."""
    o = dataclasses.replace(opts, variants=variants, images=False, quiet=True, tune_on=[], network=network)
    pooled: dict[str, tuple[float, float]] = {}
    for st in studies:
        check_compatible(rep, st.layout)
        for label, refs in run_study(rep, st, o).sino.items():
            s, (a, b) = refs["meas"].sums, pooled.get(label, (0.0, 0.0))
            pooled[label] = (a + s["sse_gap"], b + s["energy_gap"])
    return pooled


def choose_network(rep: Repairer, given: dict[str, Any], score: Callable[[Repairer], tuple[float, float]] | None
                   ) -> tuple[Repairer, Choice | None]:
    """A data.fill=reproject network's fill iterations: given, else tuned over reproject's candidates
    by ``score`` (None: no tuning studies), else as trained. Other networks have none (None)."""
    if rep.cfg.data.fill != "reproject":
        return rep, None
    if FILL_ITERS in given:
        return hybrid_repairer(rep, given[FILL_ITERS]), Choice(given[FILL_ITERS], "given")
    if score is None:
        return rep, Choice(rep.cfg.data.fill_iters, "trained")
    scores = {}
    for k in BASELINES.meta("reproject").get("tune", {}).get("iters", ()):
        s, e = score(hybrid_repairer(rep, k))
        scores[str(k)] = s / e if e > 0 else math.nan
    finite = {k: v for k, v in scores.items() if math.isfinite(v)}
    if not finite:
        return rep, Choice(rep.cfg.data.fill_iters, "trained", scores)
    best = int(min(finite, key=lambda k: finite[k]))
    return hybrid_repairer(rep, best), Choice(best, "tuned", scores)


def choose_params(rep: Repairer, studies: list[Study], opts: Options, run_study: RunStudy
                  ) -> tuple[Repairer, Options, Tuning]:
    """The network and free parameters the held-out ``studies`` are scored with: given, tuned on
    ``opts.tune_on`` (refused: fewer than MIN_TUNE_STUDIES, or a held-out one among them), else the
    checkpoint's validation (or its training), else defaults."""
    given = {b: dict(v) for b, v in opts.given.items() if b != NETWORK}
    if opts.reproject_iters and "reproject" in opts.baselines:
        given.setdefault("reproject", {})["iters"] = opts.reproject_iters
    tune_ids = [s.id for s in opts.tune_on]
    if opts.tune_on:
        check_studies(tune_ids, [s.id for s in studies], opts.allow_few)
    tuned_net = rep.cfg.data.fill == "reproject" and FILL_ITERS not in opts.given.get(NETWORK, {})
    chosen = choose(opts.baselines, given, rep.metrics, tune_ids,
                    lambda v: tuning_scores(rep, opts.tune_on, opts, run_study, v, network=not tuned_net))
    net_score = (lambda r: tuning_scores(r, opts.tune_on, opts, run_study, {}).get(NETWORK, (0.0, 0.0))
                 ) if opts.tune_on else None
    chosen.trained = rep.cfg.data.fill_iters
    rep, chosen.network = choose_network(rep, opts.given.get(NETWORK, {}), net_score)
    if chosen.network is not None:
        chosen.scores.update({f"{NETWORK} {FILL_ITERS}={k}": v for k, v in chosen.network.scores.items()})
    iters = chosen.params().get("reproject", {}).get("iters", opts.reproject_iters or DEFAULT_ITERS)
    return rep, dataclasses.replace(opts, params=chosen.params(), reproject_iters=int(iters), tune_on=[]), chosen
