"""One node's round, without Flower: restore, load what arrived, train H steps, save, reply.

Restoring is rebuilding the model (uninitialised, straight on the device) and reading the saved
state, or, where the process kept this node from its last round (client_app/resident.py),
reusing that model and optimizer.

The ClientApp is a thin wrapper around `run_local_round`; the benchmarks call it directly to
measure the bare training loop against the same work inside a Flower simulation.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from client_app import background_save, resident
from client_app.delta_sync import delta_reply, fragment_globals, fragment_mixer
from client_app.node_state import NodeState, optimizer_tensors, restore_optimizer, saved_steps
from common.checks import all_finite
from common.codec import apply_delta, decode_sync
from common.spec import RunSpec
from data import BatchStream, node_shard, prepare_blocks
from model import build_model, expert_param_names
from model.experts import expert_modules, per_layer
from model.lora import lora_args, merge_adapters
from model.naming import fragment_names, peft_to_plain, trained_param_names
from model.routing import set_router_bias
from training import parallel
from training.trainer import evaluate, make_optimizer, resolve_device, train_steps

if TYPE_CHECKING:
    from flwr.app import ArrayRecord

log = logging.getLogger("spes.node")


@dataclass
class NodeContext:
    spec: RunSpec
    tokenizer: object
    workdir: Path
    partition_id: int
    num_partitions: int
    # A node that brings its own data trains on all of it instead of a shard of the common source.
    data_source: str | None = None
    progress: bool = True  # per-step progress bar on this node
    # Token blocks (train, held-out) given directly instead of read from the data source: the
    # GPU benchmark times a node round on synthetic tokens (scripts/gpu_check.py --mode round).
    blocks: tuple[torch.Tensor, torch.Tensor] | None = None


def _data(ctx: NodeContext) -> tuple[torch.Tensor, torch.Tensor]:
    if ctx.blocks is not None:
        return ctx.blocks
    cfg = ctx.spec.data
    pid, parts = ctx.partition_id, ctx.num_partitions
    if ctx.data_source:
        cfg, pid, parts = dataclasses.replace(cfg, source=ctx.data_source), 0, 1
    train, heldout = prepare_blocks(cfg, ctx.tokenizer, ctx.workdir.parent / "data-cache")
    shard = node_shard(train, pid, parts, cfg.partition, cfg.seed)
    held = node_shard(heldout, pid, parts, "contiguous", cfg.seed) if len(heldout) >= parts else heldout
    return shard, held


def _build(ctx: NodeContext, owned: list[int] | None, device: torch.device, absent=()) -> torch.nn.Module:
    """The node's model, uninitialised on `device`: every caller loads a whole state dict into it.

    Under bf16 the frozen experts are allocated in bf16 right away (loading casts into them, as
    `prepare_model` would), so the node never holds them in fp32. A node of several ranks gets
    its shard only (training/parallel.py), frozen experts in the owned ones' dtype.
    """
    special = {"eos_token_id": ctx.tokenizer.eos_token_id, "pad_token_id": ctx.tokenizer.pad_token_id}
    ranks = parallel.current()
    frozen = torch.bfloat16 if ctx.spec.train.precision == "bf16" and owned is not None and not ranks else None
    return build_model(
        ctx.spec.model,
        len(ctx.tokenizer),
        owned=owned,
        special_tokens=special,
        device=device,
        frozen_dtype=frozen,
        empty=True,
        shard=functools.partial(parallel.shard_model, device_type=device.type) if ranks else None,
        absent=absent,
        absent_policy=ctx.spec.strategy.absent_policy,
    )


def _device(ctx: NodeContext) -> torch.device:
    """Where this process trains; with several ranks, checks what they cannot share."""
    device = resolve_device(ctx.spec.train.device)
    ranks = parallel.current()
    if ranks is None:
        return device
    train = ctx.spec.train
    if lora_args(train) is not None:
        raise ValueError(f"partition {ctx.partition_id}: LoRA (train.lora_rank > 0) is not supported with gpus > 1")
    if train.batch_size % ranks.world:
        raise ValueError(
            f"partition {ctx.partition_id}: train.batch_size={train.batch_size} does not divide among "
            f"gpus={ranks.world} ranks"
        )
    return ranks.device(device)


def _round_model(
    ctx: NodeContext, owned: list[int], device: torch.device, absent=()
) -> tuple[torch.nn.Module, dict[str, str]]:
    """The model a node trains, and the plain (global-model) name of each of its tensors.

    With LoRA it is the Hugging Face model with peft's adapters injected (`get_base_model()`),
    so the trainer sees an ordinary model; peft's `.base_layer` / `.default` name parts never
    leave the node: what arrives, what is sent and the saved state all use plain names.
    """
    model = _build(ctx, owned, device, absent)
    args = lora_args(ctx.spec.train)
    if args is None:
        return model, {n: n for n in model.state_dict()}
    from model.lora import apply_lora  # imports peft: only when LoRA is on

    model = apply_lora(model, args, owned).get_base_model()
    return model, {n: peft_to_plain(n) for n in model.state_dict()}


class NeedsFullModel(RuntimeError):
    """The node cannot continue from a sparse downlink; the coordinator resends the full model."""


def _check_received(received: dict[str, torch.Tensor], partition_id: int) -> None:
    for name, tensor in received.items():
        if not all_finite(tensor):
            raise ValueError(f"partition {partition_id}: received {name} with NaN or Inf; refusing to train on it")


def _previous_state(state_root: Path, start_step: int) -> NodeState | None:
    """The newest saved state before `start_step` (the node missed rounds or the run moved on)."""
    for step in reversed(saved_steps(state_root)):
        if step < start_step and (state := NodeState.load(state_root, step)) is not None:
            return state
    return None


@dataclass
class DeltaDownlink:
    """A delta-sync message: the arrays (whole tensors and/or moves of the node's copy), the
    saved state holding the copy they apply to, and whether to first apply the node's own
    last uplink of its experts (the coordinator relayed it to the others instead of sending it back)."""

    record: ArrayRecord
    base_step: int
    apply_own: bool


def _saved(state_root: Path, step: int, kept: resident.ResidentNode | None) -> NodeState | None:
    """The node's state saved at `step`: the kept one in memory if it is that step, else from disk."""
    if kept is not None and kept.state.global_step == step:
        return kept.state
    return NodeState.load(state_root, step)


def _delta_start(
    ctx: NodeContext,
    delta: DeltaDownlink,
    expected: dict[str, torch.Tensor],
    full_model: bool,
    start_step: int,
    state_root: Path,
    kept: resident.ResidentNode | None,
) -> tuple[dict[str, torch.Tensor], NodeState | None]:
    """The node's copy of the global model for this round, and the saved state it continues."""
    cfg = ctx.spec.strategy
    whole, moves = decode_sync(delta.record, expected, (cfg.downlink, cfg.uplink))
    _check_received({**whole, **moves}, ctx.partition_id)
    if full_model:
        if set(whole) != set(expected):  # (a tensor sent as a move is not among the whole ones)
            raise ValueError(f"partition {ctx.partition_id}: a full resync must carry every tensor whole")
        saved = _saved(state_root, start_step, kept) or _previous_state(state_root, start_step)
        if saved is not None:
            saved.residual = {}  # error feedback restarts with a resync
        return whole, saved
    saved = _saved(state_root, delta.base_step, kept) if delta.base_step >= 0 else None
    if saved is None or set(saved.base) != set(expected) or (delta.apply_own and not saved.own_delta):
        raise NeedsFullModel(
            f"partition {ctx.partition_id}: no saved copy of the model at step {delta.base_step} in {state_root} "
            "for a delta downlink; the coordinator will resync this node next round"
        )
    base = dict(saved.base)
    if delta.apply_own:
        base.update({n: apply_delta(base[n], d) for n, d in saved.own_delta.items()})
    base.update(whole)
    base.update({n: apply_delta(base[n], d) for n, d in moves.items()})
    return base, saved


@dataclass(frozen=True)
class RoundOrder:
    """What the coordinator asked of this node for one round."""

    owned: list[int]  # experts this node trains
    full_model: bool  # the message holds the whole model (else: everything but the node's own experts)
    start_step: int  # global step the round starts at
    steps: int  # H, local steps to train
    total_steps: int | None = None  # end of the LR schedule (None: the spec's)
    delta: DeltaDownlink | None = None  # a delta-sync message, decoded inside the round
    global_load: torch.Tensor | None = None  # [layers, experts] federation's expert load last round
    router_bias: torch.Tensor | None = None  # [layers, experts] routing bias for the top-k choice
    fragment: int | None = None  # streaming fragments: the one this round sends (None: everything)
    absent: list[list[int]] = dataclasses.field(default_factory=list)  # per layer, experts not held ([]: all held)


@dataclass
class _Start:
    """Where this round's training starts: the model's tensors and the state it continues."""

    tensors: dict[str, torch.Tensor]
    saved: NodeState | None
    base: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # delta sync: the node's copy
    # Streaming fragments' overlap: the global values of the fragment synced last round, mixed in
    # after strategy.fragment_overlap steps (until then the node trains on from its own).
    delayed: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)


