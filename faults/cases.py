"""`python -m faults`: the fault suite on 127.0.0.1, written to docs/reliability.md.

Each case builds the fault by hand and feeds it through the real code (the SPES strategy for
hostile replies, the node's own settings and state store for node-side faults, real Flower
processes for a killed SuperNode and a killed coordinator), then reports what happened. The
tests (tests/test_faults.py) assert on the same cases.

    python -m faults            # all cases, including the Flower runs (a few minutes)
    python -m faults --quick    # only the cases without Flower processes (seconds)
    python -m faults --attacks  # one dishonest node of 4 in real runs, beside honest runs (faults/attacks.py)
"""

from __future__ import annotations

import argparse
import io
import math
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from faults.node_cases import (
    case_coordinator_data_path,
    case_node_limits,
    case_node_refuses_bad_round,
    case_run_token_paths,
    case_second_coordinator,
    case_state_corrupt,
    case_state_crash_mid_save,
    case_state_nan_moments,
    case_state_other_step,
)
from faults.outcome import Outcome

ROOT = Path(__file__).resolve().parent.parent
E, L, HID, INTER = 4, 2, 6, 4


# -- hostile replies through the real strategy ---------------------------------------------------
def _toy_params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    p = {
        "model.embed_tokens.weight": torch.randn(10, HID, generator=g),
        "model.norm.weight": torch.randn(HID, generator=g),
    }
    for layer in range(L):
        p[f"model.layers.{layer}.mlp.gate.weight"] = torch.randn(E, HID, generator=g)
        for e in range(E):
            base = f"model.layers.{layer}.mlp.experts.{e}"
            p[f"{base}.gate_proj.weight"] = torch.randn(INTER, HID, generator=g)
            p[f"{base}.up_proj.weight"] = torch.randn(INTER, HID, generator=g)
            p[f"{base}.down_proj.weight"] = torch.randn(HID, INTER, generator=g)
    return p


def _task_identity() -> None:
    """Messages can only be built inside a Flower task; give this process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    try:
        TaskIdentity.run_id  # noqa: B018  (raises when unset)
    except RuntimeError:
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def strategy_round(
    tamper: Callable | None = None, *, max_tokens: float = 1000.0, extra_replies: int = 0, **cfg
) -> tuple[object, dict, list]:
    """One round of a 2-node SpesStrategy whose node 1 reply goes through `tamper(msg, update, metrics)`.

    Returns (strategy, params before the round, replies sent)."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from common.codec import decode, encode
    from common.spec import MergeSchedule, StrategyConfig
    from model.naming import expert_param_names, shared_param_names
    from strategy.spes import SpesStrategy

    _task_identity()
    merge = MergeSchedule(enabled=False)
    strategy = SpesStrategy(
        StrategyConfig(local_steps=10, merge=merge, **cfg),
        E,
        {7: 0, 11: 1},
        num_rounds=3,
        max_tokens=max_tokens,
        num_layers=L,
    )
    before = _toy_params(0)
    msgs = list(strategy.configure_train(1, encode(before), ConfigRecord({}), None))
    replies = []
    for p, msg in enumerate(msgs):
        received = decode(msg.content["arrays"])
        names = shared_param_names(received) + expert_param_names(received, msg.content["config"]["owned-experts"])
        update = {n: received[n] + 0.01 * (p + 1) for n in names}
        metrics = {"num-tokens": 500.0, "train-loss": 2.0}
        content = None
        if p == 1 and tamper is not None:
            content = tamper(update, metrics)
        if content is None:
            content = RecordDict({"arrays": encode(update), "metrics": MetricRecord(metrics)})
        replies.append(Message(content, reply_to=msg))
        for _ in range(extra_replies if p == 1 else 0):
            replies.append(Message(content, reply_to=msg))
    strategy.aggregate_train(1, replies)
    return strategy, before, replies


def _status(strategy) -> str:
    return strategy.history[-1].nodes["1"]["status"]


