"""Flower overhead: a simulated round's wall time against the same work without Flower.

The simulation runs every node as a Ray actor with 1 CPU (Ray then pins OMP_NUM_THREADS=1),
so at most `slots` = min(nodes, CPUs) nodes train at once. The bare side reproduces exactly
that: `slots` worker processes, 1 torch thread each, node p handled by worker p % slots,
every worker doing its nodes' round and then waiting for the others (a barrier, like the
coordinator waiting for all replies). Each node runs `client_app.local_round.run_local_round`
(what the ClientApp calls) with the run's config, tokenizer and data, so we time both

* `train` - the H-step `train_steps` loop alone (the bare training loop), and
* `local_round` - the whole node round without Flower: model build, loading the received
  tensors and the saved owned experts / AdamW state, data shard load, training, saving state.

A bare round's time is the slowest worker's sum over its nodes (they run in parallel).
The coordinator's own per-round work (held-out evaluation and the Hugging Face checkpoint
write, both done inside every simulated round) is timed here too, in this process.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import statistics
import tempfile
import time
from pathlib import Path

from strategy.round_record import RoundRecord


def cpu_slots() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _worker(
    spec_json: str, tok_json: str, nodes: list[int], owners: list[list[int]], rounds: int, workdir: str, barrier, queue
) -> None:
    import torch

    torch.set_num_threads(1)  # a simulated node is a 1-CPU Ray actor (OMP_NUM_THREADS=1)
    from client_app.local_round import NodeContext, RoundOrder, run_local_round
    from data import tokenizer_from_json
    from model import build_model, expert_param_names
    from server_app.config import RunSpec

    spec = RunSpec.from_json(spec_json)
    tok = tokenizer_from_json(tok_json)
    special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    init = build_model(spec.model, len(tok), seed=spec.seed, special_tokens=special).state_dict()
    h = spec.strategy.local_steps
    for r in range(rounds):
        barrier.wait()  # every round starts together, as the coordinator's messages do
        train_s = round_s = 0.0
        for p in nodes:
            ctx = NodeContext(spec, tok, Path(workdir) / f"partition-{p}", p, spec.nodes)
            full = r == 0  # round 1 gets the full model, later rounds all but the node's own experts
            own = set(expert_param_names(list(init), owners[p]))
            received = init if full else {k: v for k, v in init.items() if k not in own}
            t0 = time.perf_counter()
            _, metrics = run_local_round(ctx, received, RoundOrder(owners[p], full, r * h, h), show_progress=False)
            round_s += time.perf_counter() - t0
            train_s += metrics["train-seconds"]
        queue.put({"round": r + 1, "train_s": train_s, "local_round_s": round_s})
    barrier.wait()


def bare_rounds(overrides: list[str], rounds: int = 3) -> dict:
    """Time `rounds` bare rounds of every node of the run configured by `overrides`."""
    from data import load_tokenizer, tokenizer_to_json
    from server_app.config import load, run_dir
    from strategy.assignment import make_assignment

    spec = load(overrides)
    tok = load_tokenizer(spec.data, run_dir(spec).parent / ".cache")  # the coordinator's tokenizer
    owners = [list(o) for o in make_assignment(spec.strategy.assignment, spec.model.num_experts, spec.nodes).owners]
    slots = min(spec.nodes, cpu_slots())
    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(slots), ctx.Queue()
    print(
        f"[overhead] bare loop: {spec.nodes} nodes on {slots} processes x 1 thread, "
        f"{rounds} rounds of {spec.strategy.local_steps} steps",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="spes-bare-") as tmp:
        old = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned workers before torch loads
        try:
            common = (spec.to_json(), tokenizer_to_json(tok))
            procs = [
                ctx.Process(
                    target=_worker,
                    args=(*common, list(range(k, spec.nodes, slots)), owners, rounds, tmp, barrier, queue),
                )
                for k in range(slots)
            ]
            for pr in procs:
                pr.start()
            results = [queue.get(timeout=3600) for _ in range(slots * rounds)]
            for pr in procs:
                pr.join()
        finally:
            if old is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = old
        if any(pr.exitcode != 0 for pr in procs):
            raise RuntimeError("a bare-loop worker failed")
    by_round = []
    for r in range(1, rounds + 1):
        rs = [x for x in results if x["round"] == r]
        by_round.append(
            {"round": r, "train_s": max(x["train_s"] for x in rs), "local_round_s": max(x["local_round_s"] for x in rs)}
        )
        print(
            f"[overhead] bare round {r}: train loop {by_round[-1]['train_s']:.2f}s, "
            f"whole node round {by_round[-1]['local_round_s']:.2f}s",
            flush=True,
        )
    steady = by_round[1:] or by_round  # round 1 pays first-touch costs in the simulation too; skip it
    return {
        "slots": slots,
        "threads_per_node": 1,
        "rounds": rounds,
        "by_round": by_round,
        "train_s": statistics.mean(x["train_s"] for x in steady),
        "local_round_s": statistics.mean(x["local_round_s"] for x in steady),
    }


def coordinator_work(overrides: list[str], repeats: int = 2) -> dict:
    """Per-round coordinator work outside Flower: held-out evaluation + checkpoint write."""
    import torch

    from data import load_tokenizer, prepare_blocks
    from model import build_model
    from model.export import save_hf_atomic
    from server_app.config import load, run_dir
    from training.trainer import evaluate

    spec = load(overrides)
    cache = run_dir(spec).parent / ".cache"
    tok = load_tokenizer(spec.data, cache)
    _, heldout = prepare_blocks(spec.data, tok, cache)
    special = {"eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    model = build_model(spec.model, len(tok), seed=spec.seed, special_tokens=special)
    eval_s, save_s = [], []
    with tempfile.TemporaryDirectory(prefix="spes-coord-") as tmp:
        for _ in range(repeats):
            t0 = time.perf_counter()
            evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, torch.device("cpu"))
            t1 = time.perf_counter()
            save_hf_atomic(model, Path(tmp) / "model", tok)
            eval_s.append(t1 - t0)
            save_s.append(time.perf_counter() - t1)
    return {"eval_s": min(eval_s), "checkpoint_s": min(save_s)}


def sim_round_times(metrics: list[RoundRecord]) -> list[float]:
    """Per-round wall times of a simulation from metrics.jsonl (wall_s is cumulative)."""
    walls = [r.wall_s for r in metrics]
    return [b - a for a, b in zip(walls, walls[1:])]  # rounds 2..R; round 1 includes start-up


def measure(overrides: list[str], metrics: list[RoundRecord], rounds: int = 3) -> dict:
    sim = sim_round_times(metrics)
    if not sim:
        raise ValueError("the simulation needs at least 2 rounds to time a round without start-up")
    bare = bare_rounds(overrides, rounds)
    coord = coordinator_work(overrides)
    sim_round_s = statistics.mean(sim)
    accounted = bare["local_round_s"] + coord["eval_s"] + coord["checkpoint_s"]
    out = {
        "sim_round_s": sim_round_s,
        "sim_round_s_by_round": sim,
        "bare_round_s": bare["train_s"],
        "bare": bare,
        "coordinator": coord,
        "flower_overhead": sim_round_s / bare["train_s"],
        "sim_over_local_round": sim_round_s / bare["local_round_s"],
        # What is left of a simulated round after the node rounds and the coordinator's own
        # work: Flower/Ray messaging, ArrayRecord encode/decode, aggregation, merging, waiting.
        "unaccounted_s": sim_round_s - accounted,
    }
    print(
        f"[overhead] simulated round {sim_round_s:.2f}s vs bare train loop {bare['train_s']:.2f}s: "
        f"overhead x{out['flower_overhead']:.2f} (whole node round without Flower {bare['local_round_s']:.2f}s, "
        f"coordinator eval {coord['eval_s']:.2f}s + checkpoint {coord['checkpoint_s']:.2f}s)",
        flush=True,
    )
    return out
