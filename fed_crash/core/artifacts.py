"""Files that travel between model owner and data owners: safetensors and JSON, nothing else.

An emulator folder holds

* ``emulator.safetensors``: non-layer weights and the distinct kept layers (and frozen
  adapter copies); no removed layer and no adapter;
* ``adapters.safetensors``: the initial adapters (tuned ones are saved the same way);
* ``emulator.json``: the manifest (spec, layer map, source model id and hash, clusters, CKA);
* ``config.json`` and tokenizer files of the source model.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedModel

from fed_crash.core.emulator import CEILING, FULL_LORA, Emulator, EmulatorSpec, adapter_state, assemble, emulator_state, layer_matrix_keys
from fed_crash.core.lora import is_lora_key
from fed_crash.core.models import layer_path, resolve_device, state_hash
from fed_crash.errors import FedCrashError

log = logging.getLogger(__name__)

FORMAT = "fed-crash-emulator/1"
MANIFEST = "emulator.json"
WEIGHTS = "emulator.safetensors"
ADAPTERS = "adapters.safetensors"


class ArtifactError(FedCrashError):
    """A missing, corrupted or mismatched artifact file."""


class PrivacyError(ArtifactError):
    """Something about to leave the model owner that offsite-tuning keeps private: a removed
    layer's weights, a full-model checkpoint, or a file that is not plain data."""


# What an emulator folder may send besides its tensors: the manifest, the model config and
# tokenizer files. Anything else (model.safetensors, pytorch_model.bin, *.pt ...) is refused.
PAYLOAD_SUFFIXES = (".json", ".txt", ".jinja", ".model")


def check_payload_files(names: Iterable[str]) -> None:
    """Every file a node receives is a plain file name with a data suffix (no path, no weights)."""
    for name in names:
        if Path(name).name != name or not name.endswith(PAYLOAD_SUFFIXES):
            raise PrivacyError(f"emulator payload file {name!r}: only plain {'/'.join(PAYLOAD_SUFFIXES)} files travel with an emulator")


def check_cut(spec: EmulatorSpec) -> None:
    """An emulator must leave out at least one middle layer, or clients receive the full model;
    only the baselines ``full`` (the ceiling) and ``full-lora`` send it, by name and on purpose."""
    if not spec.removed and spec.method in (CEILING, FULL_LORA):
        log.warning("method %r: clients receive every layer of the model (a privacy-free baseline, not offsite-tuning)", spec.method)
    elif not spec.removed:
        raise PrivacyError(f"the emulator keeps all {len(spec.middle)} middle layers: clients would receive the full model")


def check_private(weights: dict[str, torch.Tensor], files: Iterable[str], model: PreTrainedModel, spec: EmulatorSpec) -> None:
    """Offsite-tuning's promise, checked on everything an emulator payload holds before it is
    sent: tensors only under the keys the spec's emulator uses (no removed layer, no adapter),
    no tensor whose content equals a removed layer's (a renamed copy), at least one removed
    layer (else the emulator is the full model), and only data files (:func:`check_payload_files`)."""
    check_cut(spec)
    cut = emulator_state(model, spec)
    stray = sorted(set(weights) - set(cut))
    if stray:
        raise PrivacyError(f"emulator tensor {stray[0]!r} is not part of the emulator (kept layers {list(spec.kept)}): it would leak a removed or adapter layer")
    prefix = layer_path(model)
    removed = {k: t for k, t in model.state_dict().items() if k.startswith(f"{prefix}.") and int(k[len(prefix) + 1:].split(".")[0]) in spec.removed}
    private: dict[torch.dtype, dict[str, str]] = {}  # per payload dtype (a bf16 payload is compared with the removed layers rounded to bf16)
    for dtype in {t.dtype for t in weights.values()}:
        shared = {state_hash({"": t.to(dtype)}) for t in cut.values()}  # contents the emulator legitimately holds (e.g. identical norm weights)
        private[dtype] = {h: k for k, t in removed.items() if (h := state_hash({"": t.to(dtype)})) not in shared}
    for key, tensor in weights.items():
        leaked = private[tensor.dtype].get(state_hash({"": tensor}))
        if leaked:
            raise PrivacyError(f"emulator tensor {key!r} holds the weights of removed layer tensor {leaked!r}")
    check_payload_files(files)


