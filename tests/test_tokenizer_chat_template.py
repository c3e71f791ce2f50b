"""Chat templates: built-ins render the conversations their model families expect; auto, literal, errors."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import merge

from mergesmith.errors import MergeError
from mergesmith.output.chat_template import apply_chat_template, resolve_template

EXPECTED = {
    "chatml": "<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\nHi.<|im_end|>\n"
    "<|im_start|>user\nWhat is a merge?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is a merge?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s>[INST] Hello! [/INST]Hi.</s>[INST] What is a merge? [/INST]",
    "alpaca": "### Instruction:\nHello!\n\n### Response:\nHi.</s>\n\n### Instruction:\nWhat is a merge?\n\n"
    "### Response:\n",
    "gemma": "<s><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\nHi.<end_of_turn>\n"
    "<start_of_turn>user\nWhat is a merge?<end_of_turn>\n<start_of_turn>model\n",
    "phi3": "<|user|>\nHello!<|end|>\n<|assistant|>\nHi.<|end|>\n<|user|>\nWhat is a merge?<|end|>\n<|assistant|>\n",
    "zephyr": "<|user|>\nHello!</s>\n<|assistant|>\nHi.</s>\n<|user|>\nWhat is a merge?</s>\n<|assistant|>\n",
    "vicuna": "USER: Hello! ASSISTANT: Hi.</s> USER: What is a merge? ASSISTANT:",
}


@pytest.fixture()
def tok_dir(models, tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(models["base"] / name, d / name)
    return d


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_templates_render(tok_dir, name):
    assert apply_chat_template(tok_dir, name, []) == EXPECTED[name]
    assert (tok_dir / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((tok_dir / "tokenizer_config.json").read_text())


def test_auto_takes_the_most_common_template(tmp_path):
    dirs = []
    for i, template in enumerate(["{{ 'A' }}{% for m in messages %}x{% endfor %}"] * 2 + ["{{ 'B' }} other one"]):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        dirs.append(d)
    assert resolve_template("auto", dirs).startswith("{{ 'A' }}")
    assert resolve_template("auto", [tmp_path]) is None


def test_literal_template_and_errors(tok_dir):
    literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    assert apply_chat_template(tok_dir, literal, []).startswith("[user] Hello! [assistant] Hi.")
    with pytest.raises(MergeError, match="neither a built-in"):
        resolve_template("chatmlx", [])
    with pytest.raises(MergeError, match="does not render"):
        apply_chat_template(tok_dir, "{% for m in messages %}{{ m['content'] ", [])


def test_no_tokenizer_drops_the_template(models, tmp_path):
    recipe = {
        "merge_method": "linear",
        "models": [{"model": str(models[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
        "chat_template": "chatml",
    }
    merge(recipe, tmp_path / "out", "--no-copy-tokenizer")
    assert not (tmp_path / "out" / "chat_template.jinja").exists()
