"""Federated offsite-tuning on Flower's Message API: the protocol both sides speak, the
server's per-round work, the client's handlers, partitioning, checkpoints, faults, FedBiOT."""