def run_local_round(
    ctx: NodeContext, received: dict[str, torch.Tensor], order: RoundOrder, show_progress: bool = True
) -> tuple[dict[str, torch.Tensor] | dict[str, np.ndarray], dict[str, float]]:
    """Train one round; the reply is the trained tensors, or with `order.delta` their encoded differences."""
    t_start = time.perf_counter()
    spec, train_cfg = ctx.spec, ctx.spec.train
    _check_order(ctx, order, received)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    device, ranks = _device(ctx), parallel.current()
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    state_root = ctx.workdir / "state"
    # The last round's state may still be being written (here or by another process), and a kept
    # model's optimizer moments are what that write reads: nothing goes on before it is on disk.
    waited = background_save.wait_for_saves(state_root)
    key = resident.ResidentKey(str(ctx.workdir), ctx.partition_id, spec.to_json(), str(device))
    kept = resident.take(key, order.start_step, order.owned) if train_cfg.resident else None
    if kept is not None and [list(m.absent) for m in expert_modules(kept.model)] != per_layer(
        order.absent, spec.model.num_layers
    ):
        kept = None  # it holds other experts than this round's: rebuilt
    if kept is None:
        model, plain = _round_model(ctx, order.owned, device, order.absent)
    else:
        model, plain = kept.model, kept.plain
    start = _start(ctx, order, received, {plain[n]: t for n, t in model.state_dict().items()}, state_root, kept)
    named = _load(ctx, model, plain, start.tensors, order.owned)
    optimizer = kept.optimizer if kept is not None else _optimizer(model, named, start.saved, train_cfg)
    shard, _ = _data(ctx)
    stream = BatchStream(shard, train_cfg.batch_size, seed=spec.seed * 7919 + ctx.partition_id)
    if start.saved is not None:
        stream.load_state_dict(start.saved.stream)
    mix = fragment_mixer(ctx.spec.strategy, named, start.delayed)
    metrics = _train(ctx, model, optimizer, stream, order, device, show_progress and not (ranks and ranks.rank), mix)
    out, new_state = _reply(ctx, model, plain, named, optimizer, stream, order, start)
    if ranks is None or ranks.rank == 0:  # rank 0 saves the node's state, gathered
        if train_cfg.save_in_background:
            background_save.save_after_reply(new_state, state_root)
        else:
            new_state.save(state_root)
    if ranks is not None:
        # The save (or its marker) is on disk before any rank starts the next round, so that every
        # rank continues from the same state.
        parallel.barrier()
    if train_cfg.resident:
        resident.keep(
            resident.ResidentNode(key, model, plain, optimizer, new_state), train_cfg.resident_budget_mb * 2**20
        )
    metrics["round-seconds"] = time.perf_counter() - t_start
    metrics["resident"] = float(kept is not None)
    metrics["save-wait-seconds"] = waited
    return out, metrics


