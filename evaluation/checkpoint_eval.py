"""`python -m evaluation <checkpoint> [--tasks ...]`: lm-eval-harness on an exported checkpoint.

    python -m evaluation outputs/demo/model                    # held-out perplexity (+ downstream if online)
    python -m evaluation outputs/demo/model --tasks heldout    # offline: only the held-out split
    python -m evaluation ckpt/ --tasks heldout,hellaswag --limit 100 data.source=/data/corpus.jsonl

Tasks: `heldout` (the project's lm-eval task over the run's held-out split: word/byte perplexity
and bits per byte; works offline), `downstream` (the paper's suite, docs/method.md section 6:
sciq, piqa, winogrande, arc_easy, social_iqa, openbookqa, boolq 0-shot, arc_challenge 25-shot,
hellaswag 10-shot, mmlu at lm-eval's default), or any lm-eval task name. Tasks that need the
Hugging Face hub are skipped with one line when it is unreachable (or HF_*_OFFLINE is set).

The held-out split is the run's: the data config comes from config.json beside the checkpoint
(written by the run report); with `key=value` overrides, or without config.json, from
conf/config.yaml with those overrides.

Everything it writes goes into the checkpoint folder: eval.json and eval/ (the held-out documents
scored and the task definition); when the checkpoint is a run's `model/`, the run's report.md and
TensorBoard get the results too. The corpus is cached with the run's (outputs/.cache) for a run's
checkpoint, else in ~/.cache/spes-flower/corpus ($XDG_CACHE_HOME). The model is scored with the
`hf` backend (AutoModelForCausalLM), windows of data.seq_len tokens (the context it was trained
on) unless --max-length says otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

HELDOUT = "heldout"
DOWNSTREAM = "downstream"
# docs/method.md section 6; None = lm-eval's default shot count (the method names none for mmlu).
DOWNSTREAM_SUITE: dict[str, int | None] = {
    "sciq": 0,
    "piqa": 0,
    "winogrande": 0,
    "arc_easy": 0,
    "social_iqa": 0,
    "openbookqa": 0,
    "boolq": 0,
    "arc_challenge": 25,
    "hellaswag": 10,
    "mmlu": None,
}
_TRUE = ("1", "true", "yes", "on")


def hub_status(timeout_s: float = 3.0) -> str | None:
    """None if the Hugging Face hub answers, else why not (one line)."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUE:
            return f"{var}={os.environ[var]}"
    url = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/") + "/api/datasets/allenai/sciq"
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return None  # it answered
    except (urllib.error.URLError, OSError) as exc:
        return f"{url} unreachable ({getattr(exc, 'reason', exc)})"
    return None


def data_config(checkpoint: Path, overrides: list[str]):
    """The run's DataConfig: config.json beside the checkpoint, else conf/ with `overrides`."""
    from data import DataConfig

    saved = checkpoint.parent / "config.json"
    if saved.exists() and not overrides:
        raw = json.loads(saved.read_text())
        source = str(saved)
    else:
        from server_app.config import compose

        raw = compose(overrides)
        source = "conf/config.yaml" + (f" with {' '.join(overrides)}" if overrides else "")
    if "data" not in raw:
        raise ValueError(f"{source} has no `data` section")
    return DataConfig.from_dict({**raw["data"], "seed": raw.get("seed", 0)}), source


def corpus_cache(checkpoint: Path) -> Path:
    """Where the corpus is cached: the coordinator's cache beside a run folder's checkpoint (shared with
    the run), else the user's cache dir; never beside a copied checkpoint."""
    if (checkpoint.parent / "metrics.jsonl").exists():
        return checkpoint.parent.parent / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "spes-flower" / "corpus"


def heldout_documents(checkpoint: Path, overrides: list[str]) -> tuple[list[str], Any, str]:
    from data import load_documents, split_documents

    cfg, source = data_config(checkpoint, overrides)
    cache = corpus_cache(checkpoint)
    docs = split_documents(load_documents(cfg, cache), cfg.heldout_fraction, cfg.seed)[1]
    return docs, cfg, source


def flat_results(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's `results` without aliases, N/A stderrs and the ",none" filter suffix."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.items():
        clean = {}
        for key, value in metrics.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool) or key == "sample_len":
                continue
            metric, _, filt = key.partition(",")
            clean[metric if filt in ("", "none") else f"{metric},{filt}"] = float(value)
        out[task] = clean
    return out


def _simple_evaluate(
    checkpoint: Path, tasks: list[str], task_manager, args, num_fewshot: int | None, max_length: int | None
) -> dict:
    import lm_eval

    model_args: dict[str, Any] = {"pretrained": str(checkpoint), "dtype": "float32"}
    if max_length:
        model_args["max_length"] = int(max_length)
    return lm_eval.simple_evaluate(
        model="hf",
        model_args=model_args,
        tasks=tasks,
        task_manager=task_manager,
        device=args.device,
        batch_size=args.batch_size,
        limit=args.limit,
        num_fewshot=num_fewshot,
        log_samples=False,
    )


