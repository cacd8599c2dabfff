"""Faults on the node's side, each built by hand and fed through the node's own code: its settings
(paths it refuses), its state store (a save cut short, a corrupt or foreign state) and its round
(what it refuses to train on). Registered in faults/cases.py."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from faults.outcome import Outcome


# -- node-side faults -------------------------------------------------------------------------
def case_run_token_paths() -> Outcome:
    from client_app.node_settings import NodeSettings, NodeSetupError

    with tempfile.TemporaryDirectory() as tmp:
        s = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 2, "work-dir": tmp}, env={})
        refused = []
        for token in ("../../x", "/etc", "a/../../b", ".."):
            try:
                s.workdir(token)
            except NodeSetupError:
                refused.append(token)
        ok = len(refused) == 4 and s.workdir("run-1").is_relative_to(Path(tmp).resolve())
    return Outcome(
        "run token `../../x`, `/etc`, `..` from the coordinator",
        "node wrote (and deleted) outside its work dir",
        f"refused: {', '.join(refused)}",
        ok,
    )


def case_coordinator_data_path() -> Outcome:
    from client_app.node_settings import NodeSettings, NodeSetupError

    s = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 2}, env={})
    try:
        s.data_source("/home/someone/private-notes")
        ok, now = False, "opened"
    except NodeSetupError as exc:
        ok, now = True, f"refused: {str(exc)[:80]}..."
    own = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 2, "data-source": "/data/mine"}, env={})
    ok = ok and own.data_source("/coordinator/path") == ("/data/mine", False)
    return Outcome(
        "coordinator's data.source names a path on the node",
        "node trained on whatever that path held",
        now + "; a node's own data-source wins",
        ok,
    )


def _state(step: int):
    from client_app.node_state import NodeState

    return NodeState(
        global_step=step,
        owned=[0, 1],
        stream={"epoch": 0, "index": step},
        owned_tensors={"w": torch.full((3,), float(step))},
        optimizer={"w::exp_avg": torch.ones(3), "w::step": torch.tensor(float(step))},
    )


def case_state_crash_mid_save() -> Outcome:
    from client_app.node_state import NodeState, saved_steps

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        _state(10).save(root)
        half = root / ".tmp-999-deadbeef"  # what a crash in the middle of the next save leaves
        half.mkdir()
        (half / "owned.safetensors").write_bytes(b"\0" * 7)
        survived = NodeState.load(root, 10)
        _state(20).save(root)
        ok = (
            survived is not None
            and torch.equal(survived.owned_tensors["w"], torch.full((3,), 10.0))
            and not half.exists()
            and saved_steps(root) == [10, 20]
        )
    return Outcome(
        "node crashes in the middle of a state save",
        "optimizer state and data position lost for good",
        "previous state intact; the half-written one removed at the next save",
        ok,
    )


def case_state_corrupt() -> Outcome:
    from client_app.node_state import NodeState

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        d = _state(10).save(root)
        with open(d / "owned.safetensors", "r+b") as fh:
            fh.write(b"garbage!")
        gone = NodeState.load(root, 10) is None and not d.exists()
    return Outcome(
        "node's saved state corrupted on disk",
        "node failed every round, even after a full resend",
        "state discarded; the node asks for the full model and continues",
        gone,
    )


def case_state_nan_moments() -> Outcome:
    """A NaN written into the saved AdamW moments, the file keeping its size (the issue 22 finding)."""
    from safetensors.torch import load_file, save_file

    from client_app.node_state import NodeState

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        d = _state(10).save(root)
        size = (d / "optimizer.safetensors").stat().st_size
        moments = load_file(str(d / "optimizer.safetensors"))
        moments["w::exp_avg"][1] = math.nan
        save_file(moments, str(d / "optimizer.safetensors"))
        same_size = (d / "optimizer.safetensors").stat().st_size == size
        gone = NodeState.load(root, 10) is None and not d.exists()
    return Outcome(
        "NaN in the node's saved optimizer moments (file size unchanged)",
        "the node replied NaN every round, even after a full-model resend, until dropped",
        "state discarded on load; the node asks for the full model and starts fresh moments",
        same_size and gone,
    )


def case_state_other_step() -> Outcome:
    from client_app.node_state import NodeState

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "state"
        _state(10).save(root)
        ok = NodeState.load(root, 20) is None and NodeState.load(root, 10) is not None
    return Outcome(
        "saved state from another global step",
        "used silently",
        "only a state tagged with the round's start step is used for a sparse downlink",
        ok,
    )


def _tiny_node_context(tmp: Path):
    from client_app.local_round import NodeContext
    from common.spec import from_dict
    from data import load_tokenizer
    from server_app.config import compose

    raw = compose(
        [
            "model.hidden_size=32",
            "model.expert_ffn=16",
            "model.num_layers=1",
            "model.num_experts=4",
            "strategy.merge.top_k=2",
            "data.vocab_size=300",
            "data.seq_len=16",
            "train.batch_size=2",
            "nodes=2",
        ]
    )
    spec = from_dict(raw)
    tok = load_tokenizer(spec.data, tmp / "cache")
    return NodeContext(spec, tok, tmp / "node", 0, 2, progress=False)


def case_node_refuses_bad_round() -> Outcome:
    from client_app.local_round import RoundOrder, run_local_round
    from model import build_model

    with tempfile.TemporaryDirectory() as tmp:
        ctx = _tiny_node_context(Path(tmp))
        model = build_model(ctx.spec.model, len(ctx.tokenizer))
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        refused = []
        poisoned = dict(weights)
        name = sorted(poisoned)[0]
        poisoned[name] = torch.full_like(poisoned[name], math.nan)
        for label, received, start, steps in (
            ("NaN weights", poisoned, 0, 1),
            ("local-steps -3", weights, 0, -3),
            ("global-step -5", weights, -5, 1),
        ):
            try:
                run_local_round(ctx, received, RoundOrder([0, 1], True, start, steps), show_progress=False)
            except ValueError:
                refused.append(label)
        ok = len(refused) == 3 and not (ctx.workdir / "state").exists()
    return Outcome(
        "NaN weights / negative local-steps or global-step sent to a node",
        "trained on (negative learning rate)",
        f"refused before training: {', '.join(refused)}",
        ok,
    )


def case_node_limits() -> Outcome:
    """A coordinator asking for 10^9 local steps, or naming `hf:/etc` as the corpus."""
    import json

    from flwr.app import ConfigRecord

    from client_app.handlers import _spec_for_node
    from client_app.node_settings import NodeSettings, NodeSetupError
    from server_app.config import compose

    refused = []
    with tempfile.TemporaryDirectory() as tmp:
        settings = NodeSettings.from_node_config({"partition-id": 0, "num-partitions": 4, "work-dir": tmp}, env={})
        raw = compose([])
        spec, _ = _spec_for_node(ConfigRecord({"run-config": json.dumps(raw)}), settings)
        try:
            settings.check_run(spec, local_steps=10**9)
        except NodeSetupError as exc:
            refused.append("local-steps 10^9" + (" (over max-local-steps)" if "max-local-steps" in str(exc) else ""))
        raw["data"]["source"] = "hf:/etc"
        try:
            _spec_for_node(ConfigRecord({"run-config": json.dumps(raw)}), settings)
        except NodeSetupError:
            refused.append("data.source hf:/etc")
    return Outcome(
        "coordinator asks a node for 10^9 local steps / names `hf:/etc` as its corpus",
        "node trained for as long as told / read a local folder named by the coordinator",
        f"refused: {'; '.join(refused)}",
        len(refused) == 2,
    )


def case_second_coordinator() -> Outcome:
    """A second coordinator (or an early `resume=true`) on a run folder in use."""
    from common.errors import ConfigError
    from server_app.run_lock import run_folder_lock

    with tempfile.TemporaryDirectory() as tmp, run_folder_lock(Path(tmp)):
        try:
            with run_folder_lock(Path(tmp)):
                outcome = "ran: two coordinators on one folder"
        except ConfigError as exc:
            in_use = "in use by a running coordinator" in str(exc)
            outcome = "refused: the folder is in use by a running coordinator" if in_use else f"refused: {exc}"
    return Outcome(
        "a second coordinator on a run folder in use",
        "both ran, writing the same checkpoints",
        outcome,
        outcome.startswith("refused"),
    )
