"""Dishonest nodes in real runs: one attacker of 4 nodes, each attack beside its honest baseline.

Every run is a whole federation on the in-process engine (the real coordinator, strategy and
nodes); partition ATTACKER trains honestly, then its reply is rewritten on the way out by the
attack (its tensors and/or its metrics). The figure that matters is the final held-out loss next
to the honest run with the same settings, and the round the attacker was first caught (its update
clipped or dropped, or it was quarantined). `python -m faults` writes them to docs/reliability.md.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import Message, MetricRecord, RecordDict

from common import keys
from common.codec import decode, encode

ATTACKER = 3
NODES = 4
ROUNDS = 10
MICRO = [
    "model.hidden_size=64",
    "model.expert_ffn=32",
    "model.num_layers=2",
    "model.num_experts=8",
    "strategy.merge.top_k=2",
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.batch_size=4",
    "strategy.local_steps=10",
    "strategy.merge.interval=20",
    "strategy.merge.decay_steps=100",
    f"nodes={NODES}",
    "engine=inprocess",
]
Tamper = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], dict], None]  # (sent, trained, metrics)


def _shared(name: str) -> bool:
    return ".mlp.experts." not in name


def shared_to_bound(sent, trained, metrics) -> None:
    for n in trained:
        if _shared(n):
            trained[n] = torch.full_like(trained[n], 9999.0)  # under max_abs_value 1e4


def scaled(factor: float) -> Tamper:
    def tamper(sent, trained, metrics) -> None:
        for n in trained:
            trained[n] = sent[n] + factor * (trained[n] - sent[n])

    return tamper


def experts_large(sent, trained, metrics) -> None:
    for n in trained:
        if not _shared(n):
            trained[n] = torch.full_like(trained[n], 50.0)


def drift(factor: float) -> Tamper:
    """Every tensor moved by `factor` x its honest change, shared weights shrunk toward zero and experts
    grown, every round in the same direction (the clip factor is 4: 3.9 is just under it for a node whose
    honest change is the median, 2 is under it for any)."""

    def tamper(sent, trained, metrics) -> None:
        for n in trained:
            honest = float((trained[n] - sent[n]).norm())
            norm = float(sent[n].norm())
            if norm > 0:
                step = factor * honest / norm
                trained[n] = sent[n] * (1 - step if _shared(n) else 1 + step)

    return tamper


def claim_speed(sent, trained, metrics) -> None:
    metrics["tokens-per-s"] = 9.9e7  # under MAX_TOKENS_PER_S: a ~10^4x claim


def claim_load(expert: int) -> Tamper:
    """Report every layer's routed tokens on one expert (aims the load policy and the router bias)."""

    def tamper(sent, trained, metrics) -> None:
        load = list(metrics[keys.EXPERT_LOAD])
        num_experts = 8
        for row in range(len(load) // num_experts):
            for e in range(num_experts):
                load[row * num_experts + e] = 1.0 if e == expert else 0.0
        metrics[keys.EXPERT_LOAD] = load

    return tamper


@dataclass
class Attack:
    name: str
    tamper: Tamper | None
    overrides: list[str] = field(default_factory=list)  # the attack's and its baseline's settings
    rounds: int = ROUNDS


ATTACKS = [
    Attack("shared weights set to 9,999 (under max_abs_value)", shared_to_bound),
    Attack("update scaled x10", scaled(10.0)),
    Attack("update scaled x-1", scaled(-1.0)),
    Attack("own experts set to 50", experts_large),
    Attack("slow drift at 3.9x the honest update, 30 rounds", drift(3.9), rounds=30),
    Attack("slow drift at 2x the honest update, 30 rounds", drift(2.0), rounds=30),
    Attack(
        "tokens/s claimed 9.9e7, assignment_policy=speed",
        claim_speed,
        ["strategy.assignment_policy=speed", "strategy.assignment_every=2"],
    ),
    Attack(
        "load claimed on expert 0, assignment_policy=load",
        claim_load(0),
        ["strategy.assignment_policy=load", "strategy.assignment_every=2"],
    ),
    Attack("router-bias push (all load on expert 0)", claim_load(0), ["strategy.router_bias_rate=0.01"]),
]


def attacker_app(app: Callable[[Message, object], Message], tamper: Tamper) -> Callable[[Message, object], Message]:
    """`app` with partition ATTACKER's train replies rewritten by `tamper`."""

    def handle(msg: Message, context) -> Message:
        reply = app(msg, context)
        if (
            context.node_config.get("partition-id") != ATTACKER
            or reply.has_error()
            or msg.metadata.message_type != "train"
        ):
            return reply
        sent = {**_held.get(context.node_id, {}), **decode(msg.content.array_records[keys.ARRAYS])}
        _held[context.node_id] = sent
        trained = decode(reply.content.array_records[keys.ARRAYS])
        metrics = dict(reply.content.metric_records[keys.METRICS])
        tamper({n: sent[n] for n in trained}, trained, metrics)
        content = RecordDict({keys.ARRAYS: encode(trained), keys.METRICS: MetricRecord(metrics)})
        return Message(content, reply_to=msg)

    _held: dict[int, dict[str, torch.Tensor]] = {}
    return handle


def run_once(overrides: list[str], out_dir: Path, run_name: str, tamper: Tamper | None) -> Path:
    from client_app import background_save, resident
    from client_app.app import app as node_app
    from engine import inprocess
    from engine.simulate import node_environment
    from server_app import config as run_config

    spec = run_config.load([*overrides, f"run_name={run_name}", f"output_dir={out_dir}"])
    app = node_app if tamper is None else attacker_app(node_app, tamper)
    grid = inprocess.InProcessGrid(app, spec.nodes)
    run_dir = run_config.run_dir(spec)
    try:
        with inprocess.environment(node_environment(spec, run_dir)), inprocess.coordinator_identity(grid.run.run_id):
            inprocess.coordinate(grid, spec)
    finally:
        background_save.drain()
        resident.drop()
    return run_dir


def caught(run_dir: Path) -> str:
    """When the attacker was first caught: its update clipped or dropped, or it was quarantined."""
    from server_app.report import read_rounds

    rows = read_rounds(run_dir)
    notes = []
    for kind, test in (
        ("clipped", lambda n: n.get("clipped_tensors", 0) > 0),
        ("dropped", lambda n: n.get("status", "").startswith("dropped by the guard")),
    ):
        hits = [r.round for r in rows if test(r.nodes.get(str(ATTACKER), {}))]
        if hits:
            notes.append(f"{kind} from round {hits[0]} ({len(hits)} rounds)")
    summary = json.loads((run_dir / "summary.json").read_text())
    quarantine = [e["round"] for e in summary.get("events", []) if e.get("event") == "quarantine"]
    if quarantine:
        notes.append(f"quarantined in round {quarantine[0]}")
    return "; ".join(notes) or "never"


def honest_drops(run_dir: Path) -> int:
    """Honest updates the guard dropped (partition ATTACKER excluded when it attacks)."""
    from server_app.report import read_rounds

    return sum(
        n.get("status", "").startswith("dropped by the guard")
        for r in read_rounds(run_dir)
        for p, n in r.nodes.items()
        if int(p) != ATTACKER
    )


def attacker_end(run_dir: Path) -> str:
    """Experts the attacker owned after the last round, and the largest routing bias."""
    from server_app.report import read_rounds

    owned = read_rounds(run_dir)[-1].owners.get(str(ATTACKER))
    text = "quarantined, 0 experts" if owned is None else f"{len(owned)} of 8 experts"
    bias_file = run_dir / "model" / "router_bias.json"
    if bias_file.exists():
        bias = json.loads(bias_file.read_text())["router_bias"]
        text += f"; largest router bias {max(abs(b) for row in bias for b in row):.3f}"
    return text


def final_loss(run_dir: Path) -> float:
    return float(json.loads((run_dir / "summary.json").read_text())["final_val_loss"])


def run_attacks(workdir: Path, attacks: list[Attack] | None = None, seed: int = 0) -> list[dict]:
    """Every attack and its honest baseline (one baseline per distinct setting); a row each."""
    rows, baselines = [], {}
    for i, attack in enumerate(attacks or ATTACKS):
        settings = [*MICRO, *attack.overrides, f"rounds={attack.rounds}", f"seed={seed}"]
        key = tuple(settings)
        t0 = time.monotonic()
        if key not in baselines:
            baselines[key] = run_once(settings, workdir, f"honest{len(baselines)}", None)
        honest = baselines[key]
        attacked = run_once(settings, workdir, f"attack{i}", attack.tamper)
        h, a = final_loss(honest), final_loss(attacked)
        rows.append(
            {
                "attack": attack.name,
                "rounds": attack.rounds,
                "honest_loss": h,
                "attacked_loss": a,
                "gap": a / h - 1 if math.isfinite(a) else math.inf,
                "caught": caught(attacked),
                "attacker_end": attacker_end(attacked),
                "honest_end": attacker_end(honest),
                "honest_dropped": honest_drops(honest) + honest_drops(attacked),
                "wall_s": round(time.monotonic() - t0, 1),
            }
        )
        print(f"[attacks] {attack.name}: {h:.4f} honest, {a:.4f} attacked; {rows[-1]['caught']}", flush=True)
    return rows


BLOCK = ("<!-- attacks: python -m faults --attacks -->", "<!-- /attacks -->")


def render(result: dict) -> str:
    """The docs/reliability.md block of an attack run (benchmarks/attacks.json)."""
    lines = [
        BLOCK[0],
        "## Dishonest nodes in real runs",
        "",
        (
            f"One attacker (partition {ATTACKER}) of {NODES} nodes, default settings, micro model "
            f"(`faults/attacks.py`, run {result['date']}, seed {result['seed']}); every attack beside the honest "
            "run with the same settings. *Caught*: the first round the attacker's update was clipped, dropped by "
            "the guard, or it was quarantined. *At the end*: experts the attacker owned (and the router bias, "
            "where on), honest run in brackets."
        ),
        "",
        "| attack | rounds | honest loss | attacked loss | gap | caught | at the end | honest updates dropped |",
        "|---|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['attack']} | {r['rounds']} | {r['honest_loss']:.4f} | {r['attacked_loss']:.4f} | "
            f"{100 * r['gap']:+.2f} % | {r['caught']} | {r['attacker_end']} ({r['honest_end']}) | "
            f"{r['honest_dropped']} |"
        )
    worst = max(abs(r["gap"]) for r in result["rows"])
    lines += ["", f"Largest gap to the honest run: {100 * worst:.2f} %.", BLOCK[1]]
    return "\n".join(lines)


def write_block(doc: Path, block: str) -> None:
    """Put `block` in place of the doc's attack block (appended if it has none)."""
    text = doc.read_text() if doc.exists() else ""
    if BLOCK[0] in text:
        head, rest = text.split(BLOCK[0], 1)
        text = head + block + rest.split(BLOCK[1], 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
