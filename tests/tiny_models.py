"""Tiny random models and a hand-built tokenizer, made offline (no hub), for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>"]
CHARACTERS = [chr(code) for code in range(32, 127)] + ["\n"]


def char_tokenizer(extra_merges: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer that prepends <bos>. With ``extra_merges`` it also has a few
    multi-character tokens (so that two tokenizers of one text disagree on boundaries)."""
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for char in CHARACTERS:
        vocab[char] = len(vocab)
    if extra_merges:
        for piece in ["th", "he", "the", " t", "an", "in", "er", "re"]:
            vocab[piece] = len(vocab)
        merges = [("t", "h"), ("h", "e"), ("th", "e"), (" ", "t"), ("a", "n"), ("i", "n"), ("e", "r"), ("r", "e")]
        backend = Tokenizer(models.BPE(vocab, merges, unk_token="<pad>"))
    else:
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"
    )


def tiny_config(arch: str, vocab_size: int):
    common = dict(vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **common
        )
    if arch == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(
            hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **common
        )
    if arch == "gpt2":
        return GPT2LMHeadModel, GPT2Config(
            n_embd=32, n_layer=3, n_head=4, n_positions=256, initializer_range=0.2, **common
        )
    raise ValueError(f"unknown arch {arch}")


def save_tiny_model(folder: Path, arch: str, seed: int = 0, extra_merges: bool = False) -> Path:
    """Write a random tiny ``arch`` model plus tokenizer as an HF folder."""
    tokenizer = char_tokenizer(extra_merges)
    model_class, config = tiny_config(arch, len(tokenizer))
    torch.manual_seed(seed)
    model = model_class(config)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