def _honest_shared_kept(strategy, before) -> bool:
    """The global shared weights are node 0's alone (the tampered node 1 did not count)."""
    from model.naming import shared_param_names

    return all(torch.allclose(strategy.params[n], before[n] + 0.01) for n in shared_param_names(before))


def _metric_case(fault: str, before_text: str, value) -> Callable[[], Outcome]:
    def case() -> Outcome:
        from flwr.app import ConfigRecord, MetricRecord, RecordDict

        from common.codec import encode

        def tamper(update, metrics):
            key, val = value
            try:
                record = MetricRecord({**metrics, key: val})
            except (TypeError, ValueError):  # a MetricRecord cannot hold it; a hostile node sends a ConfigRecord
                record = ConfigRecord({**metrics, key: val})
            return RecordDict({"arrays": encode(update), "metrics": record})

        s, before = strategy_round(tamper)[:2]
        finite = all(torch.isfinite(t).all() for t in s.params.values())
        ok = finite and _status(s).startswith("rejected") and _honest_shared_kept(s, before)
        return Outcome(fault, before_text, f"node rejected ({_status(s)[:70]}); round applied from the honest node", ok)

    return _named(case, fault)


def _tensor_case(fault: str, before_text: str, tamper_tensors: Callable, **cfg) -> Callable[[], Outcome]:
    def case() -> Outcome:
        from flwr.app import MetricRecord, RecordDict

        def tamper(update, metrics):
            return RecordDict({"arrays": tamper_tensors(update), "metrics": MetricRecord(metrics)})

        s, before = strategy_round(tamper, **cfg)[:2]
        finite = all(torch.isfinite(t).all() for t in s.params.values())
        ok = finite and _status(s).startswith("rejected") and _honest_shared_kept(s, before)
        return Outcome(fault, before_text, f"node rejected ({_status(s)[:70]})", ok)

    return _named(case, fault)


def _named(case: Callable[[], Outcome], fault: str) -> Callable[[], Outcome]:
    """case_<the fault in words>: the test id that `pytest -k` selects (tests/test_faults.py)."""
    case.__name__ = "case_" + "_".join(re.findall(r"[a-z0-9]+", fault.lower().replace(" -", " minus ")))
    return case


def _record_with_raw_array(update, name, data: bytes, shape=None):
    from flwr.app import Array

    from common.codec import encode

    record = encode(update)
    arr = record[name]
    record[name] = Array(dtype=arr.dtype, shape=tuple(shape or arr.shape), stype=arr.stype, data=data)
    return record


def _first(update) -> str:
    return sorted(update)[0]


def _scaled(update, value):
    from common.codec import encode

    name = _first(update)
    update = dict(update)
    update[name] = torch.full_like(update[name], value)
    return encode(update)


def case_duplicate_reply() -> Outcome:
    s, before, _ = strategy_round(None, extra_replies=1)
    ok = _status(s) == "rejected: duplicate reply" and _honest_shared_kept(s, before)
    return Outcome(
        "second reply from the same node in one round",
        "silently replaced the first",
        f"both dropped ({_status(s)}); round applied from the other node",
        ok,
    )


def case_overflow_refused() -> Outcome:
    """Values that pass every per-update bound but overflow in the outer step: the round is refused."""

    def tamper(update, metrics):
        from flwr.app import MetricRecord, RecordDict

        from common.codec import encode

        update = {n: torch.full_like(t, -3.0e38) for n, t in update.items()}
        return RecordDict({"arrays": encode(update), "metrics": MetricRecord(metrics)})

    s, before = strategy_round(
        tamper, max_abs_value=0.0, outer_lr=0.7, outer_momentum=0.9, nesterov=True, shared_weighting="uniform"
    )[:2]
    rec = s.history[-1]
    unchanged = all(torch.equal(s.params[n], before[n]) for n in before)
    ok = not rec.applied and unchanged and "NaN or Inf" in rec.refused
    return Outcome(
        "finite updates of -3e38 with the size bound off (outer Nesterov step overflows)",
        "Inf checkpointed and sent to every node",
        f"round refused ({rec.refused}); model unchanged",
        ok,
    )


