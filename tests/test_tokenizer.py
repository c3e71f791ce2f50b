"""Vocabulary alignment on real tokenizers: the output tokenizer's ids and every embedding row.

The inputs are tiny Llama-style models whose tokenizers differ the way real fine-tunes' do (added
ChatML tokens, Llama-3 specials with renumbered words, a padded embedding, tied embeddings). Each
expected row is computed here from the input files with the rules of SPEC section 6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import merge, tensors
from tokenizers import Tokenizer

from mergesmith.toymodels import make_base, make_vocab_variant

CHATML = ("<|im_start|>", "<|im_end|>")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vocab")
    base = make_base(root / "base", layers=2, hidden=32, vocab=96, seed=0)
    tied = make_base(root / "tied", layers=2, hidden=32, vocab=96, seed=10, tie=True)
    return {
        "base": base,
        "chatml": make_vocab_variant(base, root / "chatml", seed=1, added=CHATML, eos_token="<|im_end|>"),
        "llama3": make_vocab_variant(base, root / "llama3", seed=2, added=LLAMA3, eos_token="<|eot_id|>", shuffle=True),
        "padded": make_vocab_variant(base, root / "padded", seed=3, pad_to_multiple_of=64, new_words=("zebra", "yak")),
        "tied": tied,
        "tied_chat": make_vocab_variant(tied, root / "tied_chat", seed=4, added=CHATML),
    }


def vocab(directory: Path) -> dict[str, int]:
    return Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab(with_added_tokens=True)


def encode(directory: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))(text, add_special_tokens=False).input_ids


def matrix(directory: Path, head: bool) -> torch.Tensor:
    sd = tensors(directory)
    return sd[HEAD] if head and HEAD in sd else sd[EMBED]


def expected_row(token, model, dirs, base, specs, head):
    """SPEC 6: the model's own row unless absent or forced, else the configured source or the default rules."""
    spec = specs.get(token, {})
    own = vocab(dirs[model])
    if token in own and not spec.get("force"):
        return matrix(dirs[model], head)[own[token]]
    src = spec.get("source")
    if isinstance(src, dict) and src["kind"] == "zero":
        return torch.zeros(32)
    if isinstance(src, dict):  # model_token
        m = next(k for k, d in dirs.items() if str(d) == src["model"])
        row = src["token_id"] if "token_id" in src else vocab(dirs[m])[src["token"]]
        return matrix(dirs[m], head)[row]
    if src is not None:
        m = next(k for k, d in dirs.items() if str(d) == src)
        return matrix(dirs[m], head)[vocab(dirs[m])[token]]
    having = [k for k in dirs if token in vocab(dirs[k])]
    if not having:
        return torch.zeros(32)
    pick = having if len(having) > 1 and base not in having else [having[0] if len(having) == 1 else base]
    return torch.stack([matrix(dirs[k], head)[vocab(dirs[k])[token]] for k in pick]).mean(0)


