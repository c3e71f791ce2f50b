"""Model card front matter (hub ids, license agreement) and the hub upload's audit and login errors."""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import merge, run_cli

from mergesmith.methods.registry import get_method
from mergesmith.output import card
from mergesmith.output.audit import audit_merge
from mergesmith.sources.refs import parse_ref


def test_front_matter_lists_exactly_the_hub_ids(tmp_path):
    refs = [
        parse_ref("org/base", "x"),
        parse_ref("org/chat@v2", "x"),
        parse_ref(str(tmp_path), "x"),  # a local directory: not a hub id
        parse_ref("./relative/dir", "x"),
        parse_ref("org/llama+org/adapter", "x"),  # the LoRA is an input too
        parse_ref("org/base", "x"),
    ]
    text = card.model_card("m", get_method("ties"), refs[0], refs, "merge_method: ties\n", license="mit")
    front = yaml.safe_load(text.split("---")[1])
    assert front == {
        "base_model": ["org/base", "org/chat", "org/llama", "org/adapter"],
        "license": "mit",
        "library_name": "transformers",
        "tags": ["merge", "mergesmith"],
    }
    assert card.front_matter(text) == front
    assert "[TIES](https://arxiv.org/abs/2306.01708)" in text or "arxiv.org" in text
    assert "using [org/base](https://huggingface.co/org/base) as a base" in text
    assert "```yaml\nmerge_method: ties\n```" in text


def with_license(src, dst, licence):
    shutil.copytree(src, dst)
    if licence:
        (dst / "README.md").write_text(f"---\nlicense: {licence}\ntags: [x]\n---\n# model\n")
    return dst


def test_license_only_when_every_input_agrees(models, tmp_path):
    a = with_license(models["ft1"], tmp_path / "a", "apache-2.0")
    b = with_license(models["ft2"], tmp_path / "b", "apache-2.0")
    c = with_license(models["ft2"], tmp_path / "c", "mit")
    d = with_license(models["ft2"], tmp_path / "d", None)

    def licence_of(*inputs):
        out = tmp_path / f"out-{'-'.join(p.name for p in inputs)}"
        merge(
            {"merge_method": "linear", "models": [{"model": str(p), "parameters": {"weight": 1.0}} for p in inputs]},
            out,
        )
        return card.front_matter((out / "README.md").read_text()).get("license")

    assert licence_of(a, b) == "apache-2.0"
    assert licence_of(a, c) is None
    assert licence_of(a, d) is None


@pytest.fixture
def merged(models, tmp_path):
    out = tmp_path / "merged"
    merge(
        {
            "merge_method": "linear",
            "models": [{"model": str(models[k]), "parameters": {"weight": 1.0}} for k in ("ft1", "ft2")],
        },
        out,
    )
    return out


@pytest.fixture
def logged_out(monkeypatch, tmp_path):
    from huggingface_hub import constants

    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_upload_dry_run_lists_exactly_the_files(merged):
    result = run_cli("upload", merged, "me/merged", "--dry-run")
    assert result.exit_code == 0, result.output
    listed = [line.strip() for line in result.output.splitlines()[1:]]
    expected = sorted(p.name for p in merged.iterdir())
    assert listed == expected == audit_merge(merged)
    assert {"config.json", "model.safetensors", "README.md", "mergesmith_config.yml", "tokenizer.json"} <= set(listed)


def test_upload_not_logged_in(merged, logged_out):
    result = run_cli("upload", merged, "me/merged")
    assert result.exit_code == 2
    assert "not logged in to the Hugging Face hub" in result.output and "hf auth login" in result.output


def test_upload_token_unconfirmed_offline(merged, logged_out, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    result = run_cli("upload", merged, "me/merged")
    assert result.exit_code == 2 and "cannot confirm the hub login" in result.output


def test_upload_refuses_incomplete_merge(merged, logged_out):
    (merged / "model.safetensors").unlink()
    result = run_cli("upload", merged, "me/merged", "--dry-run")
    assert result.exit_code == 2 and "no model weights" in result.output
    (merged.parent / f".{merged.name}.mergesmith-partial").mkdir()
    result = run_cli("upload", merged, "me/merged")
    assert result.exit_code == 2 and "unfinished" in result.output


def test_run_push_to_hub_checks_login_before_merging(models, tmp_path, logged_out):
    recipe = tmp_path / "r.yml"
    recipe.write_text(
        yaml.safe_dump(
            {"merge_method": "linear", "models": [{"model": str(models["ft1"]), "parameters": {"weight": 1.0}}]}
        )
    )
    result = run_cli("run", recipe, tmp_path / "out", "--push-to-hub", "me/x", "--quiet")
    assert result.exit_code == 2 and "not logged in" in result.output
    assert not (tmp_path / "out").exists()
