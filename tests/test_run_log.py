"""The one metrics path: JSONL always, TensorBoard when enabled, per-node tags."""

import json
from dataclasses import replace

import pytest
import torch

from model import MoEArgs, build_model
from server_app.config import ConfigError, load
from server_app.run_log import RunLog, flat_scalars
from strategy.round_record import RoundRecord
from training.trainer import TrainConfig, make_optimizer, train_steps

RECORD = RoundRecord(
    round=1,
    val_loss=5.0,
    train_loss=5.5,
    tokens=100.0,
    bytes_up=10,
    bytes_down=20,
    nodes={
        "0": {"train_loss": 5.4, "bytes_up": 5, "expert_load": [[0.75, 0.25]], "status": "ok"},
        "1": {"train_loss": 5.6, "bytes_up": 5, "status": "ok"},
    },
)


def test_flat_scalars_tag_per_node():
    s = flat_scalars(RECORD)
    assert s["val_loss"] == 5.0 and s["node0/train_loss"] == 5.4 and s["node1/train_loss"] == 5.6
    assert s["node0/expert_load/layer0/expert0"] == 0.75
    assert "node0/status" not in s


def test_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = RunLog(tmp_path, tensorboard=True)
    log.log_round(RECORD)
    log.log_round(replace(RECORD, round=2, val_loss=4.0))
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in lines] == [5.0, 4.0]
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("val_loss")] == [5.0, 4.0]
    assert [e.step for e in acc.Scalars("node1/train_loss")] == [1, 2]


def test_wandb_enabled_without_package_is_a_config_error():
    pytest.importorskip("tensorboard")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    with pytest.raises(ConfigError, match="wandb"):
        load(["logging.wandb=true"])


def test_trainer_reports_expert_load_per_layer():
    args = MoEArgs(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_ffn=16)
    model = build_model(args, 50, owned=[0], seed=0)
    cfg = TrainConfig()

    def batches():
        while True:
            yield torch.randint(0, 50, (2, 17))

    m = train_steps(model, make_optimizer(model, cfg), batches(), cfg, 0, 2, 10, torch.device("cpu"))
    load_ = torch.tensor(m["expert-load"]).view(2, 4)
    torch.testing.assert_close(load_.sum(dim=1), torch.ones(2))


def test_wandb_goes_offline_without_credentials(tmp_path):
    from server_app.run_log import wandb_mode

    netrc = tmp_path / ".netrc"
    assert wandb_mode({}, netrc) == "offline"
    assert wandb_mode({"WANDB_API_KEY": "x"}, netrc) == "online"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password key\n")
    assert wandb_mode({}, netrc) == "online"
    assert wandb_mode({"WANDB_MODE": "disabled", "WANDB_API_KEY": "x"}, netrc) == "disabled"


def test_a_non_finite_loss_stops_the_round_before_the_update():
    from training.trainer import NonFiniteTraining

    args = MoEArgs(hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_ffn=16)
    model = build_model(args, 64, seed=0)
    cfg = TrainConfig(batch_size=2, warmup_steps=0)
    optimizer = make_optimizer(model, cfg)
    batches = iter([torch.randint(0, 64, (2, 9)) for _ in range(3)])
    train_steps(model, optimizer, batches, cfg, 0, 1, 3, torch.device("cpu"))  # a healthy step
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(NonFiniteTraining, match="step 1: the loss is nan"):
        train_steps(model, optimizer, batches, cfg, 1, 1, 3, torch.device("cpu"))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "model.norm.weight")
    assert all(torch.equal(m, s["exp_avg"]) for m, s in zip(moments, optimizer.state.values()))


def test_metrics_jsonl_is_strict_json_with_non_finite_numbers_named(tmp_path):
    nothing_trained = replace(RECORD, round=2, train_loss=float("nan"), nodes={"0": {"tokens_per_s": float("inf")}})
    log = RunLog(tmp_path)
    log.log_round(RECORD)
    log.log_round(nothing_trained)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    strict = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl")) for line in lines]
    assert "non_finite" not in strict[0]
    assert strict[1]["non_finite"] == ["nodes.0.tokens_per_s", "train_loss"]
    assert strict[1]["train_loss"] is None and strict[1]["nodes"]["0"]["tokens_per_s"] is None
    back = RoundRecord.from_dict(strict[1])  # read back (resume, reports): a null takes the field's default
    assert back.train_loss != back.train_loss and back.round == 2
