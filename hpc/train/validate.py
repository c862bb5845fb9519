"""Validation as its own component: the model's loss and metrics on the validation split, next to
the interpolation baselines on the same gaps.

    validator = Validator(cfg, val_loader, centre=model.centre)
    net.eval()
    metrics, panels = validator(forward)      # forward(batch) -> (pred (B,1,V',X'), loss)
    validator.baselines                       # {"linear": {...}, "biharmonic": {...}, "reproject": {..., "iters"}}
    state = validator.state_dict()            # checkpoint's "validation" entry; load_state_dict(state) on resume

Every rank scores its share of the split; the metrics are reduced across ranks as float64 sums
(hpc.train.metrics.MetricAccumulator), so ranks never average averages. Predictions and baselines are
floored at 0 counts when data.nonneg is set, so validation scores what `hpc predict` writes.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

from hpc.baselines.stack import baseline_batch
from hpc.config import Config
from hpc.data.preprocess import crop, denormalize, floor_counts, normalize
from hpc.distributed import dist
from hpc.physics import geometry as G
from hpc.physics.recon import REPROJECT_SUBSETS, reproject_path
from hpc.progress import Progress
from hpc.registry import BASELINES
from hpc.train.metrics import MetricAccumulator


def slice_baselines() -> tuple[str, ...]:
    """The registered baselines that repair each slice alone with nothing to tune: scored on the
    validation batches next to the model (reproject, tuned, is scored along its iteration path)."""
    meta = {n: BASELINES.meta(n) for n in BASELINES.names()}
    return tuple(n for n, m in meta.items() if m.get("per_slice") and not m.get("tune"))


def reproject_iters() -> tuple[int, ...]:
    """reproject's candidate OSEM iteration counts (4 subsets), scored in one run on the first
    validation pass; the count with the lowest in-gap NMSE is its score and is recorded as "iters"."""
    return tuple(BASELINES.meta("reproject")["tune"]["iters"])
Forward = Callable[[object], tuple[torch.Tensor, torch.Tensor]]  # Batch -> (pred (B,1,V',X'), loss ())


class Validator:
    def __init__(self, cfg: Config, loader, centre: int, main: bool = True):
        self.cfg, self.loader, self.centre = cfg, loader, centre
        self.main = main  # this process keeps the image panel and shows progress (log.progress): rank 0
        self.device = loader.device
        self.fingerprint = loader.fingerprint()
        # the validation set is fixed: the baselines are scored on the first pass and kept
        self.baselines: dict[str, dict[str, float]] | None = None
        self.scanner = _geometry(cfg, loader)  # reproject needs the projector's geometry

    def _reproject(self, centre: torch.Tensor, t: torch.Tensor, m: torch.Tensor, batch,
                   accs: dict[int, MetricAccumulator]) -> None:
        """Score reproject after every reproject_iters() count (counts in, normalized scores out)."""
        mode, norm = self.cfg.data.normalize, batch.norm
        y = denormalize(centre, mode, norm)[:, 0]  # (B, V, X) counts
        aux = {k: v[:, 0].to(y.device) for k, v in batch.aux.items()}
        valid = (aux["mult"] > 0) if "mult" in aux else torch.as_tensor(G.gap_mask(self.scanner) > 0, device=y.device)
        path = reproject_path(self.scanner, y, m[:, 0].clamp(0, 1), reproject_iters(), REPROJECT_SUBSETS,
                              valid=valid, mult=aux.get("mult"), add=aux.get("randoms"))
        for it, rep in path.items():
            accs[it].update(self._floor(normalize(rep[:, None].float(), mode, norm), norm), t, m)

    def _floor(self, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
        """Counts cannot be negative (data.nonneg)."""
        return floor_counts(y, self.cfg.data.normalize, norm) if self.cfg.data.nonneg else y

    @torch.no_grad()
    def __call__(self, forward: Forward) -> tuple[dict[str, float], dict[str, torch.Tensor] | None]:
        """One pass over the validation loader (a stratified sample when train.val_batches bounds
        it: hpc.data.select): ``(metrics, panels)``, metrics reduced over all ranks (``loss``
        included), panels the (V, X) images of this rank's slice with the most gap pixels."""
        acc = MetricAccumulator()
        base = {name: MetricAccumulator() for name in slice_baselines()} if self.baselines is None else {}
        rep = {it: MetricAccumulator() for it in reproject_iters()} if base and self.scanner is not None else {}
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of B * loss, sum of B)
        panels, most = None, -1
        bar = Progress(len(self.loader), "batches", "validate" + (" + baselines" if base else ""),
                       enabled=self.main and self.cfg.log.progress, keep=False)
        for batch in self.loader:
            pred, loss = forward(batch)  # (B, 1, V', X'), ()
            loss_sum += torch.stack([loss.double() * len(pred), loss.new_tensor(len(pred)).double()])
            p, t, m = (crop(a.float(), batch.pad) for a in (pred, batch.target, batch.mask))  # (B, 1, V, X)
            v = crop(batch.valid.float(), batch.pad) if batch.valid is not None else None  # virtual crystals: 0
            p = self._floor(p, batch.norm)
            acc.update(p, t, m, v)
            centre = crop(batch.input[:, self.centre : self.centre + 1], batch.pad)  # (B, 1, V, X) gaps zeroed
            for name, b in base.items():  # host round trip: the baselines run in numpy/scikit-image
                b.update(self._floor(baseline_batch(name, centre, m, v), batch.norm), t, m, v)
            if rep:
                self._reproject(centre, t, m, batch, rep)
            if self.main:  # the panel shows a repair: the slice with the most gap pixels (one host sync)
                gaps = ((m < 1) & (v > 0.5 if v is not None else True)).flatten(1).sum(1)
                k = int(gaps.argmax())
                if int(gaps[k]) > most:
                    most = int(gaps[k])
                    panels = {"input": centre[k, 0], "prediction": p[k, 0], "target": t[k, 0],
                              "error": (p - t)[k, 0].abs(), "mask": m[k, 0], "slice": int(batch.index[k]),
                              "gap_pixels": most}
            bar.update(1)
        bar.close()
        return self._reduce(acc, base, loss_sum, rep), panels

    def _reduce(self, acc: MetricAccumulator, base: dict[str, MetricAccumulator],
                loss_sum: torch.Tensor, rep: dict[int, MetricAccumulator]) -> dict[str, float]:
        """Sum the accumulators over ranks (collectives: every rank calls this) and turn the sums
        into metrics; host sync (the metrics are Python floats)."""
        metrics = acc.compute(dist.all_reduce_sum(acc.state(self.device)))
        metrics["loss"] = float(dist.all_reduce_sum(loss_sum)[0] / loss_sum[1].clamp_min(1))
        if base:
            self.baselines = {n: b.compute(dist.all_reduce_sum(b.state(self.device))) for n, b in base.items()}
        if rep:  # the iteration count is chosen here, on validation data, and recorded with its score
            scores = {it: a.compute(dist.all_reduce_sum(a.state(self.device))) for it, a in rep.items()}
            scored = [it for it, sc in scores.items() if math.isfinite(sc["nmse_gap"])]
            if scored:
                best = min(scored, key=lambda it: (scores[it]["nmse_gap"], it))
                self.baselines["reproject"] = {**scores[best], "iters": best}
            else:  # no gap pixel was scored: nothing to choose from (hpc evaluate keeps its default)
                self.baselines["reproject"] = scores[max(scores)]
        iters = (self.baselines or {}).get("reproject", {}).get("iters")
        if iters is not None:  # saved with the metrics in every checkpoint (hpc evaluate)
            metrics["reproject_iters"] = iters
        return metrics

    def state_dict(self) -> dict:
        """The scored baselines and the fingerprint of the slices they were scored on (a checkpoint's
        ``validation`` entry): a resumed run does not score them again."""
        return {"fingerprint": self.fingerprint, "baselines": self.baselines or {}}

    def load_state_dict(self, state: dict | None) -> bool:
        """Take the baselines of a checkpoint when they were scored on the same validation slices
        (same fingerprint); True when taken."""
        if state and state.get("baselines") and state.get("fingerprint") == self.fingerprint:
            self.baselines = {n: dict(m) for n, m in state["baselines"].items()}
            return True
        return False


def _geometry(cfg: Config, loader):
    """The scanner preset of the validation data when its (views, bins) match the slices, else None."""
    try:
        sc = G.get_scanner(cfg.corrupt.scanner or loader.index.ds.scanner)
    except (ValueError, AttributeError):
        return None
    return sc if (sc.views, sc.bins) == tuple(loader.index.ds.slice_shape) else None
