"""Hydra overrides for a model small enough that a whole Flower run in a test takes seconds.

The expert count is left to each test (it decides how many experts a node owns).
"""

MICRO_MODEL = [
    "model.hidden_size=64",
    "model.expert_ffn=32",
    "model.num_layers=2",
    "data.vocab_size=512",
    "data.seq_len=64",
    "train.batch_size=4",
]