def _check_order(ctx: NodeContext, order: RoundOrder, received: dict[str, torch.Tensor]) -> None:
    if order.start_step < 0 or order.steps < 1:
        raise ValueError(
            f"partition {ctx.partition_id}: bad round (global step {order.start_step}, {order.steps} local steps)"
        )
    owned = order.owned
    if len(set(owned)) != len(owned) or any(not 0 <= e < ctx.spec.model.num_experts for e in owned):
        raise ValueError(f"partition {ctx.partition_id}: bad owned experts {owned}")
    if order.absent and (
        len(order.absent) != ctx.spec.model.num_layers or any(set(r) & set(owned) for r in order.absent)
    ):
        raise ValueError(f"partition {ctx.partition_id}: bad absent experts {order.absent} (owned {owned})")
    _check_received(received, ctx.partition_id)


def _start(
    ctx: NodeContext,
    order: RoundOrder,
    received: dict[str, torch.Tensor],
    template: dict[str, torch.Tensor],
    state_root: Path,
    kept: resident.ResidentNode | None,
) -> _Start:
    """This round's tensors: what arrived, plus from the saved state what a sparse downlink left out."""
    if order.delta is not None:
        base, saved = _delta_start(ctx, order.delta, template, order.full_model, order.start_step, state_root, kept)
        tensors, delayed = dict(base), {}
        if saved is not None and saved.global_step == order.start_step:
            # Streaming fragments: what the node trained but did not send goes on from its own value
            # (with an overlap, so does what it sent, until the global value is mixed in).
            tensors.update({n: t for n, t in saved.local.items() if n in tensors})
            delayed = fragment_globals(ctx.spec.strategy, order.fragment, saved.local, base)
        return _Start(tensors, saved, base, delayed)
    saved = _saved(state_root, order.start_step, kept)
    tensors = dict(received)
    if not order.full_model:
        if saved is None or sorted(saved.owned) != sorted(order.owned):
            raise NeedsFullModel(
                f"partition {ctx.partition_id}: no usable saved state at global step {order.start_step} in "
                f"{state_root} for a sparse downlink; the coordinator will send the full model next round"
            )
        tensors.update({k: v for k, v in saved.owned_tensors.items() if k not in tensors})
    elif saved is None:
        saved = _previous_state(state_root, order.start_step)
        if saved is not None:
            log.warning(
                "partition %d: no state at global step %d; reusing optimizer moments and data position of step %d "
                "with the full model from the coordinator",
                ctx.partition_id,
                order.start_step,
                saved.global_step,
            )
    return _Start(tensors, saved)


