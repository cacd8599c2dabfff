"""Kept nodes in one process (client_app/resident.py) through real node rounds: which node an entry
belongs to, and how much the budget keeps. The micro model and fixtures of
tests/test_resident.py."""

# ruff: noqa: F811 -- the tests take test_resident's fixtures, imported here by their own names
from test_resident import BASE, nothing_kept, tokenizer  # noqa: F401

from client_app import resident
from client_app.local_round import NodeContext, RoundOrder, run_local_round
from common.spec import from_dict
from model import build_model
from server_app.config import compose


def test_a_kept_node_is_told_apart_by_its_work_dir_and_its_settings(tokenizer, flower_task):
    """Partition 0 three times in one process: in two work dirs (two runs), then in the first with
    another learning rate. Each is a node of its own, kept apart; ending a run frees its nodes only."""
    root, tok = tokenizer
    on = ["nodes=1", "train.resident=true", "train.resident_budget_mb=1024"]
    spec, other = (from_dict(compose(BASE + on + extra)) for extra in ([], ["train.lr=0.01"]))
    nodes = [(spec, "apart-a"), (spec, "apart-b"), (other, "apart-a")]
    init = build_model(spec.model, len(tok), seed=0).state_dict()
    for s, name in nodes:
        ctx = NodeContext(s, tok, root / name, 0, 1, progress=False)
        _, m = run_local_round(ctx, init, RoundOrder([1], True, 0, 2), show_progress=False)
        assert m["resident"] == 0.0
    assert resident.kept_partitions() == [0, 0, 0]
    resident.forget(str(root / "apart-a"))
    assert resident.kept_partitions() == [0]


def test_the_resident_budget_is_in_mebibytes(tokenizer, flower_task):
    """Two runs' nodes in one process: the older stays kept while its size fits in
    train.resident_budget_mb MiB (the newest is always kept); 10 % under its size evicts it."""
    root, tok = tokenizer
    init = build_model(from_dict(compose(BASE + ["nodes=1"])).model, len(tok), seed=0).state_dict()

    def kept_after_two(budget_mb: float, tag: str) -> list[int]:
        spec = from_dict(compose(BASE + ["nodes=1", "train.resident=true", f"train.resident_budget_mb={budget_mb}"]))
        for name in ("a", "b"):
            ctx = NodeContext(spec, tok, root / f"budget-{tag}-{name}", 0, 1, progress=False)
            run_local_round(ctx, init, RoundOrder([1], True, 0, 2), show_progress=False)
        kept = resident.kept_partitions()
        resident.drop()
        return kept

    sized = NodeContext(from_dict(compose(BASE + ["nodes=1", "train.resident=true"])), tok, root / "budget-size", 0, 1)
    run_local_round(sized, init, RoundOrder([1], True, 0, 2), show_progress=False)
    ((_, size),) = resident._kept.values()  # one kept node's bytes
    resident.drop()
    assert kept_after_two(1.1 * size / 2**20, "over") == [0, 0]
    assert kept_after_two(0.9 * size / 2**20, "under") == [0]
