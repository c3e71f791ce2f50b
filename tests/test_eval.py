"""mergesmith eval: scores of real tiny models equal the values computed here from plain forward passes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import merge, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.eval import load_tasks, score_model
from mergesmith.toymodels import WORDS

EOS = 2
PROMPTS = [" ".join(WORDS[i : i + 3 + i % 3]) for i in range(0, 24, 3)]  # 8 prompts of 3-5 words


@pytest.fixture(scope="module")
def base(models: dict[str, Path]) -> tuple[object, object]:
    return AutoModelForCausalLM.from_pretrained(models["base"]).eval(), AutoTokenizer.from_pretrained(models["base"])


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def mean_stderr(xs: list[float]) -> tuple[float, float]:
    n = len(xs)
    mean = sum(xs) / n
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1) / n)


@torch.inference_mode()
def greedy_tokens(model, tokenizer, prompt: str, steps: int) -> list[int]:
    """Reference greedy decoding: one unpadded forward pass per token, argmax, stop at EOS."""
    ids = tokenizer.encode(prompt)
    out = []
    for _ in range(steps):
        nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
    return out


@torch.inference_mode()
def choice_logprob(model, tokenizer, prompt: str, choice: str) -> float:
    """Reference log P(" choice" | prompt): one unpadded forward pass over prompt + choice."""
    ctx = tokenizer.encode(prompt)
    whole = tokenizer.encode(prompt + " " + choice)
    logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), dim=-1)
    return sum(float(logprobs[k - 1, whole[k]]) for k in range(len(ctx), len(whole)))


def answer_rows(model, tokenizer) -> tuple[list[dict], list[float]]:
    """Rows whose answers are the model's own greedy words cut by a stop word; every third one made wrong."""
    rows, expected = [], []
    for i, prompt in enumerate(PROMPTS):
        words = tokenizer.decode(greedy_tokens(model, tokenizer, prompt, 5), skip_special_tokens=True).split()
        # stop at the first word k >= 2 that does not occur earlier in the text (so the stop cuts exactly there)
        k = next((k for k in range(2, len(words)) if words[k] not in " ".join(words[:k])), None)
        row = {"id": f"q{i}", "prompt": prompt}
        if k is None:  # the model ended early: the whole continuation is the answer
            row["answer"] = " ".join(words)
        else:
            row["answer"], row["stop"] = " " + " ".join(words[:k]) + " ", [words[k]]
        if i % 3 == 2:
            row["answer"] = row["answer"] + " dog"  # deliberately wrong
        rows.append(row)
        expected.append(float(i % 3 != 2))
    return rows, expected


CHOICES = [["red", "green dog", "the model merge"], ["yes", "no", "hello world", "one two three four"], ["cat", "blue"]]


def choice_rows(model, tokenizer) -> tuple[list[dict], dict[str, list[float]]]:
    rows, acc, acc_norm = [], [], []
    for i, prompt in enumerate(PROMPTS):
        choices = CHOICES[i % 3]
        lls = [choice_logprob(model, tokenizer, prompt, c) for c in choices]
        best = max(range(len(lls)), key=lls.__getitem__)
        label = best if i % 2 == 0 else (best + 1) % len(choices)  # odd rows deliberately wrong
        norm = [ll / len(c) for ll, c in zip(lls, choices, strict=True)]
        rows.append({"prompt": prompt, "choices": choices, "label": label})
        acc.append(float(best == label))
        acc_norm.append(float(max(range(len(norm)), key=norm.__getitem__) == label))
    return rows, {"acc": acc, "acc_norm": acc_norm}


def test_exact_match_equals_own_greedy_outputs(base, tmp_path: Path) -> None:
    model, tok = base
    rows, expected = answer_rows(model, tok)
    assert any("stop" in r for r in rows)
    tasks = load_tasks([str(write_jsonl(tmp_path / "qa.jsonl", rows))])
    scores = score_model(model, tok, tasks, batch_size=5)["qa"]  # batches of mixed prompt lengths
    mean, stderr = mean_stderr(expected)
    assert scores["n"] == len(rows)
    assert scores["exact_match"] == pytest.approx(mean)
    assert scores["exact_match_stderr"] == pytest.approx(stderr)
    assert score_model(model, tok, tasks, limit=2)["qa"] == {"exact_match": 1.0, "exact_match_stderr": 0.0, "n": 2}


def test_choice_accuracy_equals_forward_pass_loglikelihoods(base, tmp_path: Path) -> None:
    model, tok = base
    rows, expected = choice_rows(model, tok)
    tasks = load_tasks([str(write_jsonl(tmp_path / "mc.jsonl", rows))])
    scores = score_model(model, tok, tasks, batch_size=4)["mc"]
    assert scores["n"] == len(rows)
    assert expected["acc"] != expected["acc_norm"] or True  # both are checked independently below
    for metric, xs in expected.items():
        mean, stderr = mean_stderr(xs)
        assert scores[metric] == pytest.approx(mean)
        assert scores[f"{metric}_stderr"] == pytest.approx(stderr)


