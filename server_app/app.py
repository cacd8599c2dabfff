"""Flower ServerApp: the SPES coordinator."""

from __future__ import annotations

import logging
import math
import shlex
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from client_app.trainer import evaluate
from data import load_tokenizer, prepare_blocks, tokenizer_to_json
from model import build_model, count_parameters, load_pretrained
from model.export import save_hf_atomic
from server_app import config as run_config
from server_app.nodes import discover_nodes
from server_app.run_log import RunLog, write_json_atomic
from strategy.codec import decode, encode
from strategy.spes import SpesStrategy

app = ServerApp()
log = logging.getLogger("spes.server")


def overrides_from(run_cfg: dict) -> list[str]:
    """Hydra overrides from the Flower run-config (`overrides` plus a few path keys)."""
    overrides = shlex.split(str(run_cfg.get("overrides", "")))
    if run_cfg.get("output-dir"):
        overrides.append(f"output_dir={run_cfg['output-dir']}")
    if run_cfg.get("node-work-dir"):
        overrides.append(f"node_work_dir={run_cfg['node-work-dir']}")
    return overrides


@app.main()
def main(grid: Grid, context: Context) -> None:
    spec = run_config.load(overrides_from(dict(context.run_config)))
    run(grid, spec)


def run(grid: Grid, spec: run_config.RunSpec) -> dict:
    t_start = time.time()
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "coordinator.log")
    logging.getLogger("spes").addHandler(handler)
    logging.getLogger("spes").setLevel(logging.INFO)
    print(f"[spes] run {spec.run_name}: outputs in {run_dir}", flush=True)

    cache = run_dir.parent / ".cache"
    tokenizer = load_tokenizer(spec.data, cache)
    _, heldout = prepare_blocks(spec.data, tokenizer, cache)
    torch.manual_seed(spec.seed)
    if spec.init_from:
        model = load_pretrained(spec.init_from)
    else:
        special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
        model = build_model(spec.model, len(tokenizer), seed=spec.seed, special_tokens=special)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocabulary {model.config.vocab_size} < tokenizer vocabulary {len(tokenizer)}")
    counts = count_parameters(model.config)

    token = f"{spec.run_name}-{uuid.uuid4().hex[:10]}"
    node_cfg = ConfigRecord({"run-config": spec.to_json(), "run-token": token})
    setup = ConfigRecord({**dict(node_cfg), "tokenizer-json": tokenizer_to_json(tokenizer)})
    partitions = discover_nodes(grid, spec.nodes, setup, spec.round_timeout_s)
    strategy = SpesStrategy(spec.strategy, model.config.num_experts, partitions, spec.rounds)
    trainable = {
        str(strategy.partitions[p]): counts["shared"] + len(experts) * counts["per_expert"]
        for p, experts in enumerate(strategy.ownership.owners)
    }
    print(
        f"[spes] {len(partitions)} nodes, partitions {strategy.partitions}; {counts['total']:,} parameters, "
        f"{max(trainable.values()):,} trainable per node; {spec.rounds} rounds x {spec.strategy.local_steps} steps",
        flush=True,
    )

    runlog = RunLog(
        run_dir, spec.logging.tensorboard, spec.logging.wandb, spec.logging.wandb_project, config=spec.raw
    )
    first: dict[str, float] = {}

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(decode(arrays), strict=True)
        loss, _ = evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, torch.device("cpu"))
        if server_round == 0:
            first["val_loss"] = loss
            print(f"[spes] round 0: held-out loss {loss:.4f}", flush=True)
            return MetricRecord({"val_loss": loss})
        record = dict(strategy.history[-1])
        record.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)), wall_s=time.time() - t_start)
        runlog.log_round(record)
        save_hf_atomic(model, run_dir / "model", tokenizer)
        write_json_atomic(run_dir / "strategy_state.json", strategy.state_dict())
        per_node = ", ".join(
            f"p{k}: {v['status']} {v.get('tokens_per_s', 0):.0f} tok/s" for k, v in record["nodes"].items()
        )
        print(
            f"[spes] round {server_round}/{spec.rounds}: held-out loss {loss:.4f}, train loss "
            f"{record['train_loss']:.4f}, up {record['bytes_up'] / 2**20:.1f} MiB, down "
            f"{record['bytes_down'] / 2**20:.1f} MiB, {record['wall_s']:.0f}s ({per_node})",
            flush=True,
        )
        return MetricRecord({"val_loss": loss})

    strategy.start(
        grid,
        initial_arrays=encode(model.state_dict()),
        num_rounds=spec.rounds,
        timeout=spec.round_timeout_s,
        train_config=node_cfg,
        evaluate_config=node_cfg,
        evaluate_fn=evaluate_fn,
    )
    summary = summarize(spec, runlog.rounds, first["val_loss"], counts, trainable, time.time() - t_start)
    write_json_atomic(run_dir / "summary.json", summary)
    runlog.plot_loss(first["val_loss"], [r["tokens"] for r in runlog.rounds])
    runlog.close()
    print(
        f"[spes] done in {summary['wall_s']:.0f}s: held-out loss {summary['first_val_loss']:.4f} -> "
        f"{summary['final_val_loss']:.4f}. Outputs: {run_dir} (model/, metrics.jsonl, summary.json, loss.png)",
        flush=True,
    )
    logging.getLogger("spes").removeHandler(handler)
    return summary


def summarize(spec, rounds: list[dict], first_val: float, counts: dict, trainable: dict, wall_s: float) -> dict:
    nodes = [n for r in rounds for n in r["nodes"].values()]
    n_rounds = max(len(rounds), 1)
    return {
        "run_name": spec.run_name,
        "strategy": spec.strategy_name,
        "model": spec.model.name,
        "rounds": len(rounds),
        "nodes": spec.nodes,
        "local_steps": spec.strategy.local_steps,
        "first_val_loss": first_val,
        "final_val_loss": rounds[-1]["val_loss"] if rounds else first_val,
        "val_loss_by_round": [first_val] + [r["val_loss"] for r in rounds],
        "final_train_loss": rounds[-1]["train_loss"] if rounds else None,
        "federated_eval_loss": rounds[-1].get("federated_eval_loss") if rounds else None,
        "tokens_trained": sum(r["tokens"] for r in rounds),
        "bytes_up": sum(r["bytes_up"] for r in rounds),
        "bytes_down": sum(r["bytes_down"] for r in rounds),
        "bytes_up_per_round_node": sum(n["bytes_up"] for n in nodes) / max(len(nodes), 1),
        "bytes_down_per_round_node": sum(n["bytes_down"] for n in nodes) / max(len(nodes), 1),
        "bytes_per_round": sum(r["bytes_up"] + r["bytes_down"] for r in rounds) / n_rounds,
        "wall_s": wall_s,
        "peak_mem_mb_node": max((n.get("peak_mem_mb", 0.0) for n in nodes), default=0.0),
        "tokens_per_s_node": sum(n.get("tokens_per_s", 0.0) for n in nodes) / max(len(nodes), 1),
        "trainable_params_node": max(trainable.values()),
        "trainable_params_by_partition": trainable,
        "total_params": counts["total"],
        "shared_params": counts["shared"],
        "params_per_expert": counts["per_expert"],
        "failed_node_rounds": sum(1 for n in nodes if n["status"] != "ok"),
    }
