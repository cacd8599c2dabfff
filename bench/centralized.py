"""Centralized baseline: one process trains the same model on the union of the node shards.

    python -m bench.centralized <hydra overrides>      # same overrides as `python -m sim`

Matched to the federated run with the same overrides: the same initial model (seed), the same
held-out split and evaluation settings, rounds * H optimizer steps with a batch of
nodes * train.batch_size sequences (so the tokens seen equal the federated run's), the same
LR schedule over total_steps = rounds * H, and a held-out evaluation every H steps (the
federated run evaluates once per round). Outputs (summary.json, metrics.jsonl, loss.png and the
final model in model/, a Hugging Face checkpoint) go to <output_dir>/<run_name>/ in the federated
run's shape; bytes are 0 and the single process counts as the one "node".
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time

import torch

from common import keys


def run(overrides: list[str]) -> dict:
    from common.atomic import write_json_atomic
    from data import BatchStream, load_tokenizer, node_shard, prepare_blocks
    from model import build_model, count_parameters
    from model.export import save_hf_atomic
    from server_app.config import load
    from server_app.config import run_dir as run_dir_of
    from server_app.run_log import RunLog
    from server_app.summary import summarize
    from strategy.round_record import RoundRecord
    from training.trainer import evaluate, make_optimizer, resolve_device, train_steps

    t_start = time.time()
    spec = load(overrides)
    run_dir = run_dir_of(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "summary.json").unlink(missing_ok=True)
    if spec.train.threads:
        torch.set_num_threads(spec.train.threads)
    device = resolve_device(spec.train.device)

    # The coordinator's cache location, so a bench run shares the federated runs' tokenizer.
    cache = run_dir.parent / ".cache"
    tokenizer = load_tokenizer(spec.data, cache)
    train, heldout = prepare_blocks(spec.data, tokenizer, cache)
    n, h = spec.nodes, spec.strategy.local_steps
    # Union of exactly the blocks the nodes train on (the remainder of an uneven split is unused there too).
    union = torch.cat([node_shard(train, p, n, spec.data.partition, spec.data.seed) for p in range(n)])
    cfg = dataclasses.replace(spec.train, batch_size=n * spec.train.batch_size)
    stream = BatchStream(union, cfg.batch_size, seed=spec.seed * 7919)

    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    model = build_model(spec.model, len(tokenizer), seed=spec.seed, special_tokens=special).to(device)
    optimizer = make_optimizer(model, cfg)
    counts = count_parameters(model.config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(
        f"[centralized] {counts['total']:,} parameters, {spec.rounds} x {h} steps of batch {cfg.batch_size} "
        f"(= {n} nodes x {spec.train.batch_size}); outputs in {run_dir}",
        flush=True,
    )

    first, _ = evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, device)
    print(f"[centralized] step 0: held-out loss {first:.4f}", flush=True)
    runlog = RunLog(run_dir)
    for r in range(1, spec.rounds + 1):
        m = train_steps(model, optimizer, stream, cfg, (r - 1) * h, h, spec.total_steps, device)
        loss, _ = evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, device)
        node = {
            "partition_id": 0,
            "status": "ok",
            "bytes_up": 0,
            "bytes_down": 0,
            **_node_metrics({**m, "trainable-params": trainable}, spec.model.num_experts),
        }
        record = RoundRecord(
            round=r,
            global_step=r * h,
            applied=True,
            valid_updates=1,
            tokens=m["num-tokens"],
            train_loss=m["train-loss"],
            nodes={"0": node},
            val_loss=loss,
            val_ppl=math.exp(min(loss, 50.0)),
            wall_s=time.time() - t_start,
        )
        runlog.log_round(record)
        print(
            f"[centralized] step {r * h}/{spec.total_steps}: held-out loss {loss:.4f}, train loss "
            f"{m['train-loss']:.4f}, {m['tokens-per-s']:.0f} tok/s, {record.wall_s:.0f}s",
            flush=True,
        )

    # The final model, as a federated run leaves it: for `python -m evaluation` and side-by-side analysis.
    save_hf_atomic(model, run_dir / "model", tokenizer)
    summary = summarize(spec, runlog.rounds, first, counts, {"0": counts["total"]}, time.time() - t_start)
    summary.update(strategy="centralized", nodes=1, federated_nodes=n, batch_size=cfg.batch_size)
    write_json_atomic(run_dir / "summary.json", summary)
    runlog.plot_loss(first, [r.tokens for r in runlog.rounds])
    runlog.close()
    print(
        f"[centralized] done in {summary['wall_s']:.0f}s: held-out loss {first:.4f} -> {summary['final_val_loss']:.4f}",
        flush=True,
    )
    return summary


def _node_metrics(metrics, num_experts: int) -> dict:
    """The training loop's metrics as the run log records a node's (the baseline is the one \"node\")."""
    out = {k.replace("-", "_"): float(metrics[k]) for k in keys.NODE_METRICS if k in metrics}
    if keys.EXPERT_LOAD in metrics:
        load = [float(x) for x in metrics[keys.EXPERT_LOAD]]
        out["expert_load"] = [load[i : i + num_experts] for i in range(0, len(load), num_experts)]
    return out


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    from server_app.config import ConfigError

    try:
        run(argv)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
