"""The app's task: offsite-tuning adapters on a frozen emulator over Alpaca shards.

Everything substantial (model, emulator, data, training, evaluation) lives in the installed
``fed_crash`` library so that the CLI, the tests and this app run the same code; this module
names the pieces the app uses.
"""

from fed_crash.federation.server import client_query, client_train, run_config, serve

__all__ = ["client_query", "client_train", "run_config", "serve"]