def _load(
    ctx: NodeContext, model: torch.nn.Module, plain: dict[str, str], tensors: dict[str, torch.Tensor], owned: list[int]
) -> dict[str, torch.nn.Parameter]:
    """Load exactly the model's tensors; the model's parameters by plain name."""
    names = set(plain.values())
    missing, unexpected = names - tensors.keys(), tensors.keys() - names
    if missing:
        raise RuntimeError(
            f"partition {ctx.partition_id}: {len(missing)} parameters missing, e.g. {sorted(missing)[:3]}"
        )
    if unexpected:
        raise RuntimeError(
            f"partition {ctx.partition_id}: {len(unexpected)} unexpected parameters, e.g. {sorted(unexpected)[:3]}"
        )
    parallel.load_whole(model, {n: tensors[p] for n, p in plain.items()})
    named = {plain[n]: p for n, p in model.named_parameters()}
    lora = lora_args(ctx.spec.train) is not None
    sent = trained_param_names(list(plain.values()), owned, lora)
    if lora and (odd := {n for n, p in named.items() if p.requires_grad} ^ set(sent)):
        # The coordinator accepts exactly these names: training anything else would be lost.
        raise RuntimeError(
            f"partition {ctx.partition_id}: trainable parameters differ from those sent: {sorted(odd)[:3]}"
        )
    return named


def _optimizer(
    model: torch.nn.Module, named: dict[str, torch.nn.Parameter], saved: NodeState | None, train_cfg
) -> torch.optim.Optimizer:
    optimizer = make_optimizer(model, train_cfg)
    if saved is not None and saved.optimizer:
        restore_optimizer(optimizer, named, saved.optimizer)
    return optimizer


