"""The SPES coordinator: a run's setup, its round loop, the held-out evaluation, checkpoints and reports.

`run(grid, spec)` is what the ServerApp calls (server_app/app.py) and what the in-process engine
calls (engine/inprocess.py): it needs a Flower `Grid`, not Flower's runtime. One round: admit nodes
that connected, push the strategy's messages and collect replies (server_app/rounds.py), aggregate,
let the nodes evaluate when due, evaluate the new global model on the held-out split, then write the
round's record, the Hugging Face checkpoint and the resume checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from transformers.utils import logging as hf_logging

from common import keys
from common.atomic import write_json_atomic
from common.codec import encode
from common.spec import RunSpec
from data import bytes_per_token, load_tokenizer, prepare_blocks, tokenizer_to_json
from model import build_model, count_parameters, load_pretrained
from model.export import save_hf_atomic
from model.lora import LoraArgs, init_adapters, lora_args, merge_adapters, split_adapters
from model.naming import trained_param_names
from model.routing import set_router_bias
from model.upcycle import upcycle_from_args
from server_app import checkpoint
from server_app import config as run_config
from server_app.console import RunConsole, say
from server_app.provenance import provenance
from server_app.report import summary_rows, write_report
from server_app.rounds import Collector, RunFailed, admit_new_nodes, discover, release_nodes
from server_app.run_lock import move_aside, run_folder_lock
from server_app.run_log import RunLog
from server_app.summary import describe_hardware, failure_report, summarize
from strategy.federation_load import STARVING_ROUNDS, STARVING_SHARE
from strategy.round_record import RoundRecord
from strategy.spes import SpesStrategy
from training.trainer import evaluate

log = logging.getLogger("spes.server")
RELEASE_TIMEOUT_S = 120.0  # nodes stop their worker and delete their run folder: seconds, even at 1b
hf_logging.disable_progress_bar()  # one console line per round, not a bar per checkpoint write


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


def export_fields(spec: RunSpec, tokenizer) -> dict:
    """config.json fields of the exported checkpoint that say how it was trained and is meant to run:
    the balancing loss's weight, the tokenizer's special tokens, generation with a KV cache, and the
    sequence length it was trained at as its positions (model.max_seq_len is only an upper bound)."""
    fields = {
        "router_aux_loss_coef": spec.train.aux_loss_weight,
        "use_cache": True,
        "max_position_embeddings": spec.data.seq_len,
    }
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(tokenizer, name, None) is not None:
            fields[name] = getattr(tokenizer, name)
    return fields


@dataclass
class Start:
    """Where a run starts: its token (names the nodes' state directories), the round it continues
    after, the held-out loss before training, the LoRA adapters and the saved strategy state."""

    token: str
    after_round: int = 0
    first_val: float | None = None
    adapters: dict | None = None
    strategy_state: tuple[dict, dict] | None = None  # (state dict, outer buffers) of a resumed run


def _start(spec: RunSpec, model, lora: LoraArgs | None, resumed) -> Start:
    if resumed is None:
        # peft's init (B = 0): the adapted model starts equal to the initial model.
        adapters = {} if lora is None else init_adapters(model, lora, spec.seed)
        return Start(f"{spec.run_name}-{uuid.uuid4().hex[:10]}", adapters=adapters)
    params, buffers, state = resumed
    params, adapters = _split_adapters(params, lora, model)
    model.load_state_dict(params, strict=True)
    say(f"resuming after round {state['round']} (global step {state['strategy']['global_step']})")
    return Start(
        state["run_token"], int(state["round"]), state.get("first_val_loss"), adapters, (state["strategy"], buffers)
    )


def _strategy(spec: RunSpec, model, partitions: dict[int, int], start: Start, lora: LoraArgs | None) -> SpesStrategy:
    strategy = SpesStrategy(
        spec.strategy,
        model.config.num_experts,
        partitions,
        spec.rounds,
        max_tokens=spec.strategy.local_steps * spec.train.batch_size * spec.data.seq_len,
        num_layers=model.config.num_hidden_layers,
        max_eval_tokens=spec.eval.max_batches * spec.eval.batch_size * spec.data.seq_len,
        lora=lora is not None,
    )
    strategy.initialize({**model.state_dict(), **start.adapters})
    if start.strategy_state is not None:
        strategy.load_state_dict(*start.strategy_state)
    return strategy


def _trainable(strategy: SpesStrategy) -> dict[str, int]:
    """Parameters each partition trains: shared + owned experts, or with LoRA adapters + routers +
    norms + owned experts."""
    params = strategy.params
    return {
        str(p): sum(params[n].numel() for n in trained_param_names(params, strategy.owners[p], lora=strategy.lora))
        for p in strategy.partitions
    }


class CentralEval:
    """The coordinator's held-out loss of the global model. With LoRA the evaluated (and exported)
    model is the merged one, W + alpha/r * B @ A; `bias=False` scores it without the routing bias."""

    def __init__(self, model, heldout: torch.Tensor, spec: RunSpec, lora: LoraArgs | None, tokenizer) -> None:
        self.model, self.heldout, self.spec, self.lora = model, heldout, spec, lora
        scored = heldout[: spec.eval.batch_size * spec.eval.max_batches, 1:]  # the targets `evaluate` scores
        self.bytes_per_token = bytes_per_token(tokenizer, scored.tolist())

    def __call__(self, strategy: SpesStrategy, bias: bool = True) -> float:
        return self.score(
            strategy.params, strategy.router_bias if bias else None, self.heldout, self.spec.eval.max_batches
        )

    def score(self, params, router_bias, blocks: torch.Tensor, max_batches: int) -> float:
        params = params if self.lora is None else merge_adapters(params, self.lora)
        self.model.load_state_dict(params, strict=True)
        set_router_bias(self.model, router_bias)
        loss, _ = evaluate(self.model, blocks, self.spec.eval.batch_size, max_batches, torch.device("cpu"))
        return loss

    def guard(self, strategy: SpesStrategy):
        """The guard's loss of a candidate model (strategy/guard.py): held-out blocks after those reported on,
        or, where the held-out split is too small to spare them, its last blocks (then they overlap)."""
        wanted, reported = self.spec.strategy.guard.blocks, self.spec.eval.batch_size * self.spec.eval.max_batches
        blocks = self.heldout[reported : reported + wanted]
        if len(blocks) < wanted:
            blocks = self.heldout[-wanted:]
            log.warning(
                "held-out split of %d blocks: the guard's %d overlap the reported ones", len(self.heldout), len(blocks)
            )
        batches = math.ceil(len(blocks) / self.spec.eval.batch_size)
        return lambda params: self.score(params, strategy.router_bias, blocks, batches)


def run(grid: Grid, spec: RunSpec) -> dict:
    t_start = time.time()
    run_dir = run_config.run_dir(spec)
    ckpt_root = run_dir / "checkpoint"
    if not spec.resume and (checkpoint.rounds(ckpt_root) or (run_dir / "run.json").exists()):
        moved = move_aside(run_dir)  # an earlier run (flwr run twice with one run_name): kept, as python -m sim does
        say(f"an earlier run in {run_dir} was moved to {moved}")
    run_dir.mkdir(parents=True, exist_ok=True)
    with run_folder_lock(run_dir):
        resumed = checkpoint.load_latest(ckpt_root) if spec.resume else None
        if spec.resume and resumed is None:
            raise run_config.ConfigError(f"resume=true but {ckpt_root} holds no readable checkpoint")
        if not spec.resume and checkpoint.rounds(ckpt_root):
            raise run_config.ConfigError(
                f"{run_dir} already holds a run; continue it with resume=true or pick another run_name"
            )
        return _run_locked(grid, spec, run_dir, ckpt_root, resumed, t_start)


def _run_locked(grid: Grid, spec: RunSpec, run_dir: Path, ckpt_root: Path, resumed, t_start: float) -> dict:
    _record_provenance(run_dir / "run.json", spec, getattr(grid.run, "fab_hash", None), resumed is not None)
    handler = logging.FileHandler(run_dir / "coordinator.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("spes").addHandler(handler)
    logging.getLogger("spes").setLevel(logging.INFO)
    try:
        return _run(grid, spec, run_dir, ckpt_root, resumed, t_start)
    finally:
        logging.getLogger("spes").removeHandler(handler)
        handler.close()


# What a resume may change: how long the run goes on, where and how it runs, what is logged and
# evaluated. Anything else (the model, the data, the method, the learning schedule) must stay.
CHANGEABLE_ON_RESUME = (
    "resume",
    "rounds",
    "engine",
    "deterministic",
    "output_dir",
    "logging.",
    "eval.",
    "train.threads",
    "train.device",
    "train.resident",
    "train.save_in_background",
    "strategy.round_timeout_s",
    "strategy.max_failed_rounds",
    "strategy.federated_eval_every",
    "strategy.min_nodes",
    "strategy.guard.",  # how rounds are defended, not what they compute
)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _record_provenance(path: Path, spec: RunSpec, fab_hash: str | None, resuming: bool) -> None:
    """run.json: how the run was made; a resume appends how it was continued, after checking that it
    changes nothing but CHANGEABLE_ON_RESUME (a run started before run.json existed is not checked)."""
    made = provenance(spec.raw, fab_hash)
    if resuming and path.exists():
        first = json.loads(path.read_text())
        before, now = _flat(first.get("config", {})), _flat(spec.raw)
        changed = sorted(
            k
            for k in set(before) | set(now)
            if before.get(k) != now.get(k)
            and not any(k == c or (c.endswith(".") and k.startswith(c)) for c in CHANGEABLE_ON_RESUME)
        )
        if changed:
            shown = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed[:6])
            raise run_config.ConfigError(
                f"resume=true with settings the run did not start with ({shown}); resume with the same "
                "settings, changing only how long or where it runs (rounds, engine, logging, eval, ...)"
            )
        first.setdefault("resumes", []).append({k: v for k, v in made.items() if k != "config"})
        made = first
    write_json_atomic(path, made)


class _PhaseClock:
    """Seconds per phase of a round, each lap from the end of the last."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.phases[name] = now - self._last
        self._last = now


@dataclass
class _Run:
    """One run's coordinator: what its rounds share."""

    spec: RunSpec
    grid: Grid
    run_dir: Path
    strategy: SpesStrategy
    collector: Collector
    node_cfg: ConfigRecord  # sent with every message
    setup: ConfigRecord  # ... and the tokenizer, to nodes that join
    num_partitions: int  # the nodes' data sharding; a joiner must use it too
    hardware: dict[int, dict]  # partition -> how that node trains (its setup reply; shown, never acted on)
    evaluate: CentralEval
    runlog: RunLog
    tokenizer: object
    start: Start
    t_start: float
    warned: set = field(default_factory=set)  # starving experts the console has named

    def play_round(self, rnd: int, known: set[int]) -> RoundRecord:
        timeout = self.spec.strategy.round_timeout_s
        strategy, exchange = self.strategy, self.collector.exchange
        clock = _PhaseClock()
        self.hardware.update(
            admit_new_nodes(self.grid, strategy, self.setup, self.collector, known, timeout, self.num_partitions)
        )
        clock.lap("admit_s")
        messages = list(strategy.configure_train(rnd, None, self.node_cfg, self.grid))
        clock.lap("configure_s")
        sent_at = time.time()
        replies = exchange(messages, timeout, strategy.register_sent)
        clock.lap("train_exchange_s")
        strategy.aggregate_train(rnd, replies)
        clock.lap("aggregate_s")
        if strategy.federated_eval_due(rnd):
            eval_msgs = list(strategy.configure_evaluate(rnd, encode(strategy.params), self.node_cfg, self.grid))
            strategy.aggregate_evaluate(rnd, exchange(eval_msgs, timeout, strategy.register_sent))
            clock.lap("federated_eval_s")
        record = strategy.history[-1]
        record.val_loss = self.evaluate(strategy)
        if strategy.router_bias is not None:  # what the exported checkpoint (no router bias) scores
            record.val_loss_without_bias = self.evaluate(strategy, bias=False)
        record.val_ppl = math.exp(min(record.val_loss, 50.0))
        clock.lap("central_eval_s")
        record.timing = {**clock.phases, "train_sent_at": sent_at}
        record.wall_s = time.time() - self.t_start
        return record

    def persist(self, record: RoundRecord, first_val: float) -> None:
        """The round's line in metrics.jsonl, the exported model, the checkpoint a resume reads."""
        self.runlog.log_round(record)
        model_dir = self.run_dir / "model"
        save_hf_atomic(self.evaluate.model, model_dir, self.tokenizer, export_fields(self.spec, self.tokenizer))
        if self.strategy.router_bias is not None:
            write_json_atomic(
                model_dir / "router_bias.json",
                {
                    "router_bias": self.strategy.router_bias,
                    "note": "added to the router probabilities for the top-k choice only (spes model/routing.py); "
                    "stock transformers ignores this file",
                },
            )
        state = {"run_token": self.start.token, "first_val_loss": first_val, "strategy": self.strategy.state_dict()}
        checkpoint.save(
            self.run_dir / "checkpoint", record.round, self.strategy.params, self.strategy.outer_buffers(), state
        )
        write_json_atomic(self.run_dir / "strategy_state.json", self.strategy.state_dict())

    def warn_starving(self, record: RoundRecord) -> None:
        """Name each expert once on the console when it starts starving (strategy/federation_load.py)."""
        for layer, expert in record.starving_experts or []:
            if (layer, expert) not in self.warned:
                self.warned.add((layer, expert))
                say(
                    f"warning: layer {layer} expert {expert} has had under {STARVING_SHARE}x its uniform share of "
                    f"the routed tokens for {STARVING_ROUNDS} rounds in a row (starving)"
                )

    def finish(self, first_val: float, counts: dict, trainable: dict[str, int]) -> dict:
        rounds = self.runlog.rounds
        summary = summarize(self.spec, rounds, first_val, counts, trainable, time.time() - self.t_start)
        summary["events"] = self.strategy.events
        summary["node_hardware"] = {str(pid): hw for pid, hw in sorted(self.hardware.items())}
        summary["heldout_bytes_per_token"] = self.evaluate.bytes_per_token
        summary["final_val_bits_per_byte"] = summary["final_val_loss"] / math.log(2) / self.evaluate.bytes_per_token
        write_json_atomic(self.run_dir / "summary.json", summary)
        self.runlog.plot_loss(first_val, [r.tokens for r in rounds])
        self.runlog.close()
        write_report(self.run_dir, rounds, summary, self.spec.raw)
        for label, value in summary_rows(rounds, summary):  # so `flwr log <run-id> --show` carries the results
            say(f"  {label}: {value}")
        failures = [f"round {r.round} partition {p}: {s}" for r in rounds for p, s in r.failed_nodes().items()]
        if failures:
            say(f"{len(failures)} node-round(s) failed; first ones: " + "; ".join(failures[:5]))
        return summary


def _announce(spec: RunSpec, strategy: SpesStrategy, counts: dict, trainable: dict[str, int], lora) -> None:
    say(
        f"{len(strategy.partitions)} nodes, partitions {strategy.partitions}; {counts['total']:,} parameters, "
        f"{max(trainable.values()):,} trainable per node{'' if lora is None else f' (LoRA rank {lora.rank})'}; "
        f"{spec.rounds} rounds x {spec.strategy.local_steps} steps"
    )


def _setup(spec: RunSpec, run_dir: Path, grid: Grid, resumed, t_start: float) -> tuple[_Run, set[int]]:
    """Tokenizer, held-out data, the initial (or resumed) model; the nodes found and set up; the strategy."""
    cache = run_dir.parent / ".cache"
    tokenizer = load_tokenizer(spec.data, cache)
    _, heldout = prepare_blocks(spec.data, tokenizer, cache)
    model = _initial_model(spec, tokenizer)
    lora = lora_args(spec.train)
    start = _start(spec, model, lora, resumed)
    node_cfg = ConfigRecord(
        {keys.RUN_CONFIG: spec.to_json(), keys.RUN_TOKEN: start.token, keys.TOTAL_STEPS: spec.total_steps}
    )
    setup = ConfigRecord({**dict(node_cfg), keys.TOKENIZER_JSON: tokenizer_to_json(tokenizer)})
    collector = Collector(grid)
    partitions, num_partitions, hardware, asks = discover(
        grid, spec.nodes, setup, collector, spec.strategy.round_timeout_s
    )
    for pid, hw in sorted(hardware.items()):
        say(f"partition {pid} trains with {describe_hardware(hw)}")
    known = set(grid.get_node_ids())
    strategy = _strategy(spec, model, partitions, start, lora)
    for pid, ask in sorted(asks.items()):
        say(f"partition {pid} holds {ask} experts, its node-config residency (the run's: {spec.strategy.residency})")
        strategy.residency.ask(pid, ask)
    central_eval = CentralEval(model, heldout, spec, lora, tokenizer)
    strategy.guard_score = central_eval.guard(strategy)
    runlog = RunLog(
        run_dir,
        spec.logging.tensorboard,
        spec.logging.wandb,
        spec.logging.wandb_project,
        config=spec.raw,
        keep_rounds_upto=start.after_round if resumed is not None else None,
    )
    return _Run(
        spec,
        grid,
        run_dir,
        strategy,
        collector,
        node_cfg,
        setup,
        num_partitions,
        hardware,
        central_eval,
        runlog,
        tokenizer,
        start,
        t_start,
    ), known


def _run(grid, spec, run_dir, ckpt_root, resumed, t_start) -> dict:
    say(f"run {spec.run_name}: outputs in {run_dir}")
    coord, known = _setup(spec, run_dir, grid, resumed, t_start)
    strategy, start = coord.strategy, coord.start
    counts, trainable = count_parameters(coord.evaluate.model.config), _trainable(strategy)
    _announce(spec, strategy, counts, trainable, coord.evaluate.lora)
    first_val = start.first_val if start.first_val is not None else coord.evaluate(strategy)
    console = RunConsole(spec.rounds)
    console.start(
        coord.runlog.rounds[-1].val_loss if coord.runlog.rounds else first_val,
        wall_s=time.time() - t_start,
        done_rounds=start.after_round,
    )
    for rnd in range(start.after_round + 1, spec.rounds + 1):
        record = coord.play_round(rnd, known)
        coord.persist(record, first_val)
        console.round(record)
        coord.warn_starving(record)
        for pid, status in record.failed_nodes().items():
            log.warning("round %d partition %s: %s", rnd, pid, status)
        if strategy.failed_rounds >= spec.strategy.max_failed_rounds:
            console.close()
            raise RunFailed(failure_report(coord.runlog.rounds[-spec.strategy.max_failed_rounds :]))
    console.close()
    summary = coord.finish(first_val, counts, trainable)
    members = {strategy.membership.node_id(p): p for p in strategy.partitions}
    for line in release_nodes(grid, members, start.token, coord.collector, RELEASE_TIMEOUT_S):
        say(line)
    say(
        f"done in {summary['wall_s']:.0f}s: held-out loss {summary['first_val_loss']:.4f} -> "
        f"{summary['final_val_loss']:.4f}. Report: {run_dir / 'report.md'}"
    )
    return summary
