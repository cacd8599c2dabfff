"""One node's round, without Flower: restore, load what arrived, train H steps, save, reply.

Restoring is rebuilding the model (uninitialised, straight on the device) and reading the saved
state, or, where the process kept this node from its last round (client_app/resident.py),
reusing that model and optimizer.

The ClientApp is a thin wrapper around `run_local_round`; the benchmarks call it directly to
measure the bare training loop against the same work inside a Flower simulation.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm import tqdm

from client_app import background_save, resident
from client_app.node_state import NodeState, optimizer_tensors, restore_optimizer, saved_steps
from training.trainer import evaluate, make_optimizer, resolve_device, train_steps
from data import BatchStream, node_shard, prepare_blocks
from model import build_model, expert_param_names
from model.lora import lora_args, merge_adapters
from model.naming import peft_to_plain, trained_param_names
from model.routing import set_router_bias
from common.checks import all_finite
from common.codec import apply_delta, decode_delta, decode_sync, encode_delta
from common.spec import RunSpec

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


def _build(ctx: NodeContext, owned: list[int] | None, device: torch.device) -> torch.nn.Module:
    """The node's model, uninitialised on `device`: every caller loads a whole state dict into it.

    Under bf16 the frozen experts are allocated in bf16 right away (loading casts into them, as
    `prepare_model` would), so the node never holds them in fp32.
    """
    special = {"eos_token_id": ctx.tokenizer.eos_token_id, "pad_token_id": ctx.tokenizer.pad_token_id}
    frozen = torch.bfloat16 if ctx.spec.train.precision == "bf16" and owned is not None else None
    return build_model(ctx.spec.model, len(ctx.tokenizer), owned=owned, special_tokens=special, device=device,
                       frozen_dtype=frozen, empty=True)


def _round_model(ctx: NodeContext, owned: list[int], device: torch.device) -> tuple[torch.nn.Module, dict[str, str]]:
    """The model a node trains, and the plain (global-model) name of each of its tensors.

    With LoRA it is the Hugging Face model with peft's adapters injected (`get_base_model()`),
    so the trainer sees an ordinary model; peft's `.base_layer` / `.default` name parts never
    leave the node: what arrives, what is sent and the saved state all use plain names.
    """
    model = _build(ctx, owned, device)
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
    ctx: NodeContext, delta: DeltaDownlink, expected: dict[str, torch.Tensor], full_model: bool, start_step: int,
    state_root: Path, kept: resident.ResidentNode | None,
) -> tuple[dict[str, torch.Tensor], NodeState | None]:
    """The node's copy of the global model for this round, and the saved state it continues."""
    cfg = ctx.spec.strategy
    whole, moves = decode_sync(delta.record, expected, (cfg.downlink, cfg.uplink))
    _check_received({**whole, **moves}, ctx.partition_id)
    if full_model:
        if moves or set(whole) != set(expected):
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