def check_rows(out: Path, dirs: dict[str, Path], base: str, specs: dict, rows: int, head: bool = True) -> None:
    """Every output row equals the mean (linear, equal weights) of the models' aligned rows."""
    out_vocab = vocab(out)
    n = max(out_vocab.values()) + 1
    y = tensors(out)
    for is_head in (False, True) if head else (False,):
        got = y[HEAD if is_head else EMBED]
        assert got.shape == (rows, 32)
        aligned = {k: torch.zeros(rows, 32) for k in dirs}
        for token, i in out_vocab.items():
            for k in dirs:
                aligned[k][i] = expected_row(token, k, dirs, base, specs, is_head)
        for k in dirs:
            aligned[k][n:] = aligned[k][:n].mean(0)
        want = torch.stack(list(aligned.values())).mean(0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def recipe(dirs: dict[str, Path], base: str, **extra) -> dict:
    return {
        "merge_method": "linear",
        "base_model": str(dirs[base]),
        "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs.values()],
        **extra,
    }


def test_union_adds_every_models_tokens(vm, tmp_path):
    dirs = {k: vm[k] for k in ("base", "chatml", "llama3", "padded")}
    out = tmp_path / "out"
    merge(recipe(dirs, "base", tokenizer={"source": "union"}), out)
    b = vocab(vm["base"])
    # base ids unchanged; ChatML's tokens next, then Llama-3's, in their models' order
    assert encode(out, "<|im_start|>hello world<|eot_id|> cat") == [96, b["hello"], b["world"], 101, b["cat"]]
    assert encode(out, "<|begin_of_text|><|im_end|>") == [98, 97]
    assert encode(out, "zebra cat yak") == [102, b["cat"], 103]  # the padded model's own words, added last
    check_rows(out, dirs, "base", {}, rows=104)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == 104 and cfg["eos_token_id"] == b["</s>"] and cfg["bos_token_id"] == b["<s>"]
    report = json.loads((out / "merge_report.json").read_text())["vocabulary"]
    assert report["vocab_size"] == 104 and report["embedding_rows"] == 104
    assert report["added_tokens"] == {
        **dict.fromkeys(CHATML, str(vm["chatml"])),
        **dict.fromkeys(LLAMA3, str(vm["llama3"])),
        **dict.fromkeys(("zebra", "yak"), str(vm["padded"])),
    }
    assert report["fallback_rows"]["w42"] == "base"  # the padded model lacks it, three others have it
    assert report["fallback_rows"]["<|eot_id|>"] == f"only {vm['llama3']}"


def test_model_source_with_padding_sets_special_ids(vm, tmp_path):
    dirs = {k: vm[k] for k in ("base", "llama3")}
    out = tmp_path / "out"
    merge(recipe(dirs, "base", tokenizer={"source": str(vm["llama3"]), "pad_to_multiple_of": 64}), out)
    v = vocab(vm["llama3"])
    assert vocab(out) == v  # the Llama-3 model's tokenizer, renumbered words included
    assert encode(out, "<|start_header_id|>red dog<|eot_id|>") == [v["<|start_header_id|>"], v["red"], v["dog"], 99]
    check_rows(out, dirs, "base", {}, rows=128)
    cfg = json.loads((out / "config.json").read_text())
    gen = json.loads((out / "generation_config.json").read_text())
    assert cfg["vocab_size"] == 128 and cfg["eos_token_id"] == gen["eos_token_id"] == v["<|eot_id|>"]
    assert cfg["bos_token_id"] == v["<s>"] and gen["pad_token_id"] == v["<pad>"]


def test_tokenizer_source_legacy_key_and_base(vm, tmp_path):
    dirs = {k: vm[k] for k in ("base", "chatml", "padded")}
    out = tmp_path / "out"
    merge(recipe(dirs, "base", tokenizer_source="base"), out)
    assert vocab(out) == vocab(vm["base"])
    check_rows(out, dirs, "base", {}, rows=96)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 96


def test_token_sources_forced_zero_and_model_token(vm, tmp_path):
    dirs = {k: vm[k] for k in ("base", "chatml", "llama3")}
    specs = {
        "<|im_start|>": {"source": {"kind": "model_token", "model": str(vm["chatml"]), "token": "<|im_end|>"}},
        "<|im_end|>": {"source": str(vm["chatml"])},
        "<|eot_id|>": {"source": {"kind": "model_token", "model": str(vm["llama3"]), "token_id": 5}},
        "hello": {"source": {"kind": "zero"}, "force": True},
        "world": {"force": True},  # every model has it; forced to the default rule -> the base row
        "<|custom|>": {},  # nobody has it -> zeros, with a warning
    }
    out = tmp_path / "out"
    merge(recipe(dirs, "base", tokenizer={"source": "base", "tokens": specs}), out)
    b = vocab(vm["base"])
    assert encode(out, "<|im_start|>hello<|custom|>world<|eot_id|>") == [96, b["hello"], 99, b["world"], 98]
    check_rows(out, dirs, "base", specs, rows=100)
    y = tensors(out)
    assert torch.all(y[EMBED][b["hello"]] == 0) and torch.all(y[EMBED][99] == 0)
    torch.testing.assert_close(y[EMBED][b["world"]], tensors(vm["base"])[EMBED][b["world"]])
    rules = json.loads((out / "merge_report.json").read_text())["vocabulary"]["fallback_rows"]
    assert rules["<|custom|>"].startswith("zero") and rules["hello"] == "zero"


def test_tied_inputs_stay_tied_and_the_model_chats(vm, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = {k: vm[k] for k in ("tied", "tied_chat")}
    out = tmp_path / "out"
    merge(recipe(dirs, "tied", tokenizer={"source": "union", "pad_to_multiple_of": 64}, chat_template="chatml"), out)
    y = tensors(out)
    assert HEAD not in y
    check_rows(out, dirs, "tied", {}, rows=128, head=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 128
    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "hello world"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    model = AutoModelForCausalLM.from_pretrained(str(out))
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 4
    torch.testing.assert_close(model.get_output_embeddings().weight, y[EMBED])


def test_tied_and_untied_inputs_write_an_untied_head(vm, tmp_path):
    dirs = {k: vm[k] for k in ("tied", "chatml")}
    out = tmp_path / "out"
    merge(recipe(dirs, "tied", tokenizer={"source": "union"}), out)
    check_rows(out, dirs, "tied", {}, rows=98)  # the tied model's embedding stands in for its lm_head
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False


def test_without_a_tokenizer_block_vocab_follows_the_rows(vm, tmp_path):
    from mergesmith.preparation import MergeOptions, prepare_merge
    from mergesmith.recipe.schema import parse_config

    lin = {
        "merge_method": "linear",
        "models": [{"model": str(vm[k]), "parameters": {"weight": 1.0}} for k in ("base", "padded")],
    }
    plan, _ = prepare_merge(parse_config(lin), MergeOptions())
    for name in (EMBED, HEAD):  # the warning names each tensor and every model's size
        assert any(w.startswith(name) and "[128, 32]" in w and "[96, 32]" in w for w in plan.warnings)
    merge(lin, tmp_path / "lin")
    y, b, p = tensors(tmp_path / "lin"), tensors(vm["base"]), tensors(vm["padded"])
    torch.testing.assert_close(y[EMBED], (b[EMBED] + p[EMBED][:96]) / 2)
    assert json.loads((tmp_path / "lin" / "config.json").read_text())["vocab_size"] == 96
    ta = {
        "merge_method": "task_arithmetic",
        "base_model": str(vm["padded"]),
        "models": [{"model": str(vm["base"]), "parameters": {"weight": 1.0}}],
    }
    merge(ta, tmp_path / "ta")
    y2 = tensors(tmp_path / "ta")
    assert (
        y2[EMBED].shape == (128, 32) and json.loads((tmp_path / "ta" / "config.json").read_text())["vocab_size"] == 128
    )
    torch.testing.assert_close(y2[EMBED][:96], b[EMBED])  # base + (model - base) on the shared rows
    torch.testing.assert_close(y2[EMBED][96:], p[EMBED][96:])  # rows only the base has stay the base's


def test_recipe_errors_name_the_token(vm, tmp_path):
    from conftest import run_cli

    path = tmp_path / "r.yml"
    bad = recipe(
        {"base": vm["base"], "chatml": vm["chatml"]},
        "base",
        tokenizer={
            "tokens": {"<|im_start|>": {"source": {"kind": "model_token", "model": str(vm["base"]), "token": "nope"}}}
        },
    )
    import yaml

    path.write_text(yaml.safe_dump(bad))
    result = run_cli("run", path, tmp_path / "out", "--quiet")
    assert result.exit_code == 2
    assert "tokenizer.tokens.<|im_start|>.source" in result.output and "nope" in result.output


def test_tokens_two_models_share_take_their_mean(vm, tmp_path):
    dirs = {k: vm[k] for k in ("base", "chatml", "tied_chat")}
    out = tmp_path / "out"
    merge(recipe(dirs, "base", tokenizer={"source": "union"}), out)
    check_rows(out, dirs, "base", {}, rows=98)
    rules = json.loads((out / "merge_report.json").read_text())["vocabulary"]["fallback_rows"]
    assert rules["<|im_start|>"] == f"mean of {vm['chatml']}, {vm['tied_chat']}"
