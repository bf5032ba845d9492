"""fed-crash: federated offsite-tuning of LLMs with OFT and CRaSh emulators.

The library's pieces, in the order data flows through them:
:mod:`models` (load a causal LM) -> :mod:`data` (instruction rows to token batches) ->
:mod:`cka` (layer similarity) -> :mod:`emulator` (spec, selection, assembly, plug-in) ->
:mod:`artifacts` (safetensors + JSON files) -> :mod:`train` (adapter training, evaluation) ->
:mod:`pipeline` (the end-to-end steps the CLI and the Flower apps call).
"""

from .emulator import Emulator, EmulatorSpec, assemble, build_emulator, make_spec, plug_in
from .errors import FedCrashError
from .models import get_layers, load_model

__all__ = ["Emulator", "EmulatorSpec", "FedCrashError", "assemble", "build_emulator", "get_layers", "load_model", "make_spec", "plug_in"]
