"""The checks of a strategy's sync settings (delta sync, codecs, fragments, residency), apart from
common/spec.py so that each file stays readable; `StrategyConfig.validate` runs them."""

from __future__ import annotations

import math
import re
from typing import Any

from common.codec import CODECS

RESIDENCY = re.compile(r"^(all|owned|owned\+[1-9]\d*)$")  # strategy/residency.py
ABSENT_POLICIES = ("skip", "mask")  # model/experts.py ABSENT_POLICIES


def whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def sync_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(holds, message) of delta sync, its codecs and error feedback, and the routing bias."""
    return [
        (
            cfg.uplink_codec in CODECS,
            f"strategy.uplink_codec must be one of {list(CODECS)}, got {cfg.uplink_codec!r}",
        ),
        (
            cfg.downlink_codec in CODECS,
            f"strategy.downlink_codec must be one of {list(CODECS)}, got {cfg.downlink_codec!r}",
        ),
        (
            cfg.delta_sync or (cfg.uplink_codec, cfg.downlink_codec) == ("fp32", "fp32"),
            "strategy.uplink_codec/downlink_codec other than fp32 need strategy.delta_sync=true",
        ),
        (
            whole(cfg.int8_block) and cfg.int8_block >= 0,
            f"strategy.int8_block must be an integer >= 0 (0 = per row), got {cfg.int8_block!r}",
        ),
        (
            whole(cfg.topk_chunk) and cfg.topk_chunk >= 1,
            f"strategy.topk_chunk must be an integer >= 1, got {cfg.topk_chunk!r}",
        ),
        (
            finite(cfg.topk_fraction) and 0 < cfg.topk_fraction <= 1,
            f"strategy.topk_fraction must be in (0, 1], got {cfg.topk_fraction}",
        ),
        (
            finite(cfg.error_decay) and 0 <= cfg.error_decay <= 1,
            f"strategy.error_decay must be in [0, 1], got {cfg.error_decay}",
        ),
        (
            finite(cfg.router_bias_rate) and 0 <= cfg.router_bias_rate <= 1,
            f"strategy.router_bias_rate must be in [0, 1], got {cfg.router_bias_rate}",
        ),
    ]


def layout_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(holds, message) of what each round syncs (fragments, their overlap) and what a node holds."""
    return [
        (
            whole(cfg.fragments) and cfg.fragments >= 1,
            f"strategy.fragments must be an integer >= 1 (1 = sync everything every round), got {cfg.fragments!r}",
        ),
        (
            isinstance(cfg.residency, str) and RESIDENCY.match(cfg.residency) is not None,
            f"strategy.residency must be all, owned or owned+<k> (k >= 1), got {cfg.residency!r}",
        ),
        (
            cfg.absent_policy in ABSENT_POLICIES,
            f"strategy.absent_policy must be one of {list(ABSENT_POLICIES)}, got {cfg.absent_policy!r}",
        ),
        (
            cfg.fragments == 1 or cfg.delta_sync,
            "strategy.fragments > 1 needs strategy.delta_sync=true (nodes keep what they did not send)",
        ),
        (
            whole(cfg.fragment_overlap) and 0 <= cfg.fragment_overlap < cfg.local_steps,
            f"strategy.fragment_overlap must be an integer in [0, local_steps={cfg.local_steps}), got "
            + repr(cfg.fragment_overlap),
        ),
        (
            cfg.fragment_overlap == 0 or cfg.fragments > 1,
            "strategy.fragment_overlap > 0 needs strategy.fragments > 1 (it delays a synced fragment)",
        ),
        (
            finite(cfg.fragment_mix) and 0 <= cfg.fragment_mix <= 1,
            f"strategy.fragment_mix must be in [0, 1], got {cfg.fragment_mix}",
        ),
    ]
