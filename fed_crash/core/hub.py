"""Whether the Hugging Face hub can answer, decided once per process and in about a second.

Machines without a network are the default here. Left alone, ``transformers`` and ``datasets``
retry an unreachable hub for tens of seconds before they give up; a quick connection attempt
first turns that into an immediate, clear error (or, for models, a load from the local hub
cache when the files are there).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
from typing import Iterator
from urllib.parse import urlparse


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when ``HF_HUB_OFFLINE`` is set or the hub endpoint does not accept a connection."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Within it, ``huggingface_hub`` (and so ``transformers``) is in offline mode when the hub is
    unreachable: files come from the local hub cache or fail at once. Yields whether it is."""
    from huggingface_hub import constants

    offline, before = not hub_reachable(), constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield constants.HF_HUB_OFFLINE
    finally:
        constants.HF_HUB_OFFLINE = before


def datasets_hub_unreachable() -> bool:
    """True when ``datasets`` would only retry: no hub, and not in its offline mode (which reads
    the local cache at once). Callers fail then with a message that names what to pass instead."""
    import datasets

    return not hub_reachable() and not datasets.config.HF_HUB_OFFLINE