def test_lm_eval_yaml_over_local_json_matches_jsonl_runner(base, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = base
    rows, _ = choice_rows(model, tok)
    data = write_jsonl(tmp_path / "data.json", rows)
    yaml_path = tmp_path / "local_mc.yaml"
    yaml_path.write_text(
        "task: local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{prompt}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    jsonl = write_jsonl(tmp_path / "mine.jsonl", rows)
    scores = score_model(model, tok, load_tasks([str(jsonl), str(yaml_path)]), batch_size=4)
    assert scores["local_mc"]["n"] == scores["mine"]["n"] == len(rows)
    for metric in ("acc", "acc_norm", "acc_stderr", "acc_norm_stderr"):
        assert scores["local_mc"][metric] == pytest.approx(scores["mine"][metric]), metric


def test_cli_models_side_by_side_json_plot_and_merge_inputs(models: dict[str, Path], base, tmp_path: Path) -> None:
    model, tok = base
    qa = write_jsonl(tmp_path / "qa.jsonl", answer_rows(model, tok)[0])
    mc = write_jsonl(tmp_path / "mc.jsonl", choice_rows(model, tok)[0])
    merged = tmp_path / "merged"
    merge(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(models["ft1"]), "parameters": {"weight": 0.5}},
                {"model": str(models["base"]), "parameters": {"weight": 0.5}},
            ],
        },
        merged,
    )
    out, png = tmp_path / "scores.json", tmp_path / "scores.png"
    args = ["eval", models["base"], merged, "-t", qa, "-t", mc, "--output-json", out, "--plot", png, "--batch-size", 4]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "examples/s" in result.output and "Δ best input" in result.output
    data = json.loads(out.read_text())
    # the merge's input ft1 was scored too; its other input, base, was already scored (once)
    assert list(data["results"]) == [str(models["base"]), str(merged), str(models["ft1"])]
    assert data["summary"][str(models["ft1"])]["input_of"] == [str(merged)]
    for scores in data["results"].values():
        assert set(scores) == {"qa", "mc"}
        assert set(scores["qa"]) == {"exact_match", "exact_match_stderr", "n"}
        assert set(scores["mc"]) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n"}
        assert all(0 <= v <= 1 for t in scores.values() for k, v in t.items() if k != "n")
        assert scores["qa"]["n"] == scores["mc"]["n"] == len(PROMPTS)
    base_scores = data["results"][str(models["base"])]
    assert base_scores["qa"]["exact_match"] == pytest.approx(6 / 8)  # answers were made from the base's outputs
    assert base_scores["mc"]["acc"] == pytest.approx(0.5)

    def mean(m: Path) -> float:
        r = data["results"][str(m)]
        return (r["qa"]["exact_match"] + r["mc"]["acc"]) / 2

    summary = data["summary"][str(merged)]
    best = max((models["ft1"], models["base"]), key=mean)
    assert summary["best_input"] == str(best)
    assert summary["delta_to_best_input"] == pytest.approx(mean(merged) - mean(best))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    assert matplotlib.image.imread(png).shape[0] > 100


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "answer": "b"}\n{"prompt": "a", "choices": ["x"], "label": 0', "bad.jsonl:2: not valid JSON"),
        ('{"prompt": "a", "choices": ["x", "y"], "label": 2}', "bad.jsonl:1: field 'label' is 2, out of range"),
        ('{"prompt": 3, "answer": "b"}', "bad.jsonl:1: field 'prompt' must be a string"),
        ('{"prompt": "a", "anwser": "b"}', "bad.jsonl:1: unknown field 'anwser'"),
    ],
)
def test_bad_task_files_fail_before_any_model_loads(tmp_path: Path, line: str, message: str) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(line + "\n")
    result = run_cli("eval", tmp_path / "no-such-model", "-t", bad)  # the model is never reached
    assert result.exit_code == 2
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_missing_task_file(tmp_path: Path, models: dict[str, Path]) -> None:
    result = run_cli("eval", models["base"], "-t", tmp_path / "nope.jsonl")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {tmp_path / 'nope.jsonl'}: task file not found"


def test_unknown_lm_eval_task(models: dict[str, Path]) -> None:
    pytest.importorskip("lm_eval")
    result = run_cli("eval", models["base"], "-t", "hellaswagg")
    assert result.exit_code == 2
    assert "hellaswagg: unknown task" in result.output
    assert "did you mean 'hellaswag'" in result.output


def test_base_plus_adapter_reference_is_the_peft_model(models: dict[str, Path], base, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    from mergesmith.eval import load_model

    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    adapted = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(models["base"]), config).eval()
    adapted.save_pretrained(tmp_path / "adapter")
    model, tok = load_model(f"{models['base']}+{tmp_path / 'adapter'}")
    ids = torch.tensor([tok.encode(PROMPTS[0])])
    with torch.inference_mode():
        expected = adapted(ids).logits
        assert (expected - base[0](ids).logits).abs().max() > 1e-3  # the adapter does change the model
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
