"""recipe=1b|7b|9b set the paper's model and hyper-parameters (docs/method.md section 5)."""

import re

import pytest

from model import MoEArgs
from server_app.config import CONF_DIR, compose
from training.trainer import TrainConfig

# docs/method.md section 5, one row per recipe:
# model, lr, warm-up, seq len, merge alpha / decay (defaults 0.01/10000, the 9B run 0.05/20000)
TABLE = {
    "1b": ("1b", 5e-4, 2000, 2048, 0.01, 10000),
    "7b": ("7b", 4e-4, 2000, 2048, 0.01, 10000),
    "9b": ("9b", 1e-4, 1000, 4096, 0.05, 20000),
}


@pytest.mark.parametrize("recipe", sorted(TABLE))
def test_recipe_gives_the_papers_values(recipe):
    preset, lr, warmup, seq_len, alpha, decay = TABLE[recipe]
    cfg = compose([f"recipe={recipe}"])
    train, strategy = cfg["train"], cfg["strategy"]
    assert cfg["model"]["name"] == preset
    assert (train["lr"], train["beta1"], train["beta2"], train["weight_decay"]) == (lr, 0.9, 0.95, 0.1)
    assert (train["warmup_steps"], train["total_steps"], train["min_lr_ratio"]) == (warmup, 50000, 0.1)
    assert (train["aux_loss_weight"], train["z_loss_weight"], train["balance"]) == (0.01, 0.001, "per_layer")
    assert cfg["data"]["seq_len"] == seq_len
    assert strategy["local_steps"] == 100  # H
    merge = strategy["merge"]
    assert (merge["enabled"], merge["interval"], merge["alpha_start"], merge["decay_steps"], merge["top_k"]) == (
        True,
        500,
        alpha,
        decay,
        4,
    )
    assert cfg["rounds"] * strategy["local_steps"] == train["total_steps"]  # the run ends with the schedule
    MoEArgs.from_dict(cfg["model"]).validate()
    TrainConfig.from_dict(train).validate()


def test_9b_recipe_upcycles_with_the_dense_models_tokenizer():
    cfg = compose(["recipe=9b", "model.dense_path=/ckpt/Qwen3-1.7B"])
    model = MoEArgs.from_dict(cfg["model"])
    model.validate()
    assert (model.init, model.dense_path, model.num_experts, model.top_k, model.expert_ffn) == (
        "upcycle",
        "/ckpt/Qwen3-1.7B",
        8,
        2,
        6144,
    )
    assert cfg["data"]["tokenizer"] == "/ckpt/Qwen3-1.7B"  # embeddings are copied: same token ids


def test_no_recipe_keeps_the_demo_and_overrides_beat_a_recipe():
    demo = compose([])
    assert (demo["model"]["name"], demo["train"]["lr"], demo["strategy"]["local_steps"]) == ("tiny", 3e-3, 25)
    assert demo["model"]["init"] == "random"
    cfg = compose(["recipe=1b", "train.lr=1e-3", "model=small"])
    assert (cfg["model"]["name"], cfg["train"]["lr"], cfg["train"]["warmup_steps"]) == ("small", 1e-3, 2000)
    # A recipe's merge schedule does not switch merging on for the full-sync baselines.
    assert compose(["recipe=1b", "strategy=diloco"])["strategy"]["merge"]["enabled"] is False


def test_every_recipe_key_is_commented():
    for path in sorted((CONF_DIR / "recipe").glob("*.yaml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            # A leaf "key: value" line (sections like "train:" end with the colon).
            if re.match(r"^\s*[\w-]+:\s*\S", line) and not line.lstrip().startswith("#"):
                assert "#" in line, f"{path.name}:{n} has no comment: {line!r}"
