"""Export to a standard Hugging Face checkpoint that stock `AutoModelForCausalLM` loads."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel


def _one_dtype_state_dict(model: PreTrainedModel) -> dict[str, torch.Tensor] | None:
    """None (save_pretrained's own) unless some floating tensors differ from the model's dtype."""
    state = model.state_dict()
    dtype = model.dtype
    if all(v.dtype == dtype for v in state.values() if v.is_floating_point()):
        return None
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def save_hf_atomic(
    model: PreTrainedModel, out_dir: str | Path, tokenizer=None, config_fields: dict[str, Any] | None = None
) -> Path:
    """Write `save_pretrained` output to a temp dir beside `out_dir`, then swap it in.

    A reader (or a crash) never sees a half-written checkpoint: the previous one stays until
    the new one is complete. Experts stored in another dtype than the model's (bf16 frozen
    experts on a node) are written in the model's dtype, so the checkpoint has one dtype.
    `config_fields` are written into the exported config.json (what the model was trained
    with, which the in-memory config does not carry). Files and folders get the permissions the
    user's umask gives new files (a temp dir alone would be private to the user).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_one_dtype_state_dict(model))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if config_fields:
            config = json.loads((tmp / "config.json").read_text())
            (tmp / "config.json").write_text(json.dumps({**config, **config_fields}, indent=2, sort_keys=True) + "\n")
        _as_umask_allows(tmp)
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _as_umask_allows(folder: Path) -> None:
    mask = os.umask(0)
    os.umask(mask)
    folder.chmod(0o777 & ~mask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)
