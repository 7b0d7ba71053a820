"""Tiny randomly initialised Hugging Face model directories: the export tests and `lowbit-bench
architectures` build every architecture family from them.

Each builder writes what ``save_pretrained(safe_serialization=True)`` writes for a real model
(config.json, model.safetensors) plus a char-level fast tokenizer (text models) or a ViT image
processor config (ViT). Nothing is downloaded; sizes are minimal (hidden 32, 2 layers, vocab 96)
so an export takes seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["ARCHITECTURES", "CAUSAL", "VOCAB", "config_for", "write_tokenizer", "make_hf_dir"]

# 95 characters + [UNK]: ids 0..95 fit every tiny model's vocabulary of 96.
_ALPHABET = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;()[]{}=-+*/_'\"<>!?#%&|@$^~`\\"
VOCAB = 96
CAUSAL = ("gpt2", "llama", "qwen2", "phi3", "opt", "gemma")
ARCHITECTURES = (*CAUSAL, "bert", "t5", "vit")
POSITIONS = 128


def config_for(name: str):
    """(model class, config) of the tiny ``name`` model."""
    import transformers as t

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    decoder = dict(small, num_key_value_heads=2, max_position_embeddings=POSITIONS)
    table = {
        "gpt2": (t.GPT2LMHeadModel, lambda: t.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB,
                                                         n_positions=POSITIONS)),
        "llama": (t.LlamaForCausalLM, lambda: t.LlamaConfig(**decoder)),
        "qwen2": (t.Qwen2ForCausalLM, lambda: t.Qwen2Config(**decoder)),
        "phi3": (t.Phi3ForCausalLM, lambda: t.Phi3Config(**decoder, pad_token_id=0)),
        "opt": (t.OPTForCausalLM, lambda: t.OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                      num_attention_heads=4, vocab_size=VOCAB,
                                                      max_position_embeddings=POSITIONS, word_embed_proj_dim=32)),
        "gemma": (t.GemmaForCausalLM, lambda: t.GemmaConfig(**decoder, head_dim=8)),
        "bert": (t.BertModel, lambda: t.BertConfig(**small, max_position_embeddings=POSITIONS)),
        "bert-cls": (t.BertForSequenceClassification, lambda: t.BertConfig(**small, max_position_embeddings=POSITIONS,
                                                                           num_labels=3)),
        "t5": (t.T5ForConditionalGeneration, lambda: t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
                                                                num_layers=2, num_heads=4)),
        "vit": (t.ViTForImageClassification, lambda: t.ViTConfig(hidden_size=32, intermediate_size=64,
                                                                  num_hidden_layers=2, num_attention_heads=4,
                                                                  image_size=32, patch_size=8, num_labels=10)),
    }  # fmt: skip
    cls, make = table[name]
    return cls, make()


def write_tokenizer(directory: Path, vocab_size: int = VOCAB) -> None:
    """A char-level fast tokenizer (tokenizer.json + tokenizer_config.json) with ``vocab_size`` ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(_ALPHABET[: vocab_size - 1])}}
    assert len(vocab) == vocab_size
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", "model_max_length": 4096}))


def make_hf_dir(directory: Path, name: str) -> Path:
    """A ``save_pretrained`` directory of the tiny ``name`` model (seeded random weights)."""
    import torch

    cls, config = config_for(name)
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    if name == "vit":
        from transformers import ViTImageProcessor

        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    else:
        write_tokenizer(directory)
    return directory
