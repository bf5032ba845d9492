"""Fixtures: the tiny models, rows and tokenizer of :mod:`fed_crash.tools.tiny`, the tiny model
folder a real run needs, and an in-process Grid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, Error, Message, RecordDict
from transformers import PreTrainedTokenizerFast

from fed_crash.tools.tiny import ROWS, build_tokenizer, tiny_gpt2, tiny_llama  # noqa: F401 - the tests import them from here

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALPACA = SHARED_DATA / "instruct" / "alpaca_data.json"

def write_run_files(root: Path, tokenizer, copies: int) -> Path:
    """A tiny Llama model folder (safetensors + tokenizer) and ``copies`` x ROWS as distinct
    Alpaca rows in ``rows.jsonl``: what a real ``flwr run`` of the app needs on disk."""
    tiny_llama().save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    rows = [dict(r, instruction=f"{r['instruction']} ({i})") for i, r in enumerate(ROWS * copies)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def train_metrics(examples: int, **dp: float) -> dict[str, float]:
    """The MetricRecord of an honest train reply (:data:`protocol.CLIENT_METRICS`, every name),
    plus the DP one given as ``dp`` (``update_norm=0.5``)."""
    from fed_crash.federation import protocol as P

    base = {P.NUM_EXAMPLES: examples, "train-loss": 2.0, "first-loss": 2.5, "tokens": 40 * examples, "steps": 2, "seconds": 0.5,
            "step-seconds": 0.2, "delivery-seconds": 0.01, "load-seconds": 0.1, "data-seconds": 0.1, "threads": 1, "peak-rss-mib": 500.0,
            "worker-pid": 4242, "gpu-id": -1, "on-cuda": 0, "start-time": 1.7e9, "end-time": 1.7e9 + 0.6, "unit-weight": 1}
    return {**base, **{k.replace("_", "-"): v for k, v in dp.items()}}


@pytest.fixture
def server_identity(monkeypatch):
    """Messages take run, node and task ids from the process's identity, which a ServerApp
    process has; set one for messages built in a test."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return tiny_llama() if request.param == "llama" else tiny_gpt2()


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a Hugging Face folder (safetensors + tokenizer), as users give one."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


class LocalGrid:
    """Flower's Grid in one process, for tests of the server's own logic (Flower's transport is
    not what they test; the end-to-end tests run real ``flwr run``s): the connected nodes, with
    ids 1..n or as given (Flower draws them at random), each answering with the app's real
    ClientApp (its handlers and mods) and its own Context, partition i for the i-th node. An
    exception in a handler becomes an error reply whose reason is built as Flower's Ray
    simulation builds it (:func:`simulated_error_reason`)."""

    def __init__(self, nodes: int, *, ids: list[int] | None = None, run_config: dict | None = None) -> None:
        self.nodes = list(ids or range(1, nodes + 1))
        self.contexts = {node: Context(run_id=1, node_id=node, node_config={"partition-id": i, "num-partitions": len(self.nodes)},
                                       state=RecordDict(), run_config=dict(run_config or {})) for i, node in enumerate(self.nodes)}
        self.sent: list[Message] = []  # every message, in order
        self._replies: dict[str, Message] = {}  # pushed, not pulled yet

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages) -> list[str]:
        """Each message gets an id, as Flower's grids give one, and is answered at once."""
        from uuid import uuid4

        from alpaca.client_app import app

        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            self.sent.append(message)
            try:
                reply = app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as err:  # noqa: BLE001 - what Flower does with a ClientApp's exception
                reply = Message(Error(code=2, reason=simulated_error_reason(err)), reply_to=message)
            self._replies[message.metadata.message_id] = reply
            ids.append(message.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        return self.pull_messages(self.push_messages(messages))


def simulated_error_reason(err: Exception) -> str:
    """The reason of the error reply Flower's Ray simulation sends for a ClientApp's exception,
    built with Flower's and Ray's own classes: the actor re-raises it as ``ClientAppException``
    (flwr/simulation/ray_transport/ray_actor.py), Ray wraps that in ``RayTaskError`` with the
    traceback, and the backend writes ``str(type(ex)) + ":<'" + str(ex) + "'>"``
    (flwr/server/superlink/fleet/vce/vce_api.py)."""
    import os
    import traceback

    from flwr.clientapp.client_app import ClientAppException
    from ray.exceptions import RayTaskError

    try:
        try:
            raise err
        except Exception as ex:  # noqa: BLE001
            raise ClientAppException(str(ex)) from ex
    except ClientAppException as wrapped:
        ray_error = RayTaskError("ClientAppActor.run", traceback.format_exc(), wrapped, proctitle="ray::ClientAppActor.run",
                                 pid=os.getpid(), ip="127.0.0.1").as_instanceof_cause()
    return str(type(ray_error)) + ":<'" + str(ray_error) + "'>"
