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


# ------------------------------------------------------------------------------------------
# The paper's architectures, from their real configs (Hugging Face config.json values), with
# random weights: tiny widths for the CPU tests, the real shapes for bench/gpu_check.py. Nothing
# is downloaded; the tokenizers are byte-level BPEs (as Qwen2.5's and Llama 3's are) without
# merges, carrying each family's added special tokens.

REAL_CONFIGS: dict[str, dict] = {
    # Qwen/Qwen2.5-Math-1.5B
    "qwen2.5-math-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                              num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=4096,
                              rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, vocab_size=151936,
                              hidden_act="silu", use_sliding_window=False),
    # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    "r1-distill-qwen-1.5b": dict(arch="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                 num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=131072,
                                 rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                 vocab_size=151936, hidden_act="silu", use_sliding_window=False),
    # meta-llama/Llama-3.1-8B
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False, vocab_size=128256,
                         hidden_act="silu", rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                          "original_max_position_embeddings": 8192,
                                                          "rope_type": "llama3"}),
    # deepseek-ai/DeepSeek-R1-Distill-Llama-8B
    "r1-distill-llama-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                                rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
                                vocab_size=128256, hidden_act="silu",
                                rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
}
# The paper's pairs among them: (base, thinking)
REAL_PAIRS = {"qwen2": ("qwen2.5-math-1.5b", "r1-distill-qwen-1.5b"), "llama": ("llama-3.1-8b", "r1-distill-llama-8b")}
# Tiny widths keep each family's head ratio (Qwen 6 query heads per KV head, Llama 4) and every other setting.
TINY_WIDTHS = {"qwen2": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=1),
               "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                             num_key_value_heads=1)}

BASE_ADDED = {"qwen2": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
              "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]}
R1_ADDED = ["<｜end▁of▁sentence｜>", "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>"]
# R1 distills' chat template writes the BOS itself (and opens <think> after the assistant tag).
R1_CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<｜User｜>{{ message['content'] }}{% endfor %}"
                    "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}")


