"""The data-aware methods `regmean` and `fisher` through `mergesmith run`, against their formulas with
statistics computed here independently (hidden states from transformers, gradients from autograd),
and their statistics cache reused by a second run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from console import mergesmith
from transformers import AutoModelForCausalLM, AutoTokenizer

from mergesmith.toymodels import load_state_dict, make_base, make_finetune

PROMPTS = {
    "ft1": ["one two three four", "two three four five", "three four five six"],
    "ft2": ["red green blue", "green blue red yellow", "blue red"],
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("calibration")
    base = make_base(root / "base", layers=2, hidden=32, vocab=96, seed=0)
    for i, name in enumerate(PROMPTS, 1):
        make_finetune(base, root / name, seed=i, scale=0.05)
        rows = [{"prompt": p} for p in PROMPTS[name]] + [{"text": "never read"}]
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def recipe(method: str, **params: object) -> dict:
    return {
        "merge_method": method,
        "base_model": "./base",
        "models": [
            {"model": "./ft1", "parameters": {"weight": 1.0}},
            {"model": "./ft2", "parameters": {"weight": 0.5}},
        ],
        "parameters": params,
        "dtype": "float32",
        "calibration": {"data": {"./ft1": "ft1.jsonl", "./ft2": "ft2.jsonl"}, "samples": 3, "cache": "./stats"},
    }


def run(zoo: Path, spec: dict, out: str) -> str:
    (zoo / f"{out}.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    proc = mergesmith("run", f"{out}.yml", out, "-v", cwd=zoo)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval(), AutoTokenizer.from_pretrained(path)


def q_inputs(path: Path, prompts: list[str], layer: int) -> torch.Tensor:
    """Layer `layer`'s q_proj inputs on every token: its input norm of the hidden state entering it."""
    m, tok = model(path)
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            h = m(ids, output_hidden_states=True).hidden_states[layer]
            rows.append(m.model.layers[layer].input_layernorm(h)[0])
    return torch.cat(rows)


def test_regmean_solves_the_least_squares_merge_and_reuses_its_statistics(zoo: Path) -> None:
    first = run(zoo, recipe("regmean", alpha=0.8), "rm")
    assert first.count("collecting gram statistics") == 2
    cached = sorted((zoo / "stats").glob("gram-*.safetensors"))
    assert len(cached) == 2
    stamps = [p.stat().st_mtime_ns for p in cached]

    name = "model.layers.1.self_attn.q_proj.weight"
    w = {"ft1": 1.0, "ft2": 0.5}
    lhs, rhs = 0, 0
    for m, weight in w.items():
        x = q_inputs(zoo / m, PROMPTS[m], 1)
        g = x.T @ x
        g = 0.8 * g + 0.2 * torch.diag(torch.diagonal(g))
        wi = load_state_dict(zoo / m)[name].double()
        lhs, rhs = lhs + weight * g, rhs + weight * wi @ g
    want = rhs @ torch.linalg.inv(lhs)
    got = load_state_dict(zoo / "rm")
    torch.testing.assert_close(got[name].double(), want, rtol=1e-4, atol=1e-5)
    norm = "model.layers.0.input_layernorm.weight"  # not a linear layer: the weighted mean
    x1, x2 = (load_state_dict(zoo / m)[norm].double() for m in w)
    torch.testing.assert_close(got[norm].double(), (x1 + 0.5 * x2) / 1.5)

    second = run(zoo, recipe("regmean", alpha=0.8), "rm2")
    assert "collecting" not in second and second.count("reused from") == 2
    assert [p.stat().st_mtime_ns for p in cached] == stamps
    assert all(torch.equal(got[k], v) for k, v in load_state_dict(zoo / "rm2").items())


def test_fisher_weights_each_parameter_by_its_fisher_information(zoo: Path) -> None:
    """The paper's Fisher: of the model's own next-token distribution, one label drawn per position
    (generator seeded with the prompt's index), not of the prompt's own tokens."""
    run(zoo, recipe("fisher"), "fi")
    name = "model.layers.0.mlp.down_proj.weight"
    num, den = 0, 0
    for m, weight in {"ft1": 1.0, "ft2": 0.5}.items():
        net, tok = model(zoo / m)
        param = dict(net.named_parameters())[name]
        f = torch.zeros_like(param)
        for n, p in enumerate(PROMPTS[m]):
            ids = tok(p, return_tensors="pt").input_ids
            logits = net(ids).logits[0]
            probs = torch.softmax(logits.float(), -1)
            drawn = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(n))[:, 0]
            assert not torch.equal(drawn[:-1], ids[0, 1:])  # not the empirical Fisher's labels
            logp = torch.log_softmax(logits, -1)[torch.arange(len(drawn)), drawn].sum()
            (g,) = torch.autograd.grad(logp, param)
            f += g.square()
        f = (f / len(PROMPTS[m])).clamp_min(1e-6) * weight
        num, den = num + f * param.detach(), den + f
    got = load_state_dict(zoo / "fi")[name].double()
    torch.testing.assert_close(got, num / den, rtol=1e-4, atol=1e-6)


def test_the_fisher_estimate_converges_to_the_exact_expectation_over_labels(zoo: Path) -> None:
    """Drawn labels are a Monte Carlo estimate of E_{y ~ p} (∂ log p(y) / ∂θ)²: over many draws it
    approaches the exact sum over the vocabulary, computed here by enumeration for a one-token prompt."""
    from mergesmith.calibration.collect import collect

    net, tok = model(zoo / "ft1")
    name = "model.layers.1.mlp.down_proj.weight"
    param = dict(net.named_parameters())[name]
    ids = tok("two", return_tensors="pt").input_ids
    assert ids.shape[1] == 1
    logp = torch.log_softmax(net(ids).logits[0, -1], -1)
    exact = torch.zeros_like(param)
    for y in range(len(logp)):
        (g,) = torch.autograd.grad(logp[y], param, retain_graph=True)
        exact += logp[y].exp().detach() * g.square()
    got = collect("fisher", zoo / "ft1", ["two"] * 400, 16)[name].double()
    assert abs(float(got.sum() / exact.sum()) - 1) < 0.15
    assert float(torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0)) > 0.9


def test_a_data_aware_method_without_data_is_one_error(zoo: Path) -> None:
    spec = recipe("regmean")
    del spec["calibration"]
    (zoo / "bad.yml").write_text(yaml.safe_dump(spec))
    proc = mergesmith("run", "bad.yml", "bad", cwd=zoo)
    assert proc.returncode == 2 and "calibration" in proc.stdout
    assert "Traceback" not in proc.stdout and not (zoo / "bad").exists()
    spec = recipe("fisher")
    spec["calibration"]["data"].pop("./ft2")
    (zoo / "bad.yml").write_text(yaml.safe_dump(spec))
    proc = mergesmith("run", "bad.yml", "bad", cwd=zoo)
    assert proc.returncode == 2 and "no calibration data for ./ft2" in proc.stdout
