"""Flower ServerApp: the SPES coordinator (config, init, round loop, evaluation, checkpoints)."""

from __future__ import annotations

import logging
import math
import shlex
import time
import uuid
from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from transformers.utils import logging as hf_logging

from training.trainer import evaluate
from common import keys
from common.codec import encode
from common.spec import RunSpec
from data import load_tokenizer, prepare_blocks, tokenizer_to_json
from model import build_model, count_parameters, load_pretrained
from model.export import save_hf_atomic
from model.lora import LoraArgs, init_adapters, lora_args, merge_adapters, split_adapters
from model.naming import trained_param_names
from model.routing import set_router_bias
from model.upcycle import upcycle_from_args
from server_app import checkpoint
from server_app import config as run_config
from server_app.console import RunConsole
from server_app.report import write_report
from server_app.rounds import Collector, RunFailed, admit_new_nodes, discover
from server_app.run_log import RunLog, write_json_atomic
from server_app.ray_workers import replace_dead_actors
from strategy.spes import SpesStrategy

app = ServerApp()
log = logging.getLogger("spes.server")
hf_logging.disable_progress_bar()  # one console line per round, not a bar per checkpoint write


def overrides_from(run_cfg: dict) -> list[str]:
    """Hydra overrides from the Flower run-config (`overrides` plus `output-dir`)."""
    overrides = shlex.split(str(run_cfg.get("overrides", "")))
    if run_cfg.get("output-dir"):
        overrides.append(f"output_dir={run_cfg['output-dir']}")
    return overrides


@app.main()
def main(grid: Grid, context: Context) -> None:
    replace_dead_actors()  # a Flower simulation only: Flower would keep handing jobs to a dead Ray worker
    spec = run_config.load(overrides_from(dict(context.run_config)))
    run(grid, spec)


def _initial_model(spec: RunSpec, tokenizer):
    torch.manual_seed(spec.seed)
    special = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if spec.init_from:
        model = load_pretrained(spec.init_from)
    elif spec.model.init == "upcycle":
        model = upcycle_from_args(spec.model, seed=spec.seed, special_tokens=special)
    else:
        model = build_model(spec.model, len(tokenizer), seed=spec.seed, special_tokens=special)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocabulary {model.config.vocab_size} < tokenizer vocabulary {len(tokenizer)}")
    return model


def _split_adapters(params: dict, lora: LoraArgs | None, model) -> tuple[dict, dict]:
    """A checkpoint's (base weights, LoRA adapters), checked against this run's LoRA settings."""
    try:
        return split_adapters(params, lora, model)
    except ValueError as exc:
        raise run_config.ConfigError(
            f"the checkpoint holds {exc}: resume with the LoRA settings the run was started with"
        ) from None


