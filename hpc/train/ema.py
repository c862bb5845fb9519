"""An exponential moving average of the weights (``train.ema``: the decay per optimizer step).

Averaging the last few thousand steps' weights removes the step-to-step noise of the optimizer, the
usual cure for a validation score that jumps between seeds and checkpoints. The shadow copy is
updated after every optimizer step on the device (``_foreach_lerp_``: no host sync) and is what
validation scores, the best checkpoint is chosen by, and `hpc predict` / `hpc export` run
(:func:`inference_weights`); training continues from the raw weights. Under DDP every rank holds the
same weights, so every rank's average is the same without a collective.

    ema = EMA(model, decay=0.999)     # after the model is on its device
    optimizer.step(); ema.update()    # every step
    with ema.applied():               # validation, panels, the checkpoint's inference weights
        ...
    ema.state_dict() / ema.load_state_dict(state)   # the checkpoint's "ema" entry
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


class EMA:
    """The moving average of ``model``'s floating-point parameters and buffers. The first steps use
    a shorter memory, decay_n = min(decay, (1 + n) / (10 + n)) after n updates, so the average does
    not start as a long memory of the random initialisation."""

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay!r}: must be in (0, 1)")
        self.model, self.decay, self.updates = model, float(decay), 0
        state = model.state_dict()  # detached views of the parameters' and buffers' own storage
        self.names = [k for k, v in state.items() if v.is_floating_point()]  # int buffers: copied as is
        # looked up once: the optimizer updates these tensors in place, so no step rebuilds the dict
        self.live = [state[k] for k in self.names]
        self.shadow = [t.clone() for t in self.live]

    def rate(self) -> float:
        """The weight of the newest step: 1 - decay_n (a Python number: nothing waits for the device)."""
        n = self.updates
        return 1.0 - min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self) -> None:
        """shadow += rate * (weights - shadow), every tensor in one fused call on the device."""
        torch._foreach_lerp_(self.shadow, self.live, self.rate())
        self.updates += 1

    @contextmanager
    @torch.no_grad()
    def applied(self) -> Iterator[None]:
        """The average in the model's own tensors (so DDP / compiled wrappers see it), restored on exit."""
        saved = [t.clone() for t in self.live]
        torch._foreach_copy_(self.live, self.shadow)
        try:
            yield
        finally:
            torch._foreach_copy_(self.live, saved)

    def weights(self) -> dict[str, torch.Tensor]:
        """The model's state_dict with the averaged tensors in place of the floating-point ones."""
        state = dict(self.model.state_dict())
        state.update(zip(self.names, self.shadow, strict=True))
        return state

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "model": self.weights()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore the average (the checkpoint's ``ema`` entry); refuses one of another network."""
        stored = state["model"]
        pairs = list(zip(self.names, self.shadow, strict=True))
        misfit = [k for k, s in pairs if k not in stored or stored[k].shape != s.shape]
        if misfit:
            raise ValueError(f"EMA weights do not fit this model: {misfit[0]}")
        torch._foreach_copy_(self.shadow, [stored[k].to(s.device, s.dtype) for k, s in pairs])
        self.updates = int(state["updates"])


def inference_weights(ckpt: dict) -> dict[str, torch.Tensor]:
    """The weights a checkpoint's user runs: the moving average when the run kept one (what its
    validation scored), else the trained weights."""
    ema = ckpt.get("ema")
    return ema["model"] if ema else ckpt["model"]
