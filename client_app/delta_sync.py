"""What a delta-sync node sends, and how streaming fragments go on between their turns.

- `delta_reply`: the node's encoded differences from its copy of the global model, with error
  feedback (SparseLoCo's decay optional), and the residual it keeps.
- `fragment_globals` / `fragment_mixer`: Streaming DiLoCo's overlap (arXiv 2501.18512): the
  fragment a node sent last round keeps training from the node's own values for
  `strategy.fragment_overlap` steps; then it becomes fragment_mix x its own + (1 - fragment_mix)
  x the global value that came back, as if that value had arrived while the node trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from client_app.node_state import NodeState
from common.codec import decode_delta, encode_delta
from common.spec import StrategyConfig
from model.naming import fragment_names
from training import parallel


def delta_reply(
    cfg: StrategyConfig,
    trained: Mapping[str, torch.Tensor],
    base: Mapping[str, torch.Tensor],
    saved: NodeState | None,
    owned_names: list[str],
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(uplink arrays, new residual, decoded differences of the owned experts)."""
    diff = {n: t - base[n] for n, t in trained.items()}
    if cfg.error_feedback and saved is not None:
        for n, r in saved.residual.items():
            if n in diff and r.shape == diff[n].shape:
                diff[n] = diff[n] + (r if cfg.error_decay == 1 else cfg.error_decay * r)
    arrays = encode_delta(diff, cfg.uplink)
    sent = decode_delta(arrays, {n: base[n] for n in diff}, cfg.uplink)
    residual = {n: diff[n] - sent[n] for n in diff} if cfg.error_feedback else {}
    return arrays, residual, {n: sent[n] for n in owned_names}


def fragment_globals(
    cfg: StrategyConfig, fragment: int | None, local: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """With an overlap, the global values of the fragment the node sent last round (`local` holds
    the node's own values of everything it trained; `fragment` is this round's)."""
    if not cfg.fragment_overlap or fragment is None:
        return {}
    last = set(fragment_names(list(local), (fragment - 1) % cfg.fragments, cfg.fragments))
    return {n: base[n] for n in local if n in last and n in base}


def fragment_mixer(
    cfg: StrategyConfig, named: Mapping[str, torch.nn.Parameter], delayed: Mapping[str, torch.Tensor]
) -> Callable[[int], None] | None:
    """The training loop's `after_step`: mixes `delayed` in after `fragment_overlap` steps."""
    if not delayed:
        return None
    if parallel.current() is not None:
        raise ValueError("strategy.fragment_overlap needs a node on one rank (this node shards its model)")

    def after_step(done: int) -> None:
        if done == cfg.fragment_overlap:
            with torch.no_grad():
                for n, value in delayed.items():
                    named[n].mul_(cfg.fragment_mix).add_(value.to(named[n]), alpha=1.0 - cfg.fragment_mix)

    return after_step