def byte_tokenizer(added: list[str], *, bos: str | None, eos: str, ordinary_size: int | None = None,
                   chat_template: str | None = None, ascii_only: bool = False,
                   merges: list[tuple[str, str]] | None = None, prepend_bos: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE without merges (every text splits into its bytes, canonically), with
    ``added`` special tokens after the ordinary ones and, with ``ordinary_size``, ordinary filler
    tokens up to that size (so that nearly every id a real-shaped model emits decodes).

    ``ascii_only``: only the bytes of printable ASCII and newline, so that every token a random
    model emits is whole text (a lone byte of a multi-byte character is not, and goes through
    text as a replacement character).

    ``merges``: BPE merges of byte symbols (``"Ġ"`` is the space), each adding its merged token, so
    that two tokenizers of one family split the same text differently (different vocabularies).
    ``prepend_bos``: the tokenizer writes its BOS in front of every text, as Llama 3's does."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_symbols = bytes_to_unicode()
    kept = [byte for byte in byte_symbols if not ascii_only or 32 <= byte < 127 or byte == 10]
    vocab = {byte_symbols[byte]: index for index, byte in enumerate(kept)}
    for left, right in merges or []:
        vocab[left + right] = len(vocab)
    if ordinary_size is not None:
        for index in range(len(vocab), ordinary_size):
            vocab[f"<filler_{index}>"] = index
    backend = Tokenizer(models.BPE(vocab, list(merges or []), unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    if prepend_bos:
        if bos is None or bos not in added:
            raise ValueError("prepend_bos needs a BOS among the added tokens")
        backend.add_special_tokens(added)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend)
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    if bos is not None:
        tokenizer.bos_token = bos
    tokenizer.eos_token = eos
    tokenizer.pad_token = eos
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def real_config(name: str, *, tiny: bool, vocab_size: int | None = None, **overrides):
    """(model class, HF config) of ``name`` in ``REAL_CONFIGS``; ``tiny``: the family's tiny widths."""
    settings = dict(REAL_CONFIGS[name])
    arch = settings.pop("arch")
    if tiny:
        settings.update(TINY_WIDTHS[arch])
    if vocab_size is not None:
        settings["vocab_size"] = vocab_size
    settings.update(overrides)
    if arch == "llama":
        return LlamaForCausalLM, LlamaConfig(**settings)
    return Qwen2ForCausalLM, Qwen2Config(**settings)


def real_pair_tokenizers(arch: str, vocab_size: int | None = None) -> tuple[PreTrainedTokenizerFast, PreTrainedTokenizerFast]:
    """(base, thinking) tokenizers of a family: the same ordinary vocabulary, the base with its
    own added tokens, the thinking one with R1's (BOS written by its chat template). Without
    ``vocab_size`` (the tiny models): printable ASCII bytes only."""
    base_bos = "<|begin_of_text|>" if arch == "llama" else None
    base_eos = "<|end_of_text|>" if arch == "llama" else "<|endoftext|>"
    ascii_only = vocab_size is None
    # the same ordinary vocabulary for both; the added tokens (and TL's) fit in the ids above it
    ordinary = None if vocab_size is None else vocab_size - 16
    # Llama 3's tokenizer writes <|begin_of_text|> in front of every text; Qwen2.5's writes nothing.
    base = byte_tokenizer(BASE_ADDED[arch], bos=base_bos, eos=base_eos, ordinary_size=ordinary, ascii_only=ascii_only,
                          prepend_bos=arch == "llama")
    thinking = byte_tokenizer(R1_ADDED, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", ordinary_size=ordinary,
                              chat_template=R1_CHAT_TEMPLATE, ascii_only=ascii_only)
    return base, thinking


def save_real_pair(folder: Path, arch: str, *, tiny: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """Write a random-weight (base, thinking) pair of the family ``arch`` ("qwen2" or "llama") as HF folders."""
    vocab_size = None if tiny else REAL_CONFIGS[REAL_PAIRS[arch][0]]["vocab_size"]
    tokenizers = real_pair_tokenizers(arch, vocab_size)
    paths = []
    for offset, (name, tokenizer) in enumerate(zip(REAL_PAIRS[arch], tokenizers, strict=True)):
        model_class, config = real_config(name, tiny=tiny, vocab_size=vocab_size or len(tokenizer) + 2,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id,
                                          initializer_range=0.2 if tiny else 0.02)
        torch.manual_seed(seed + offset)
        model = model_class(config)
        if tiny:
            # Random models would emit added tokens as often as text; keep them to text (an added
            # token is what the shared-id and re-encoding paths treat differently, by design).
            with torch.no_grad():
                for index in tokenizer.added_tokens_decoder:
                    model.lm_head.weight[index] *= 0.01
        path = folder / name
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]


# Both tokenizers of a chat pair have one-letter words (" a" ... " z"); the thinking one also has
# merges the base's lacks, so the pair's ordinary vocabularies differ and the hybrid and the
# directions go through text (the re-encoding path), as for pairs of two families.
WORD_MERGES = [("Ġ", chr(code)) for code in range(ord("a"), ord("z") + 1)]
THINKING_MERGES = [("h", "e"), ("i", "n"), ("e", "r"), ("o", "n"), ("r", "e"), ("a", "n")]


def save_chat_pair(folder: Path, *, thinking_prompt: str = "r1", seed: int = 0) -> tuple[Path, Path]:
    """A random-weight tiny Qwen2 (base, thinking) pair with different ordinary vocabularies, as HF folders.

    ``thinking_prompt="r1"``: the thinking tokenizer has R1's added tokens and chat template (the
    BOS written by the template, ``<think>`` opened); ``"orz"``: Qwen2.5's tokens and no chat
    template (Open-Reasoner-Zero is prompted with its own plain template).

    The models write sentences: their output layer favours words, full stops and newlines over
    other bytes (a random model would otherwise write ~1 space per 100 characters, and no
    sentence of three words for the later stages)."""
    base = byte_tokenizer(BASE_ADDED["qwen2"], bos=None, eos="<|endoftext|>", ascii_only=True, merges=WORD_MERGES)
    merges = WORD_MERGES + THINKING_MERGES
    if thinking_prompt == "r1":
        thinking = byte_tokenizer(R1_ADDED, bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>",
                                  chat_template=R1_CHAT_TEMPLATE, ascii_only=True, merges=merges)
    elif thinking_prompt == "orz":
        thinking = byte_tokenizer(BASE_ADDED["qwen2"], bos=None, eos="<|endoftext|>", ascii_only=True, merges=merges)
    else:
        raise ValueError(f"unknown thinking_prompt {thinking_prompt!r}")
    paths = []
    for offset, (name, tokenizer) in enumerate(((REAL_PAIRS["qwen2"][0], base), (REAL_PAIRS["qwen2"][1], thinking))):
        model_class, config = real_config(name, tiny=True, vocab_size=len(tokenizer) + 2,
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id, initializer_range=0.2)
        torch.manual_seed(seed + offset)
        model = model_class(config)
        favoured = {index for token, index in tokenizer.get_vocab().items()
                    if (token.startswith("Ġ") and len(token) == 2 and token[1].isalpha()) or token in (".", "Ċ")}
        with torch.no_grad():
            for index in range(config.vocab_size):
                if index not in favoured:
                    model.lm_head.weight[index] *= 0.2
        path = folder / f"{name}-{thinking_prompt}"
        path.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        paths.append(path)
    return paths[0], paths[1]
