"""A node's end of a run. After a run completes, the coordinator sends every node a `query.finish`
message; the node stops the run's resident worker (freeing its GPU), waits for a save under way,
and removes its folder (`<work dir>/<run>/partition-<i>/`: its last two states, the worker's
log; the run's data cache too once no partition of the machine is left in it): at the 1b preset
about 12 GB per node per run. node-config `keep-state=true` (or SPES_NODE_KEEP_STATE=1, which
`python -m sim` sets for its nodes, whose work dir is inside the run's own folder) keeps the
folder, and a simulated node's model in memory, e.g. to take the run further with the nodes'
optimizer moments.

A node without its folder still takes part in a resumed run: it reports no saved state and the
coordinator sends it the whole model, as to a node that joins mid-run; only the moments of its
local optimizer start again from zero. An interrupted run never gets this message.
"""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, RecordDict

from client_app.background_save import wait_for_saves
from client_app.clean import folder_bytes
from client_app.node_settings import NodeSettings
from client_app.worker_link import stop_worker
from common import keys

log = logging.getLogger("spes.node")


def finish_run(content: RecordDict, node_config: Mapping[str, Any]) -> RecordDict:
    """Release this node's hold on a completed run; reply whether its folder was kept, and its size."""
    cfg = content.config_records.get(keys.CONFIG) if keys.CONFIG in content.config_records else None
    if cfg is None or not isinstance(cfg.get(keys.RUN_TOKEN), str):
        raise ValueError(f"a finish message needs {keys.CONFIG}.{keys.RUN_TOKEN}")
    settings = NodeSettings.from_node_config(node_config)
    workdir = settings.workdir(cfg[keys.RUN_TOKEN])
    if workdir.is_dir():
        stop_worker(workdir)
        if not settings.keep_state and "client_app.resident" in sys.modules:  # a simulated node's model, here
            sys.modules["client_app.resident"].forget(str(workdir))
        wait_for_saves(workdir / "state")
    size = folder_bytes(workdir) if workdir.is_dir() else 0
    if not settings.keep_state:
        size += _remove(workdir)
    verb = "kept" if settings.keep_state else "removed"
    log.info("run completed: %s %s (%d bytes)", verb, workdir, size)
    reply = ConfigRecord({keys.STATE_KEPT: settings.keep_state, keys.STATE_BYTES: size})
    return RecordDict({keys.CONFIG: reply})


def _remove(workdir: Path) -> int:
    """Remove a partition's folder, and the run's folder with its shared data cache once no partition
    of this machine is left in it; the bytes of the latter (the former is counted by the caller)."""
    if workdir.is_dir():
        shutil.rmtree(workdir)
    run_folder = workdir.parent
    if not run_folder.is_dir() or any(run_folder.glob("partition-*")):
        return 0
    size = folder_bytes(run_folder)
    shutil.rmtree(run_folder, ignore_errors=True)  # a simulated partition finishing beside this one may race here
    return size
