"""The fault suite: hostile replies, broken node state, killed processes (`python -m faults`)."""
