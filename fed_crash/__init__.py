"""fed-crash: federated offsite-tuning of LLMs with OFT and CRaSh emulators.

The package is layered; each layer imports only the ones listed before it:

* :mod:`fed_crash.config`, :mod:`fed_crash.errors`: the option schema and the user-error base class;
* :mod:`fed_crash.core`: the method core: load a model, turn instruction rows into token
  batches, describe, assemble and plug in an emulator, write and read its files, train adapters;
* :mod:`fed_crash.selection`: which middle layers an emulator keeps (uniform, CRaSh with CKA,
  search), one registry keyed by method name;
* :mod:`fed_crash.federation`: the Flower protocol, the server's per-round work, the client,
  partitioning, checkpoints, injected faults, FedBiOT;
* :mod:`fed_crash.evaluation`: multiple-choice scoring, the four-model report, local tuning and
  the emulator comparison;
* :mod:`fed_crash.tools`: the ``fed-crash`` command, launching ``flwr run``, experiments.

The top-level ``strategies`` package (Flower strategies for adapter-only federation) builds on
this one; nothing here imports it. Importing this package loads no torch: the light commands
(``fed-crash --help``, ``simulate``, ``experiment``) stay fast.
"""
