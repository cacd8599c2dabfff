"""The training hyperparameters of a node (`train:` in conf/config.yaml), with their checks.

Both sides read them: the node trains with them, the coordinator validates them before any
round and sends them in the run spec. Plain data and checks only: no training loop, no Flower.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from model.balance import BALANCE_MODES, LocalDecay
from model.naming import ATTENTION_PROJECTIONS

OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass
class TrainConfig:
    device: str = "cpu"
    precision: str = "fp32"
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    total_steps: int | None = None
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    # Load balancing (model/balance.py): per_layer (the reference) | pooled (transformers').
    balance: str = "per_layer"
    # Decayed variant: the node's own experts' counts x a factor rising start -> 1.
    balance_local_decay: bool = False
    balance_local_start: float = 0.7
    balance_local_warmup_fraction: float = 0.2
    balance_local_every: int = 500
    logit_z_loss_weight: float = 0.0
    # Balancing across nodes (model/routing.py): share of f_i taken from the federation's load.
    balance_global_weight: float = 0.0
    threads: int = 0
    # Memory/speed options of a node (prepare_model); all off by default.
    lean_loss: bool = False  # CE from the last hidden state in token chunks: no full-batch fp32 logits
    activation_checkpointing: bool = False  # recompute each decoder layer in the backward
    optimizer: str = "adamw"  # adamw | adamw8bit (CUDA only: torchao or bitsandbytes)
    compile: bool = False  # torch.compile each decoder layer
    # Keep the model and optimizer in memory between rounds where the process lives on
    # (simulation actors); client_app/resident.py. Off: rebuild and reload from disk every round.
    resident: bool = True
    # Memory a process may spend keeping other virtual nodes besides the one it ran last.
    resident_budget_mb: float = 1024.0
    # Write the node's state after the reply has left (client_app/background_save.py); the next
    # round, the setup query and the process's exit wait for it. Off: write it before replying.
    save_in_background: bool = True
    # LoRA on the attention projections (model/lora.py); 0: train every shared weight.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # comma-separated subset of ATTENTION_PROJECTIONS

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"train: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def _validate_numbers(self) -> None:
        # Checked here, not on the first step: a bad value would otherwise pass and fail on every node.
        for key, low in (("batch_size", 1), ("warmup_steps", 0), ("threads", 0), ("total_steps", 1)):
            value = getattr(self, key)
            if key == "total_steps" and value is None:
                continue  # rounds * strategy.local_steps
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"train.{key} must be an integer >= {low}, got {value!r}")
        reals = (
            ("lr", "> 0", lambda x: x > 0),
            ("min_lr_ratio", "in [0, 1]", lambda x: 0 <= x <= 1),
            ("weight_decay", ">= 0", lambda x: x >= 0),
            ("beta1", "in [0, 1)", lambda x: 0 <= x < 1),
            ("beta2", "in [0, 1)", lambda x: 0 <= x < 1),
            ("grad_clip", ">= 0 (0: no clipping)", lambda x: x >= 0),
            ("aux_loss_weight", ">= 0", lambda x: x >= 0),
            ("z_loss_weight", ">= 0", lambda x: x >= 0),
            ("resident_budget_mb", ">= 0", lambda x: x >= 0),
        )
        for key, rule, ok in reals:
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or not ok(value)
            ):
                raise ValueError(f"train.{key} must be a finite number {rule}, got {value!r}")

    def validate(self) -> None:
        if self.device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"train.device must be cpu, cuda or auto, got {self.device!r}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        self._validate_numbers()
        if self.balance not in BALANCE_MODES:
            raise ValueError(f"train.balance must be one of {list(BALANCE_MODES)}, got {self.balance!r}")
        if not (isinstance(self.balance_global_weight, (int, float)) and 0 <= self.balance_global_weight <= 1):
            raise ValueError(f"train.balance_global_weight must be in [0, 1], got {self.balance_global_weight!r}")
        if self.balance_global_weight > 0 and self.balance != "per_layer":
            raise ValueError(
                "train.balance_global_weight needs train.balance=per_layer (the pooled loss has no per-layer shares)"
            )
        if not self.logit_z_loss_weight >= 0:
            raise ValueError(f"train.logit_z_loss_weight must be >= 0, got {self.logit_z_loss_weight}")
        if self.balance_local_decay:
            self.local_decay().validate()
        self._validate_lean_options()
        self._validate_lora()

    def _validate_lora(self) -> None:
        rank = self.lora_rank
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"train.lora_rank must be an integer >= 0 (0: no LoRA), got {rank!r}")
        alpha = self.lora_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"train.lora_alpha must be a finite number > 0, got {alpha!r}")
        if not isinstance(self.lora_targets, str):
            raise ValueError(
                "train.lora_targets must be a comma-separated string such as 'q_proj,v_proj', "
                f"got {self.lora_targets!r}"
            )
        targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        bad = [t for t in targets if t not in ATTENTION_PROJECTIONS]
        if not targets or bad or len(set(targets)) != len(targets):
            raise ValueError(
                f"train.lora_targets must name distinct projections among {','.join(ATTENTION_PROJECTIONS)}, "
                f"got {self.lora_targets!r}" + (f" (unknown: {bad})" if bad else "")
            )

    def _validate_lean_options(self) -> None:
        for key in ("lean_loss", "activation_checkpointing", "compile", "resident"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"train.{key} must be true or false, got {getattr(self, key)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "adamw8bit" and self.device == "cpu":
            raise ValueError(
                "train.optimizer=adamw8bit needs a GPU (8-bit AdamW kernels are CUDA-only): "
                "set train.device=cuda or train.optimizer=adamw"
            )

    def local_decay(self) -> LocalDecay | None:
        if not self.balance_local_decay:
            return None
        return LocalDecay(self.balance_local_start, self.balance_local_warmup_fraction, self.balance_local_every)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