def evaluate(checkpoint: Path, args: argparse.Namespace, overrides: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    from evaluation import HELDOUT_TASK, write_heldout_task

    requested = [t.strip() for t in args.tasks.split(",") if t.strip()]
    report: dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "results": {},
        "n_samples": {},
        "skipped": [],
        "tasks": requested,
    }
    t0 = time.time()
    if HELDOUT in requested:
        docs, cfg, source = heldout_documents(checkpoint, overrides)
        max_length = args.max_length or cfg.seq_len
        tasks_dir = write_heldout_task(checkpoint / "eval", docs)
        print(f"[eval] held-out split: {len(docs)} documents ({source}); windows of {max_length} tokens", flush=True)
        out = _simple_evaluate(
            checkpoint,
            [HELDOUT_TASK],
            TaskManager(include_path=str(tasks_dir), include_defaults=False),
            args,
            None,
            max_length,
        )
        report["results"].update(flat_results(out["results"]))
        report["n_samples"][HELDOUT_TASK] = out.get("n-samples", {}).get(HELDOUT_TASK, {}).get("effective")
        report["max_length"] = max_length
        report["heldout_data"] = {
            "source": cfg.source,
            "heldout_fraction": cfg.heldout_fraction,
            "seed": cfg.seed,
            "documents": len(docs),
            "file": str(tasks_dir.parent / "heldout.jsonl"),
        }
    hub_tasks: dict[str, int | None] = {}
    for name in requested:
        if name == DOWNSTREAM:
            hub_tasks.update(DOWNSTREAM_SUITE)
        elif name != HELDOUT:
            hub_tasks[name] = None
    if hub_tasks:
        why = hub_status()
        if why is not None:
            line = f"{', '.join(hub_tasks)} need the Hugging Face hub, which is not reachable: {why}"
            print(f"[eval] skipped: {line}", flush=True)
            report["skipped"].append(line)
        else:
            manager = TaskManager()
            for shots in sorted(set(hub_tasks.values()), key=lambda s: -1 if s is None else s):
                names = [t for t, s in hub_tasks.items() if s == shots]
                out = _simple_evaluate(checkpoint, names, manager, args, shots, args.max_length)
                results = flat_results(out["results"])
                report["results"].update({t: results[t] for t in names if t in results})
                for t in names:
                    report["n_samples"][t] = out.get("n-samples", {}).get(t, {}).get("effective")
    report["wall_s"] = time.time() - t0
    try:
        import lm_eval

        report["lm_eval_version"] = getattr(lm_eval, "__version__", None)
    except ImportError:
        pass
    return report


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m evaluation", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("checkpoint", type=Path, help="Hugging Face checkpoint directory (e.g. outputs/demo/model)")
    parser.add_argument(
        "--tasks",
        default=f"{HELDOUT},{DOWNSTREAM}",
        help=f"comma-separated: {HELDOUT}, {DOWNSTREAM}, or lm-eval task names (default: %(default)s)",
    )
    parser.add_argument("--limit", type=int, default=None, help="at most this many documents/examples per task")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per scoring window (default: the run's data.seq_len)"
    )
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if "=" not in a or a.startswith("-")]
    if unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)} (config overrides are key=value)")
    return args, rest


def main(argv: list[str]) -> int:
    args, overrides = _parse(argv)
    checkpoint = args.checkpoint.expanduser().resolve()
    if not (checkpoint / "config.json").exists():
        print(
            f"[eval] {checkpoint} is not a Hugging Face checkpoint (no config.json); "
            f"run `make demo` first or pass a model directory",
            file=sys.stderr,
        )
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("[eval] lm-eval is not installed: pip install -e '.[eval]'", file=sys.stderr)
        return 2
    try:
        report = evaluate(checkpoint, args, overrides)
    except (ValueError, OSError) as exc:
        print(f"[eval] {exc}", file=sys.stderr)
        return 2
    from common.atomic import write_json_atomic
    from server_app.run_log import tensorboard_eval

    run_dir = checkpoint.parent
    out = checkpoint / "eval.json"
    write_json_atomic(out, report)
    for task, metrics in sorted(report["results"].items()):
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()) if not k.endswith("_stderr"))
        print(f"[eval] {task}: {shown}")
    print(f"[eval] wrote {out} ({report['wall_s']:.0f}s)")
    if (run_dir / "metrics.jsonl").exists():
        from server_app.report import read_rounds, report_from_run_dir

        rounds = read_rounds(run_dir)
        tensorboard_eval(run_dir, report["results"], step=rounds[-1].round if rounds else 0)
        print(f"[eval] updated {report_from_run_dir(run_dir)}")
    return 0
