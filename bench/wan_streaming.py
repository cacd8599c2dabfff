"""The clock of streaming fragments over a WAN, modelled: what the overlap hides (issue 26).

Per H = 100 steps of a SPES node at the 1b and 7b presets, over each link of bench.wan:

- SPES: H steps, then the whole exchange (shared + owned experts up, every other expert down);
- F fragments, no overlap: F rounds of H / F steps, each followed by one fragment's exchange;
- F fragments with an overlap of tau steps: the same, but each exchange runs while the node
  trains the next round's first tau steps, so only what exceeds tau steps is waited for (and
  with the largest overlap a round allows, H / F - 1 steps).

Fragment sizes are counted from the preset's parameter names and shapes on the meta device
(layer l in fragment l mod F, embeddings in the first, the final norm and LM head in the last:
model.naming.fragment_of), owned experts by the contiguous assignment. The clock only: what the
fragments and the overlap cost in loss is the streaming study's question (docs/studies.md).
"""

from __future__ import annotations

BYTES_FP32 = 4


def fragment_exchange_bytes(preset: str, fragments: int, nodes: int = 4) -> list[float]:
    """Per fragment, one node's fp32 bytes up + down when that fragment is synced (SPES)."""
    from model import build_model
    from model.naming import fragment_of, parse_expert_param
    from server_app.config import load
    from strategy.assignment import make_assignment

    spec = load([f"model={preset}", f"nodes={nodes}"])
    owned = set(make_assignment("contiguous", spec.model.num_experts, nodes).owners[0])
    model = build_model(spec.model, spec.model.vocab_size or spec.data.vocab_size, device="meta")
    out = [0.0] * fragments
    for name, tensor in model.state_dict().items():
        expert = parse_expert_param(name)
        up = expert is None or expert.expert in owned  # shared and owned: trained here, sent up
        down = expert is None or expert.expert not in owned  # everything but its own comes down
        out[fragment_of(name, fragments)] += BYTES_FP32 * tensor.numel() * (up + down)
    return out


def streaming_clock(
    exchanges: list[float], whole: float, step_s: float, bps: float, latency_s: float, h: int, overlap: int
) -> dict[str, float]:
    """Seconds per h steps: SPES, F fragments without and with an overlap of `overlap` steps."""
    f = len(exchanges)
    comm = [e * 8 / bps + 2 * latency_s for e in exchanges]
    return {
        "spes_s": h * step_s + whole * 8 / bps + 2 * latency_s,
        "fragments_s": h * step_s + sum(comm),
        "overlap_s": h * step_s + sum(max(0.0, c - overlap * step_s) for c in comm),
        # the most an overlap can be: all but the last step of the next round
        "overlap_max_s": h * step_s + sum(max(0.0, c - (h // f - 1) * step_s) for c in comm),
        "peak_over_spes": max(exchanges) / whole,
        "steps_per_round": h / f,
    }
