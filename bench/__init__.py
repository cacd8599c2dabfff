"""Benchmarks and studies: SPES against DiLoCo, FedAvg and centralized training, memory, overhead, ablations."""