def case_eval_reply() -> Outcome:
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from common.codec import encode

    s, _, _ = strategy_round(None)
    msgs = list(s.configure_evaluate(3, encode(s.params), ConfigRecord({}), None))
    bad = [
        Message(RecordDict({"metrics": MetricRecord({"eval-loss": math.nan, "num-tokens": 10.0})}), reply_to=msgs[0]),
        Message(RecordDict({"metrics": MetricRecord({"eval-loss": 3.0})}), reply_to=msgs[1]),
    ]
    result = s.aggregate_evaluate(3, bad)
    return Outcome(
        "eval replies with NaN loss / without num-tokens",
        "crashed aggregate_evaluate",
        "both ignored with a log line; no federated loss this round",
        result is None,
    )


# -- processes killed ------------------------------------------------------------------------------
def case_resume_bit_identical(workdir: Path) -> Outcome:
    """Coordinator SIGKILLed after round 1 of 3, resumed: final weights equal an uninterrupted run's."""
    from faults.runs import resume_matches_uninterrupted

    same, detail = resume_matches_uninterrupted(workdir)
    return Outcome(
        "coordinator SIGKILLed after round 1 of 3 (outer momentum on), then `resume=true`",
        "nothing survived a restart (state written, never read; reruns wiped nodes/)",
        detail,
        same,
    )


def case_supernode_killed(workdir: Path) -> Outcome:
    from faults.runs import supernode_killed_mid_round

    completed, detail = supernode_killed_mid_round(workdir)
    return Outcome(
        "one of 2 SuperNodes SIGKILLed mid-run (min_nodes=1)", "every round waited for every node", detail, completed
    )


def case_simulation_worker_killed(workdir: Path) -> Outcome:
    from faults.runs import simulation_worker_killed

    ok, detail = simulation_worker_killed(workdir)
    return Outcome(
        "a Ray simulation worker SIGKILLed between rounds (3 nodes)",
        "Flower reused the dead worker: 2 of 3 nodes failed every later round, `python -m sim` exited 0",
        detail,
        ok,
    )


QUICK: list[Callable[[], Outcome]] = [
    _metric_case("num-tokens NaN", "every shared weight NaN for good", ("num-tokens", math.nan)),
    _metric_case("num-tokens Inf", "every shared weight NaN for good", ("num-tokens", math.inf)),
    _metric_case("num-tokens 1e30", "that node got 100 % of the shared weights", ("num-tokens", 1e30)),
    _metric_case("num-tokens -99", "a weight of -99", ("num-tokens", -99.0)),
    _metric_case("train-loss a string", "coordinator crashed in aggregate_train", ("train-loss", "low")),
    _metric_case("num-tokens a list", "coordinator crashed in aggregate_train", ("num-tokens", [1.0, 2.0])),
    _metric_case("expert-load a scalar", "coordinator crashed in aggregate_train", ("expert-load", 0.5)),
    _metric_case(
        "expert-load rows summing to 2 (a load claim counted twice)",
        "accepted: steered the federation's load",
        ("expert-load", [2.0 / E] * (L * E)),
    ),
    _metric_case("tokens-per-s 1.7e308", "accepted; `inf` written into metrics.jsonl", ("tokens-per-s", 1.7e308)),
    _metric_case(
        "tokens-per-s 1e12 (the speed policy's lever)",
        "accepted (a 10x claim took 5 of 8 experts, policy speed)",
        ("tokens-per-s", 1e12),
    ),
    _metric_case("train-loss -5", "accepted", ("train-loss", -5.0)),
    _tensor_case("NaN in an update", "rejected (already)", lambda u: _scaled(u, math.nan)),
    _tensor_case("finite update of 1e30", "accepted; outer step and merging made Inf", lambda u: _scaled(u, 1e30)),
    _tensor_case(
        "`arrays` is a MetricRecord",
        "coordinator crashed in aggregate_train",
        lambda u: __import__("flwr.app", fromlist=["MetricRecord"]).MetricRecord({"x": 1.0}),
    ),
    _tensor_case(
        "valid .npy with trailing bytes",
        "accepted; byte counts spoofed",
        lambda u: _record_with_raw_array(u, _first(u), _npy(u[_first(u)]) + b"\0" * 64),
    ),
    _tensor_case(
        "declared shape smaller than the data",
        "accepted; byte counts spoofed",
        lambda u: _record_with_raw_array(u, _first(u), _npy(u[_first(u)]), shape=(1,)),
    ),
    case_duplicate_reply,
    case_overflow_refused,
    case_eval_reply,
    case_run_token_paths,
    case_coordinator_data_path,
    case_state_crash_mid_save,
    case_state_corrupt,
    case_state_nan_moments,
    case_state_other_step,
    case_node_refuses_bad_round,
    case_node_limits,
    case_second_coordinator,
]


