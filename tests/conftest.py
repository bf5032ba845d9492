"""Tiny randomly initialised models and a tiny real BPE tokenizer, built offline in seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
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


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (vocab 300) trained on the fixture rows and the Alpaca template."""
    from fed_crash.data import ALPACA_PROMPT

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [ALPACA_PROMPT] + [" ".join(r.values()) for r in ROWS]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


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