def _delta_reply(
    ctx: NodeContext, trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], saved: NodeState | None,
    owned_names: list[str],
) -> tuple[dict[str, np.ndarray], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(uplink arrays, new residual, decoded differences of the owned experts)."""
    cfg = ctx.spec.strategy
    diff = {n: t - base[n] for n, t in trained.items()}
    if cfg.error_feedback and saved is not None:
        for n, r in saved.residual.items():
            if n in diff and r.shape == diff[n].shape:
                diff[n] = diff[n] + r
    arrays = encode_delta(diff, cfg.uplink)
    sent = decode_delta(arrays, {n: base[n] for n in diff}, cfg.uplink)
    residual = {n: diff[n] - sent[n] for n in diff} if cfg.error_feedback else {}
    return arrays, residual, {n: sent[n] for n in owned_names}


def run_local_round(
    ctx: NodeContext,
    received: dict[str, torch.Tensor],
    owned: list[int],
    full_model: bool,
    start_step: int,
    steps: int,
    show_progress: bool = True,
    total_steps: int | None = None,
    delta: DeltaDownlink | None = None,
    global_share: torch.Tensor | None = None,
    router_bias: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor] | dict[str, np.ndarray], dict[str, float]]:
    """Train one round; the reply is the trained tensors, or with `delta` their encoded differences.

    global_share / router_bias ([layers, experts]): the federation's expert load last round and
    the routing bias for the top-k choice (model/routing.py), when the coordinator sends them.
    """
    t_start = time.perf_counter()
    spec, train_cfg = ctx.spec, ctx.spec.train
    if start_step < 0 or steps < 1:
        raise ValueError(f"partition {ctx.partition_id}: bad round (global step {start_step}, {steps} local steps)")
    if len(set(owned)) != len(owned) or any(not 0 <= e < spec.model.num_experts for e in owned):
        raise ValueError(f"partition {ctx.partition_id}: bad owned experts {owned}")
    _check_received(received, ctx.partition_id)
    if train_cfg.threads:
        torch.set_num_threads(train_cfg.threads)
    device = resolve_device(train_cfg.device)
    if spec.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)

    state_root = ctx.workdir / "state"
    # The last round's state may still be being written (here or by another process), and a kept
    # model's optimizer moments are what that write reads: nothing goes on before it is on disk.
    waited = background_save.wait_for_saves(state_root)
    key = resident.ResidentKey(str(ctx.workdir), ctx.partition_id, spec.to_json(), str(device))
    kept = resident.take(key, start_step, owned) if train_cfg.resident else None
    model, plain = (kept.model, kept.plain) if kept is not None else _round_model(ctx, owned, device)
    names = list(plain.values())
    owned_names = expert_param_names(names, owned)
    lora = lora_args(train_cfg) is not None
    sent_names = trained_param_names(names, owned, lora)
    base: dict[str, torch.Tensor] = {}
    if delta is not None:
        template = {plain[n]: t for n, t in model.state_dict().items()}
        base, saved = _delta_start(ctx, delta, template, full_model, start_step, state_root, kept)
        tensors = dict(base)
    else:
        saved = _saved(state_root, start_step, kept)
        tensors = dict(received)
        if not full_model:
            if saved is None or sorted(saved.owned) != sorted(owned):
                raise NeedsFullModel(
                    f"partition {ctx.partition_id}: no usable saved state at global step {start_step} in {state_root} "
                    "for a sparse downlink; the coordinator will send the full model next round"
                )
            tensors.update({k: v for k, v in saved.owned_tensors.items() if k not in tensors})
        elif saved is None:
            saved = _previous_state(state_root, start_step)
            if saved is not None:
                log.warning(
                    "partition %d: no state at global step %d; reusing optimizer moments and data position of step %d "
                    "with the full model from the coordinator", ctx.partition_id, start_step, saved.global_step,
                )
    missing = set(names) - tensors.keys()
    if missing:
        raise RuntimeError(f"partition {ctx.partition_id}: {len(missing)} parameters missing, e.g. {sorted(missing)[:3]}")
    unexpected = tensors.keys() - set(names)
    if unexpected:
        raise RuntimeError(
            f"partition {ctx.partition_id}: {len(unexpected)} unexpected parameters, e.g. {sorted(unexpected)[:3]}"
        )
    model.load_state_dict({n: tensors[p] for n, p in plain.items()}, strict=True)
    named = {plain[n]: p for n, p in model.named_parameters()}
    if lora and (odd := {n for n, p in named.items() if p.requires_grad} ^ set(sent_names)):
        # The coordinator accepts exactly sent_names: training anything else would be lost.
        raise RuntimeError(f"partition {ctx.partition_id}: trainable parameters differ from those sent: {sorted(odd)[:3]}")

    if kept is not None:
        optimizer = kept.optimizer  # its moments are those saved at start_step
    else:
        optimizer = make_optimizer(model, train_cfg)
        if saved is not None and saved.optimizer:
            restore_optimizer(optimizer, named, saved.optimizer)
    shard, _ = _data(ctx)
    stream = BatchStream(shard, train_cfg.batch_size, seed=spec.seed * 7919 + ctx.partition_id)
    if saved is not None:
        stream.load_state_dict(saved.stream)

    bar = tqdm(
        total=steps,
        desc=f"node {ctx.partition_id} steps {start_step}-{start_step + steps}",
        disable=not (show_progress and ctx.progress),
        mininterval=5.0,
        file=sys.stderr,
    )
    total = total_steps or spec.total_steps
    set_router_bias(model, router_bias)
    # Seeded after the build: a kept model skips the build, and must train exactly like a rebuilt one.
    torch.manual_seed(spec.seed * 100_003 + ctx.partition_id * 1_009 + start_step)
    metrics = train_steps(model, optimizer, stream, train_cfg, start_step, steps, total, device, bar,
                          global_share=global_share)
    bar.close()
    metrics["trainable-params"] = float(sum(p.numel() for p in model.parameters() if p.requires_grad))

    state = {plain[n]: t for n, t in model.state_dict().items()}
    reply = {n: _detached(state[n], copy=train_cfg.resident) for n in sent_names}
    common = dict(global_step=start_step + steps, owned=list(owned), stream=stream.state_dict(),
                  optimizer=optimizer_tensors(optimizer, {p: n for n, p in named.items()}))
    out: dict[str, torch.Tensor] | dict[str, np.ndarray] = reply
    if delta is not None:
        out, residual, own_delta = _delta_reply(ctx, reply, base, saved, owned_names)
        new_state = NodeState(**common, base=base, residual=residual, own_delta=own_delta)
    else:
        new_state = NodeState(**common, owned_tensors={n: reply[n] for n in owned_names})
    if train_cfg.save_in_background:
        background_save.save_after_reply(new_state, state_root)
    else:
        new_state.save(state_root)
    if train_cfg.resident:
        resident.keep(resident.ResidentNode(key, model, plain, optimizer, new_state),
                      train_cfg.resident_budget_mb * 2**20)
    metrics["round-seconds"] = time.perf_counter() - t_start
    metrics["resident"] = float(kept is not None)
    metrics["save-wait-seconds"] = waited
    return out, metrics


def _detached(t: torch.Tensor, copy: bool) -> torch.Tensor:
    """`t` as an fp32 CPU tensor; with `copy`, one that does not share storage with the model
    (a kept model trains on, and the reply and the kept state must not change with it)."""
    out = t.detach().float().cpu()
    return out.clone() if copy and out.data_ptr() == t.data_ptr() else out


def run_local_eval(
    ctx: NodeContext, received: dict[str, torch.Tensor], router_bias: torch.Tensor | None = None
) -> tuple[float, int]:
    _check_received(received, ctx.partition_id)
    device = resolve_device(ctx.spec.train.device)
    model = _build(ctx, None, device)
    args = lora_args(ctx.spec.train)
    model.load_state_dict(received if args is None else merge_adapters(received, args), strict=True)
    set_router_bias(model, router_bias)
    _, held = _data(ctx)
    return evaluate(model, held, ctx.spec.eval.batch_size, ctx.spec.eval.max_batches, device)
