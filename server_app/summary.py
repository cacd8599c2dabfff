"""summary.json: what a whole run came to, from its round records (also used by the centralized baseline)."""

from __future__ import annotations

from typing import Any

from common.spec import RunSpec
from strategy.round_record import RoundRecord


def summarize(
    spec: RunSpec, rounds: list[RoundRecord], first_val: float, counts: dict, trainable: dict, wall_s: float
) -> dict[str, Any]:
    nodes = [n for r in rounds for n in r.nodes.values()]
    ok_nodes = [n for n in nodes if n["status"] == "ok"]
    n_rounds = max(len(rounds), 1)
    last = rounds[-1] if rounds else None
    return {
        "run_name": spec.run_name,
        "strategy": spec.strategy_name,
        "model": spec.model.name,
        "rounds": len(rounds),
        "nodes": spec.nodes,
        "local_steps": spec.strategy.local_steps,
        "first_val_loss": first_val,
        "final_val_loss": last.val_loss if last else first_val,
        "val_loss_by_round": [first_val] + [r.val_loss for r in rounds],
        "final_train_loss": last.train_loss if last else None,
        "federated_eval_loss": last.federated_eval_loss if last else None,
        "tokens_trained": sum(r.tokens for r in rounds),
        "bytes_up": sum(r.bytes_up for r in rounds),
        "bytes_down": sum(r.bytes_down for r in rounds),
        "bytes_up_per_round_node": sum(n["bytes_up"] for n in nodes) / max(len(nodes), 1),
        "bytes_down_per_round_node": sum(n["bytes_down"] for n in nodes) / max(len(nodes), 1),
        "bytes_per_round": sum(r.bytes_up + r.bytes_down for r in rounds) / n_rounds,
        "wall_s": wall_s,
        "peak_mem_mb_node": max((n.get("peak_mem_mb", 0.0) for n in nodes), default=0.0),
        "tokens_per_s_node": sum(n.get("tokens_per_s", 0.0) for n in ok_nodes) / max(len(ok_nodes), 1),
        # Round 1 also prepares each node's data (once per run): left out where there are later rounds.
        **node_round_overhead([n for r in (rounds[1:] or rounds) for n in r.nodes.values() if n["status"] == "ok"]),
        "trainable_params_node": max(trainable.values()),
        "trainable_params_by_partition": trainable,
        "total_params": counts["total"],
        "shared_params": counts["shared"],
        "params_per_expert": counts["per_expert"],
        "failed_node_rounds": sum(1 for n in nodes if n["status"] != "ok"),
        **robustness(rounds),
    }


def robustness(rounds: list[RoundRecord]) -> dict:
    """What the bounds and the guard did (strategy/robust.py, strategy/guard.py), and what the guard cost."""
    nodes = [n for r in rounds for n in r.nodes.values()]
    guarded = [r.guard for r in rounds if r.guard]
    return {
        "clipped_updates": sum(1 for n in nodes if n.get("clipped_tensors")),
        "guard_dropped_updates": sum(1 for n in nodes if n["status"].startswith("dropped by the guard")),
        "guard_evaluations": sum(g["evaluations"] for g in guarded),
        "guard_seconds": sum(g.get("seconds", 0.0) for g in guarded),
    }


def node_round_overhead(nodes: list[dict]) -> dict:
    """Share of these node-rounds' time spent outside the training loop (model build, loading what
    arrived and the saved state, saving it), and how many found their model kept in memory."""
    timed = [n for n in nodes if n.get("round_seconds")]
    if not timed:
        return {}
    return {
        "node_round_overhead": 1
        - sum(n.get("train_seconds", 0.0) for n in timed) / sum(n["round_seconds"] for n in timed),
        "node_rounds_resident": sum(1 for n in timed if n.get("resident")),
        "node_rounds_timed": len(timed),
    }


def failure_report(rounds: list[RoundRecord]) -> str:
    """Why the run stops: the rounds in a row below quorum and each failed node's status."""
    lines = [f"{len(rounds)} rounds in a row below quorum; the run stops."]
    for r in rounds:
        lines.append(
            f"round {r.round}: {r.refused}; " + "; ".join(f"partition {p}: {s}" for p, s in r.failed_nodes().items())
        )
    return "\n".join(lines)


def describe_hardware(hw: dict) -> str:
    """One line for the console and the report: 'cuda bf16, adamw8bit, lean loss (set by the node: device)'."""
    if not hw:
        return "(not reported)"
    parts = [f"{hw.get('device', '?')} {hw.get('precision', '?')}", str(hw.get("optimizer", "?"))]
    parts += [
        label
        for key, label in (("lean_loss", "lean loss"), ("activation_checkpointing", "activation checkpointing"))
        if hw.get(key)
    ]
    text = ", ".join(parts)
    return f"{text} (set by the node: {', '.join(hw['set-by-node'])})" if hw.get("set-by-node") else text
