"""Outer optimizer applied to the averaged update (FedAvg, or DiLoCo's Nesterov SGD).

With lr=1 and momentum=0 the new global value is exactly the (token-weighted) mean of the
nodes' copies, which is what the SPES reference does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class OuterOptimizer:
    lr: float = 1.0
    momentum: float = 0.0
    nesterov: bool = False
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def is_plain_average(self) -> bool:
        return self.lr == 1.0 and self.momentum == 0.0

    def step(self, name: str, old: torch.Tensor, averaged: torch.Tensor) -> torch.Tensor:
        if self.is_plain_average:
            return averaged
        delta = old - averaged  # pseudo-gradient
        if self.momentum:
            buf = self.buffers.get(name)
            buf = delta.clone() if buf is None else buf.mul_(self.momentum).add_(delta)
            self.buffers[name] = buf
            delta = delta + self.momentum * buf if self.nesterov else buf
        return old - self.lr * delta