def save_tensors(path: Path, state: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """safetensors with our JSON metadata in the header; CPU, contiguous copies."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(path), metadata={"fed_crash": json.dumps(metadata or {})})


def save_adapters(path: str | Path, adapters: dict[str, torch.Tensor], metadata: dict | None = None) -> Path:
    """Adapters under the full model's keys; ``metadata`` (e.g. the spec) goes in the header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors(path, adapters, metadata)
    return path


def load_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"adapter file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ArtifactError(f"{path} is not a readable safetensors file ({err})") from None


def wire_weights(model: PreTrainedModel, weights: dict[str, torch.Tensor], weights_dtype: str,
                 compute_dtype: str) -> tuple[dict[str, torch.Tensor], str]:
    """``(weights as stored, what was stored)`` for :func:`save_emulator`'s ``weights_dtype``."""
    if weights_dtype == "bf16":
        rounded = {k for k, v in weights.items() if v.is_floating_point()}
    elif weights_dtype == "auto" and compute_dtype == "bf16":
        rounded = layer_matrix_keys(model, weights)
    else:
        return weights, "fp32"
    stored = "bf16" if weights_dtype == "bf16" else "bf16-matrices"
    return {k: v.to(torch.bfloat16) if k in rounded else v for k, v in weights.items()}, stored


def save_emulator(
    out_dir: str | Path,
    model: PreTrainedModel,
    tokenizer,
    spec: EmulatorSpec,
    *,
    source_id: str,
    similarity: torch.Tensor | None = None,
    weights: dict[str, torch.Tensor] | None = None,
    weights_dtype: str = "fp32",
    compute_dtype: str = "fp32",
    source_sha256: str | None = None,
) -> Path:
    """Write an emulator folder for ``model`` cut by ``spec`` (see module docstring).
    ``weights``: the emulator's own weights when they changed after the cut (FedBiOT's
    alignment, see :func:`fed_crash.core.emulator.emulator_weights`); else cut from ``model``.
    ``source_sha256``: the weights hash of the model the emulator was first cut from, when
    ``model`` now holds other adapters (a re-aligned emulator is written with the round's
    adapters plugged in; its source is still the owner's model, which reports and resumed runs
    check it against); else ``model``'s own.
    ``weights_dtype`` (run-config ``wire-dtype``): ``bf16`` stores every frozen weight rounded to
    bf16 (half the bytes to send); ``auto`` rounds only the decoder layers' matrices, and only
    when ``compute_dtype`` is bf16, where every pass multiplies them in bf16 anyway
    (:func:`~fed_crash.core.emulator.layer_matrix_keys`): fewer bytes, the same results; ``fp32``
    keeps them as they are. The adapters file stays in the model's dtype. The manifest's
    ``weights_dtype`` says what was stored: ``fp32``, ``bf16`` or ``bf16-matrices``.
    ``compute_dtype`` records the dtype the server's CKA or search ran in."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = emulator_state(model, spec) if weights is None else weights
    weights, stored = wire_weights(model, weights, weights_dtype, compute_dtype)
    save_tensors(out / WEIGHTS, weights)
    save_tensors(out / ADAPTERS, adapter_state(model, spec), {"spec": spec.to_dict(), "source_id": source_id})
    model.config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    manifest = {
        "format": FORMAT,
        "spec": spec.to_dict(),
        "layer_prefix": layer_path(model),
        "layer_map": [{"position": i, "source": src, "role": role} for i, (src, role) in enumerate(spec.layer_map())],
        "sharing_map": {str(k): v for k, v in spec.sharing_map().items()},
        "source": {"model_id": source_id, "sha256": source_sha256 or state_hash(model.state_dict())},
        # Content hash of the emulator's tensors: checked on arrival, whatever the serialisation.
        "weights_sha256": state_hash(weights),
        "weights_dtype": stored,
        "compute_dtype": compute_dtype,
        "clusters": [list(c) for c in spec.clusters],
        "similarity": similarity.tolist() if similarity is not None else None,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    log.info("wrote emulator %s (%s)", out, spec.describe().splitlines()[0])
    return out


def parse_manifest(text: str | bytes, where: str) -> dict:
    """A manifest's JSON, checked to be this format (a folder on disk, or one received)."""
    manifest = json.loads(text)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder} is not an emulator folder: {MANIFEST} is missing")
    return parse_manifest(path.read_text(), str(path))


def read_weights(folder: str | Path, manifest: dict) -> dict[str, torch.Tensor]:
    """The emulator folder's tensors, their content hash checked against the manifest's."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{path} is missing")
    weights = load_file(str(path))
    if state_hash(weights) != manifest["weights_sha256"]:
        raise ArtifactError(f"{path} does not match the hash in its manifest (corrupted or replaced)")
    return weights


def load_emulator(
    folder: str | Path, adapters: str | Path | dict | None = None, *, device: str | None = "cpu"
) -> tuple[Emulator, object, dict]:
    """Emulator model, tokenizer, manifest. Adapters: ``adapters`` when given (a file or a state
    dict, e.g. a round's global adapters), else the folder's initial ``adapters.safetensors``.
    The emulator weights' content hash is checked against the manifest before they are used."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    weights = read_weights(folder, manifest)
    spec = EmulatorSpec.from_dict(manifest["spec"])
    if adapters is None:
        adapters = folder / ADAPTERS
    adapter_weights = adapters if isinstance(adapters, dict) else load_adapters(adapters)
    expected = {f"{manifest['layer_prefix']}.{i}." for i in spec.adapters}
    stray = sorted(k for k in adapter_weights if not (is_lora_key(k) if spec.lora_rank else k.startswith(tuple(expected))))
    if stray:
        raise ArtifactError(f"adapter tensor {stray[0]!r} is not an adapter layer of this emulator (adapters: layers {list(spec.adapters)})")
    # a bf16 wire stores the weights rounded to bf16; the model computes on fp32 copies of them, so
    # a machine without bf16 compute (no autocast to hide the mix) multiplies like with like
    state = {k: v.float() if v.dtype == torch.bfloat16 else v for k, v in {**weights, **adapter_weights}.items()}
    emulator = assemble(AutoConfig.from_pretrained(folder), state, spec)
    emulator.model.to(resolve_device(device))
    return emulator, AutoTokenizer.from_pretrained(folder), manifest