def run(grid: Grid, spec: RunSpec) -> dict:
    t_start = time.time()
    run_dir = run_config.run_dir(spec)
    ckpt_root = run_dir / "checkpoint"
    resumed = checkpoint.load_latest(ckpt_root) if spec.resume else None
    if spec.resume and resumed is None:
        raise run_config.ConfigError(f"resume=true but {ckpt_root} holds no readable checkpoint")
    if not spec.resume and checkpoint.rounds(ckpt_root):
        raise run_config.ConfigError(
            f"{run_dir} already holds a run; continue it with resume=true or pick another run_name"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("spes").addHandler(handler)
    logging.getLogger("spes").setLevel(logging.INFO)
    try:
        return _run(grid, spec, run_dir, ckpt_root, resumed, t_start)
    finally:
        logging.getLogger("spes").removeHandler(handler)
        handler.close()


def _run(grid, spec, run_dir, ckpt_root, resumed, t_start) -> dict:
    print(f"[spes] run {spec.run_name}: outputs in {run_dir}", flush=True)
    cache = run_dir.parent / ".cache"
    tokenizer = load_tokenizer(spec.data, cache)
    _, heldout = prepare_blocks(spec.data, tokenizer, cache)
    model = _initial_model(spec, tokenizer)
    counts = count_parameters(model.config)
    lora = lora_args(spec.train)
    start_round, first_val = 0, None
    if resumed is not None:
        params, buffers, state = resumed
        params, adapters = _split_adapters(params, lora, model)
        model.load_state_dict(params, strict=True)
        token, start_round, first_val = state["run_token"], int(state["round"]), state.get("first_val_loss")
        print(f"[spes] resuming after round {start_round} (global step {state['strategy']['global_step']})", flush=True)
    else:
        token = f"{spec.run_name}-{uuid.uuid4().hex[:10]}"
        # peft's init (B = 0): the adapted model starts equal to the initial model.
        adapters = {} if lora is None else init_adapters(model, lora, spec.seed)

    node_cfg = ConfigRecord({keys.RUN_CONFIG: spec.to_json(), keys.RUN_TOKEN: token,
                             keys.TOTAL_STEPS: spec.total_steps})
    setup = ConfigRecord({**dict(node_cfg), keys.TOKENIZER_JSON: tokenizer_to_json(tokenizer)})
    timeout = spec.strategy.round_timeout_s
    collector = Collector(grid)
    partitions = discover(grid, spec.nodes, setup, collector, timeout)
    known = set(grid.get_node_ids())
    max_tokens = spec.strategy.local_steps * spec.train.batch_size * spec.data.seq_len
    strategy = SpesStrategy(spec.strategy, model.config.num_experts, partitions, spec.rounds,
                            max_tokens=max_tokens, num_layers=model.config.num_hidden_layers,
                            max_eval_tokens=spec.eval.max_batches * spec.eval.batch_size * spec.data.seq_len,
                            lora=lora is not None)
    strategy.params = {**{k: v.detach().clone() for k, v in model.state_dict().items()}, **adapters}
    if resumed is not None:
        strategy.load_state_dict(resumed[2]["strategy"], resumed[1])
        strategy.history = []
    # shared + owned experts, or with LoRA adapters + routers + norms + owned experts
    trainable = {str(p): sum(strategy.params[n].numel() for n in
                             trained_param_names(strategy.params, strategy.owners[p], lora=lora is not None))
                 for p in strategy.partitions}
    print(
        f"[spes] {len(partitions)} nodes, partitions {strategy.partitions}; {counts['total']:,} parameters, "
        f"{max(trainable.values()):,} trainable per node{'' if lora is None else f' (LoRA rank {lora.rank})'}; "
        f"{spec.rounds} rounds x {spec.strategy.local_steps} steps",
        flush=True,
    )
    runlog = RunLog(run_dir, spec.logging.tensorboard, spec.logging.wandb, spec.logging.wandb_project,
                    config=spec.raw, keep_rounds_upto=start_round if resumed is not None else None)

    def central_eval(bias=True) -> float:
        # With LoRA the evaluated (and exported) model is the merged one: W + alpha/r * B @ A.
        model.load_state_dict(strategy.params if lora is None else merge_adapters(strategy.params, lora), strict=True)
        set_router_bias(model, strategy.router_bias if bias else None)
        loss, _ = evaluate(model, heldout, spec.eval.batch_size, spec.eval.max_batches, torch.device("cpu"))
        return loss

    if first_val is None:
        first_val = central_eval()
    console = RunConsole(spec.rounds)
    console.start(runlog.rounds[-1]["val_loss"] if runlog.rounds else first_val,
                  wall_s=time.time() - t_start, done_rounds=start_round)

    for rnd in range(start_round + 1, spec.rounds + 1):
        admit_new_nodes(grid, strategy, setup, collector, known, timeout)
        messages = list(strategy.configure_train(rnd, None, node_cfg, grid))
        replies = collector.exchange(messages, timeout, strategy.register_sent)
        strategy.aggregate_train(rnd, replies)
        record = dict(strategy.history[-1])
        if rnd == spec.rounds or (spec.strategy.federated_eval_every and rnd % spec.strategy.federated_eval_every == 0):
            eval_msgs = list(strategy.configure_evaluate(rnd, encode(strategy.params), node_cfg, grid))
            strategy.aggregate_evaluate(rnd, collector.exchange(eval_msgs, timeout, strategy.register_sent))
            record = dict(strategy.history[-1])
        loss = central_eval()
        if strategy.router_bias is not None:  # what the exported checkpoint (no router bias) scores
            record["val_loss_without_bias"] = central_eval(bias=False)
        record.update(val_loss=loss, val_ppl=math.exp(min(loss, 50.0)), wall_s=time.time() - t_start)
        runlog.log_round(record)
        save_hf_atomic(model, run_dir / "model", tokenizer)
        if strategy.router_bias is not None:
            write_json_atomic(run_dir / "model" / "router_bias.json", {
                "router_bias": strategy.router_bias,
                "note": "added to the router probabilities for the top-k choice only (spes model/routing.py); "
                        "stock transformers ignores this file"})
        state = {"run_token": token, "first_val_loss": first_val, "strategy": strategy.state_dict()}
        checkpoint.save(ckpt_root, rnd, strategy.params, strategy.outer_buffers(), state)
        write_json_atomic(run_dir / "strategy_state.json", strategy.state_dict())
        console.round(record)
        for pid, node in record["nodes"].items():
            if node["status"] != "ok":
                log.warning("round %d partition %s: %s", rnd, pid, node["status"])
        if strategy.failed_rounds >= spec.strategy.max_failed_rounds:
            console.close()
            raise RunFailed(_failure_report(runlog.rounds[-spec.strategy.max_failed_rounds:]))

    summary = summarize(spec, runlog.rounds, first_val, counts, trainable, time.time() - t_start)
    summary["events"] = strategy.events
    write_json_atomic(run_dir / "summary.json", summary)
    runlog.plot_loss(first_val, [r["tokens"] for r in runlog.rounds])
    runlog.close()
    write_report(run_dir, runlog.rounds, summary, spec.raw)
    console.close()
    failures = [f"round {r['round']} partition {p}: {n['status']}" for r in runlog.rounds
                for p, n in r["nodes"].items() if n["status"] != "ok"]
    if failures:
        print(f"[spes] {len(failures)} node-round(s) failed; first ones: " + "; ".join(failures[:5]), flush=True)
    print(
        f"[spes] done in {summary['wall_s']:.0f}s: held-out loss {summary['first_val_loss']:.4f} -> "
        f"{summary['final_val_loss']:.4f}. Report: {run_dir / 'report.md'}",
        flush=True,
    )
    return summary


def _failure_report(rounds: list[dict]) -> str:
    lines = [f"{len(rounds)} rounds in a row below quorum; the run stops."]
    for r in rounds:
        bad = {p: n["status"] for p, n in r["nodes"].items() if n["status"] != "ok"}
        lines.append(f"round {r['round']}: {r['refused']}; " + "; ".join(f"partition {p}: {s}" for p, s in bad.items()))
    return "\n".join(lines)


def _node_round_overhead(nodes: list[dict]) -> dict:
    """Share of these node-rounds' time spent outside the training loop (model build, loading what
    arrived and the saved state, saving it), and how many found their model kept in memory."""
    timed = [n for n in nodes if n.get("round_seconds")]
    if not timed:
        return {}
    return {
        "node_round_overhead": 1 - sum(n.get("train_seconds", 0.0) for n in timed) / sum(n["round_seconds"] for n in timed),
        "node_rounds_resident": sum(1 for n in timed if n.get("resident")),
        "node_rounds_timed": len(timed),
    }


def summarize(spec, rounds: list[dict], first_val: float, counts: dict, trainable: dict, wall_s: float) -> dict:
    nodes = [n for r in rounds for n in r["nodes"].values()]
    ok_nodes = [n for n in nodes if n["status"] == "ok"]
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
        "tokens_per_s_node": sum(n.get("tokens_per_s", 0.0) for n in ok_nodes) / max(len(ok_nodes), 1),
        # Round 1 also prepares each node's data (once per run): left out where there are later rounds.
        **_node_round_overhead([n for r in (rounds[1:] or rounds) for n in r["nodes"].values() if n["status"] == "ok"]),
        "trainable_params_node": max(trainable.values()),
        "trainable_params_by_partition": trainable,
        "total_params": counts["total"],
        "shared_params": counts["shared"],
        "params_per_expert": counts["per_expert"],
        "failed_node_rounds": sum(1 for n in nodes if n["status"] != "ok"),
    }
