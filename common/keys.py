"""Names of the records and fields that travel between the coordinator and a node.

One place for both sides, so a renamed key cannot silently desynchronise them.
"""

# Records of a message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# Coordinator -> node (ConfigRecord "config").
RUN_CONFIG = "run-config"  # the resolved run spec, JSON
RUN_TOKEN = "run-token"  # names the node's state directory for this run
TOKENIZER_JSON = "tokenizer-json"  # setup query only
SERVER_ROUND = "server-round"
GLOBAL_STEP = "global-step"
LOCAL_STEPS = "local-steps"
TOTAL_STEPS = "total-steps"  # end of the LR schedule, in global steps
OWNED_EXPERTS = "owned-experts"
FULL_MODEL = "full-model"  # the arrays are the whole model, not a sparse downlink
BASE_STEP = "base-step"  # delta sync: the saved state the node's copy of the model is in
APPLY_OWN = "apply-own-delta"  # delta sync: add your last uplink's owned-expert differences yourself
ABSENT_EXPERTS = "absent-experts"  # partial residency: experts the node holds no weights of
SYNC_FRAGMENT = "sync-fragment"  # streaming fragments: the fragment to send this round (absent: all)
GLOBAL_LOAD = "global-expert-load"  # the federation's last-round expert load, flattened [layers * experts]
ROUTER_BIAS = "router-bias"  # routing bias for the top-k choice, flattened [layers * experts]

# The coordinator's last message to each node, after a run completed: message type "query.<FINISH>".
FINISH = "finish"

# Node -> coordinator.
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
STATE_STEP = "state-step"  # global step of the node's saved state, -1 if none (setup reply)
STATE_KEPT = "state-kept"  # finish reply: the node kept its run folder (node-config keep-state)
STATE_BYTES = "state-bytes"  # finish reply: the size of that folder, kept or removed
RESIDENCY_ASK = "residency"  # the experts this node agrees to hold: its node-config residency (setup reply)
NODE_HARDWARE = "node-hardware"  # JSON: the device, precision and memory options the node trains with (setup reply)
# How a node trains, its own call: node-config key -> train.<field> (the NODE_HARDWARE report's fields).
NODE_HARDWARE_KEYS = {
    "device": "device",
    "precision": "precision",
    "optimizer": "optimizer",
    "lean-loss": "lean_loss",
    "activation-checkpointing": "activation_checkpointing",
    "threads": "threads",
}
NUM_TOKENS = "num-tokens"
EXPERT_LOAD = "expert-load"  # flattened [layers * experts] fractions of routed tokens
EVAL_LOSS = "eval-loss"
EVAL_PPL = "eval-ppl"

# Scalar metrics a node reports after training, as sent (kebab-case).
NODE_METRICS = (
    "train-loss",
    "ce-loss",
    "aux-loss",
    "z-loss",
    NUM_TOKENS,
    "tokens-per-s",
    "peak-mem-mb",
    "train-seconds",
    "trainable-params",
    "resident-params",  # parameters the node holds (partial residency: fewer than the model's)
    "weight-mb",  # their storage, MiB
    "round-seconds",
    "resident",
    "save-wait-seconds",
)
