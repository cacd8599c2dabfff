"""The training loop and evaluation shared by a node, the centralized baseline and the coordinator (plain torch)."""
