"""Tiny randomly initialised models and a tiny real BPE tokenizer, built offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
ALPACA = SHARED_DATA / "instruct" / "alpaca_data.json"

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep enough and exercise."},
    {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
    {"instruction": "Name a primary color.", "input": "", "output": "Red."},
    {"instruction": "Add the numbers.", "input": "2 and 3", "output": "2 + 3 = 5"},
    {"instruction": "Describe the sky.", "input": "", "output": "The sky is blue and wide on a clear day."},
    {"instruction": "Summarize the text.", "input": "Cats sleep a lot. They also play.", "output": "Cats sleep and play."},
    {"instruction": "Write a haiku about rain.", "input": "", "output": "Soft rain on the roof, quiet drums of the evening, the garden drinks deep."},
    {"instruction": "What is the capital of Italy?", "input": "", "output": "Rome is the capital of Italy."},
] * 4


def tiny_llama(layers: int = 8, seed: int = 0, vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(layers: int = 8, seed: int = 0, vocab: int = 300) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=layers, n_head=4, n_positions=256, pad_token_id=0, eos_token_id=1)
    return GPT2LMHeadModel(cfg).eval()


def write_run_files(root: Path, tokenizer, copies: int) -> Path:
    """A tiny Llama model folder (safetensors + tokenizer) and ``copies`` x ROWS as distinct
    Alpaca rows in ``rows.jsonl``: what a real ``flwr run`` of the app needs on disk."""
    tiny_llama().save_pretrained(root / "model", safe_serialization=True)
    tokenizer.save_pretrained(root / "model")
    rows = [dict(r, instruction=f"{r['instruction']} ({i})") for i, r in enumerate(ROWS * copies)]
    (root / "rows.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    return root


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (vocab 300) trained on the fixture rows and the Alpaca template."""
    from fed_crash.core.data import ALPACA_PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [ALPACA_PROMPT] + [" ".join(r.values()) for r in ROWS]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


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

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        from alpaca.client_app import app

        replies = []
        for message in messages:
            self.sent.append(message)
            try:
                replies.append(app(message, self.contexts[message.metadata.dst_node_id]))
            except Exception as err:  # noqa: BLE001 - what Flower does with a ClientApp's exception
                replies.append(Message(Error(code=2, reason=simulated_error_reason(err)), reply_to=message))
        return replies


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
