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


def pytest_collection_modifyitems(config, items):
    """Under `pytest -n N --dist loadgroup` (make test) tests are spread one by one over the
    workers; a test that uses a module-scoped fixture (one Flower simulation or bench run shared by
    its module) is kept on one worker with the rest of its module, so that fixture runs once."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs.values() if info is not None else ()
        if any(d.scope in ("module", "package", "session") for seq in defs for d in seq):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