def _train(
    ctx: NodeContext,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    stream: BatchStream,
    order: RoundOrder,
    device: torch.device,
    show_progress: bool,
    after_step: Callable[[int], None] | None = None,
) -> dict[str, float]:
    spec = ctx.spec
    bar = tqdm(
        total=order.steps,
        desc=f"node {ctx.partition_id} steps {order.start_step}-{order.start_step + order.steps}",
        disable=not (show_progress and ctx.progress),
        mininterval=5.0,
        file=sys.stderr,
    )
    set_router_bias(model, order.router_bias)
    # Seeded after the build: a kept model skips the build, and must train exactly like a rebuilt one.
    torch.manual_seed(spec.seed * 100_003 + ctx.partition_id * 1_009 + order.start_step)
    metrics = train_steps(
        model,
        optimizer,
        stream,
        spec.train,
        order.start_step,
        order.steps,
        order.total_steps or spec.total_steps,
        device,
        bar,
        global_load=order.global_load,
        ranks=parallel.current(),
        after_step=after_step,
    )
    bar.close()
    metrics["trainable-params"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))
    metrics["resident-params"] = float(sum(p.numel() for p in model.parameters()))
    held = [parallel.local(p) for p in model.parameters()]  # a rank of a sharded node: its shard
    storages = {(str(t.device), t.untyped_storage().data_ptr()): t.untyped_storage().nbytes() for t in held}
    metrics["weight-mb"] = sum(storages.values()) / 2**20
    return metrics


def _reply(
    ctx: NodeContext,
    model: torch.nn.Module,
    plain: dict[str, str],
    named: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    stream: BatchStream,
    order: RoundOrder,
    start: _Start,
) -> tuple[dict[str, torch.Tensor] | dict[str, np.ndarray], NodeState]:
    """What the node sends (its trained tensors, or their encoded differences) and the state it keeps."""
    train_cfg = ctx.spec.train
    names = list(plain.values())
    owned_names = expert_param_names(names, order.owned)
    state = {plain[n]: t for n, t in model.state_dict().items()}
    reply = {
        n: _detached(parallel.full(state[n]), copy=train_cfg.resident)
        for n in trained_param_names(names, order.owned, lora_args(train_cfg) is not None)
    }
    common = {
        "global_step": order.start_step + order.steps,
        "owned": list(order.owned),
        "stream": stream.state_dict(),
        "optimizer": optimizer_tensors(optimizer, {p: n for n, p in named.items()}, parallel.full),
    }
    if order.delta is None:
        return reply, NodeState(**common, owned_tensors={n: reply[n] for n in owned_names})
    local, unsent = {}, set()
    if order.fragment is not None:
        sent = set(fragment_names(reply, order.fragment, ctx.spec.strategy.fragments))
        unsent = set(reply) - sent
        # With an overlap the node also trains on from what it sent, until its global value comes.
        local = {n: t for n, t in reply.items() if n in unsent or ctx.spec.strategy.fragment_overlap}
        reply, owned_names = {n: reply[n] for n in sent}, [n for n in owned_names if n in sent]
    out, residual, own_delta = delta_reply(ctx.spec.strategy, reply, start.base, start.saved, owned_names)
    if start.saved is not None:  # the residual of what was not sent waits for its fragment's turn
        residual = {**{n: r for n, r in start.saved.residual.items() if n in unsent}, **residual}
    return out, NodeState(**common, base=start.base, residual=residual, own_delta=own_delta, local=local)


def _detached(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """`t` as an fp32 CPU tensor; with `copy`, one that does not share storage with the model
    (a kept model trains on, and the reply and the kept state must not change with it)."""
    out = t.detach().float().cpu()
    return out.clone() if copy and out.data_ptr() == t.data_ptr() else out


def run_local_eval(
    ctx: NodeContext, received: dict[str, torch.Tensor], router_bias: torch.Tensor | None = None, absent=()
) -> tuple[float, int]:
    """Held-out loss of the received model on this node's shard; with `absent` experts (per layer),
    of the model as the node holds it."""
    _check_received(received, ctx.partition_id)
    device = _device(ctx)
    model = _build(ctx, [] if any(absent) else None, device, absent)
    args = lora_args(ctx.spec.train)
    parallel.load_whole(model, received if args is None else merge_adapters(received, args))
    set_router_bias(model, router_bias)
    _, held = _data(ctx)
    return evaluate(model, held, ctx.spec.eval.batch_size, ctx.spec.eval.max_batches, device)
