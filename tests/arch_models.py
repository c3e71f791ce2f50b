"""Tiny random models of many families, built by transformers itself from a config and saved with
`save_pretrained`: the checkpoints a user downloads, with the names and config.json keys each
family really has (hidden size 64 or less, a text decoder of 2 layers, a vision tower of 3)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

TEXT = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 128,
}
VISION = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3, "num_attention_heads": 2}


def _decoder(cls: str, **extra: Any) -> tuple[str, dict[str, Any]]:
    return cls, {**TEXT, **extra}


# family -> (class name, config kwargs); model_type comes from the class's config.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": _decoder("LlamaForCausalLM"),
    "mistral": _decoder("MistralForCausalLM"),
    "qwen2": _decoder("Qwen2ForCausalLM"),
    "qwen3": _decoder("Qwen3ForCausalLM"),
    "gemma2": _decoder("Gemma2ForCausalLM"),
    "gemma3_text": _decoder("Gemma3ForCausalLM", sliding_window=16),
    "phi3": _decoder("Phi3ForCausalLM", pad_token_id=0),
    "gpt2": ("GPT2LMHeadModel", {"vocab_size": 96, "n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}),
    "gpt_neox": _decoder("GPTNeoXForCausalLM"),
    "falcon": (
        "FalconForCausalLM",
        {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4},
    ),
    "stablelm": _decoder("StableLmForCausalLM"),
    "starcoder2": _decoder("Starcoder2ForCausalLM"),
    "mamba": ("MambaForCausalLM", {"vocab_size": 96, "hidden_size": 64, "num_hidden_layers": 2, "state_size": 8}),
    "qwen3_moe": _decoder(
        "Qwen3MoeForCausalLM", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1
    ),
    "gemma3": (
        "Gemma3ForConditionalGeneration",
        {
            "text_config": {**TEXT, "sliding_window": 16},
            "vision_config": {**VISION, "image_size": 32, "patch_size": 8},
            "mm_tokens_per_image": 4,
        },
    ),
    "qwen2_5_vl": (
        "Qwen2_5_VLForConditionalGeneration",
        {
            "text_config": {**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}},
            "vision_config": {
                "depth": 3,
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_heads": 2,
                "out_hidden_size": 64,
                "patch_size": 8,
                "fullatt_block_indexes": [2],
                "window_size": 16,
            },
        },
    ),
    "mistral3": (
        "Mistral3ForConditionalGeneration",
        {
            "text_config": {**TEXT, "model_type": "mistral"},
            "vision_config": {**VISION, "model_type": "pixtral", "head_dim": 16, "image_size": 32, "patch_size": 8},
        },
    ),
    "llava": (
        "LlavaForConditionalGeneration",
        {
            "text_config": {**TEXT, "model_type": "llama"},
            "vision_config": {
                **VISION,
                "model_type": "clip_vision_model",
                "image_size": 32,
                "patch_size": 8,
                "projection_dim": 32,
            },
        },
    ),
    "t5": (
        "T5ForConditionalGeneration",
        {"vocab_size": 96, "d_model": 64, "d_kv": 16, "d_ff": 96, "num_layers": 2, "num_heads": 4},
    ),
    "t5_gated": (
        "T5ForConditionalGeneration",
        {
            "vocab_size": 96,
            "d_model": 64,
            "d_kv": 16,
            "d_ff": 96,
            "num_layers": 2,
            "num_heads": 4,
            "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": False,
        },
    ),
    "bert": (
        "BertForMaskedLM",
        {
            "vocab_size": 96,
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 96,
        },
    ),
}
VLMS = ("gemma3", "qwen2_5_vl", "mistral3", "llava")


def model_class(family: str) -> Any:
    return getattr(transformers, FAMILIES[family][0])


def build(family: str, directory: Path, seed: int) -> Path:
    """A random model of `family`, saved with transformers' own save_pretrained."""
    cls = model_class(family)
    kwargs = FAMILIES[family][1]
    config = cls.config_class(**kwargs)
    config.architectures = [cls.__name__]
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():  # every tensor random, norms too: a merge formula shows on each
            p.normal_(0.0, 0.1 if p.dim() > 1 else 1.0)
    model.save_pretrained(directory)
    return directory


def finetune(base: Path, family: str, directory: Path, seed: int) -> Path:
    """`base` plus small noise on every tensor, saved the same way."""
    cls = model_class(family)
    model = cls.from_pretrained(base).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    model.save_pretrained(directory)
    return directory


def dummy_inputs(family: str, model: Any) -> dict[str, torch.Tensor]:
    """Token ids (and a decoder input for T5): enough for a forward pass of the text path."""
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    if family.startswith("t5"):
        return {"input_ids": ids, "decoder_input_ids": ids[:, :3]}
    return {"input_ids": ids}
