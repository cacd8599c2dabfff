"""lm-eval-harness task definitions shipped with the project.

`tasks/spes_heldout/spes_heldout.yaml` scores a checkpoint on the held-out split with
`loglikelihood_rolling` (word/byte perplexity, bits per byte). The split depends on the run's
data config, so `write_heldout_task` writes the documents and a copy of the task that points at
them; lm-eval loads that directory with `TaskManager(include_path=...)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
HELDOUT_TASK = "spes_heldout"
HELDOUT_YAML = TASKS_DIR / HELDOUT_TASK / f"{HELDOUT_TASK}.yaml"


def write_heldout_task(out_dir: Path, documents: list[str]) -> Path:
    """Write `out_dir/heldout.jsonl` and `out_dir/tasks/spes_heldout.yaml`; return the tasks dir."""
    if not documents:
        raise ValueError("no held-out documents to evaluate on")
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = out_dir / "heldout.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    task = yaml.safe_load(HELDOUT_YAML.read_text())
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    tasks_dir = out_dir / "tasks"
    tasks_dir.mkdir(exist_ok=True)
    (tasks_dir / f"{HELDOUT_TASK}.yaml").write_text(yaml.safe_dump(task, sort_keys=False))
    return tasks_dir
