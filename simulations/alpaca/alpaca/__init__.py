"""Flower app: federated offsite-tuning on Alpaca shards (logic in the fed_crash library)."""
