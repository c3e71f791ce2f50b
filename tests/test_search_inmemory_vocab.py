"""Search's in-memory merges of a recipe with a tokenizer block equal `run`'s file merge (issue #18:
they used to skip the vocabulary alignment, so the resident model kept the donor's rows and tokenizer)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import merge, tensors

from mergesmith.search.inmemory import InMemoryMerger
from mergesmith.toymodels import make_base, make_vocab_variant


def test_in_memory_union_merge_equals_the_file_merge(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base", layers=2, hidden=32, vocab=96, seed=0)
    chat = make_vocab_variant(base, tmp_path / "chat", seed=1, added=("<|im_start|>", "<|im_end|>"))
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": str(base),
        "models": [{"model": str(chat), "parameters": {"weight": 0.7}}],
        "tokenizer": {"source": "union"},
        "dtype": "float32",
    }
    merge(recipe, tmp_path / "full")
    written = tensors(tmp_path / "full")
    assert written["model.embed_tokens.weight"].shape[0] > 96  # the union added rows

    merger = InMemoryMerger(recipe, [])
    merger.load_weights(recipe)
    resident = merger.model.state_dict()
    assert set(written) <= set(resident)
    for name, value in written.items():
        torch.testing.assert_close(resident[name], value, rtol=0, atol=0, msg=name)
    assert merger.tokenizer.convert_tokens_to_ids("<|im_end|>") >= 96  # scored with the union's tokenizer
    ids = merger.tokenizer("<|im_start|>hi<|im_end|>")["input_ids"]
    assert max(ids) < written["model.embed_tokens.weight"].shape[0]