def _npy(t: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, t.numpy(), allow_pickle=False)
    return buf.getvalue()


def run_quick() -> list[Outcome]:
    return [case() for case in QUICK]


def write_doc(outcomes: list[Outcome], path: Path = ROOT / "docs" / "reliability.md") -> Path:
    from faults import attacks

    rows = "\n".join(f"| {o.fault} | {o.before} | {o.now} | {'yes' if o.ok else '**NO**'} |" for o in outcomes)
    kept = ""  # the attack block (python -m faults --attacks) survives a rewrite of the table
    if path.exists() and attacks.BLOCK[0] in (old := path.read_text()):
        kept = (
            "\n"
            + attacks.BLOCK[0]
            + old.split(attacks.BLOCK[0], 1)[1].split(attacks.BLOCK[1], 1)[0]
            + attacks.BLOCK[1]
            + "\n"
        )
    path.write_text(
        "# Reliability: faults and hostile input\n\n"
        "Generated by `python -m faults` (every row is a fault built by hand and fed through the real code;\n"
        '`tests/test_faults.py` asserts the same cases). "Before" is what the code did before this suite\n'
        'existed; "now" is what this run observed.\n\n'
        "| fault | before | now | contained |\n|---|---|---|---|\n" + rows + "\n" + kept
    )
    return path


def run_attack_suite(out: Path = ROOT / "benchmarks" / "attacks.json", seed: int = 0) -> dict:
    """Every attack of faults/attacks.py beside its honest run; the JSON and the docs block rewritten."""
    import json
    import time

    from faults import attacks

    with tempfile.TemporaryDirectory() as tmp:
        rows = attacks.run_attacks(Path(tmp), seed=seed)
    result = {"date": time.strftime("%Y-%m-%d"), "seed": seed, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")
    attacks.write_block(ROOT / "docs" / "reliability.md", attacks.render(result))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the cases that start Flower processes")
    ap.add_argument("--workdir", type=Path, default=None, help="where the Flower runs write (default: a temp dir)")
    ap.add_argument(
        "--attacks", action="store_true", help="only the dishonest-node runs (faults/attacks.py, ~10 min on 2 cores)"
    )
    args = ap.parse_args(argv)
    if args.attacks:
        result = run_attack_suite()
        worst = max(abs(r["gap"]) for r in result["rows"])
        print(f"[faults] {len(result['rows'])} attacks; largest gap to the honest run {100 * worst:.2f} %")
        return 0
    outcomes = []
    for case in QUICK:
        outcomes.append(out := case())
        print(f"[faults] {'ok ' if out.ok else 'NO '} {out.fault}: {out.now}", flush=True)
    if not args.quick:
        with tempfile.TemporaryDirectory() as tmp:
            work = args.workdir or Path(tmp)
            for case in (case_supernode_killed, case_resume_bit_identical, case_simulation_worker_killed):
                outcomes.append(out := case(work / case.__name__))
                print(f"[faults] {'ok ' if out.ok else 'NO '} {out.fault}: {out.now}", flush=True)
    path = write_doc(outcomes)
    print(f"[faults] {sum(o.ok for o in outcomes)}/{len(outcomes)} contained; table in {path}")
    return 0 if all(o.ok for o in outcomes) else 1
