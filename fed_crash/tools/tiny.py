"""Tiny randomly initialised models and a tiny real BPE tokenizer, built offline in seconds from
a config: what the tests, the reliability script and the benchmarks run real processes on."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from fed_crash.core.data import ALPACA_PROMPT

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


def tiny_gemma3(layers: int = 8, seed: int = 0, vocab: int = 300, sliding_window: int = 4) -> Gemma3ForCausalLM:
    """Gemma 3's layout in small: five sliding-window layers (window ``sliding_window``, RoPE base
    10k) then one full-attention layer (RoPE base 1M), repeated; tied embeddings."""
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, sliding_window=sliding_window, query_pre_attn_scalar=8,
                           pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return Gemma3ForCausalLM(cfg).eval()


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A real byte-level BPE (vocab 300) trained on the fixture rows and the Alpaca template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = [ALPACA_PROMPT] + [" ".join(r.values()) for r in ROWS]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
