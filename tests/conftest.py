import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def flower_task():
    """Messages can only be built inside a Flower task; give the test process an identity."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def pytest_collection_modifyitems(items):
    """Under `make mutate`, run the quickest tests first: a mutant dies at its first failing test."""
    if not os.environ.get("MUTANT_UNDER_TEST"):
        return
    stats = next((p for p in (Path("mutmut-stats.json"), Path("mutants/mutmut-stats.json")) if p.exists()), None)
    if stats is None:
        return
    import json

    seconds = json.loads(stats.read_text())["duration_by_test"]
    items.sort(key=lambda item: seconds.get(item.nodeid.removeprefix("mutants/"), float("inf")))
