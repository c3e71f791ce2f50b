"""What the figures mean, in sentences: the report's `findings`, shown first everywhere.

Thresholds, and why:
- a model does not share the base when, in the attention and MLP matrices (norm vectors, all ones
  at initialisation, would hide it), its weights have cosine below 0.5 with the base's and its task
  vector is at least half their size: fine-tunes keep cosine near 1 and move weights by a few
  percent, while two independent initialisations have cosine ~0 and differ by ~1.4x;
- a layer where two task vectors have cosine below -0.1 has the models pulling against each other
  (independent fine-tunes sit near 0); a sign conflict above 35% of the magnitude is more than
  independent task vectors give (15% for two, 25% for four);
- a density cut keeping under half of a task vector's magnitude throws most of it away;
- a tokenizer that differs from the base's makes embedding rows stand for different tokens.
"""

from __future__ import annotations

from typing import Any

FOREIGN_NORM = 0.5
FOREIGN_COSINE = 0.5
NEAR_ZERO_COSINE = 0.1
FIGHT_COSINE = -0.1
HIGH_CONFLICT = 0.35
LOW_KEPT = 0.5


def _layers(indices: list[int]) -> str:
    return ("layer " if len(indices) == 1 else "layers ") + ", ".join(str(i) for i in indices)


def findings(report: dict[str, Any]) -> list[str]:
    out: list[str] = []
    models: list[str] = report["models"]
    base = report["base"]
    overall = report["overall"]
    layers = report["layers"]
    foreign = set()
    weights = [overall["modules"][m] for m in ("attention", "mlp") if m in overall["modules"]] or [overall]
    for i, name in enumerate(models):
        norms = [g["norm"][i] for g in weights]
        cosines = [g["base_cosine"][i] for g in weights]
        if any(x is None for x in norms + cosines) or min(norms) < FOREIGN_NORM or max(cosines) >= FOREIGN_COSINE:
            continue
        foreign.add(i)
        text = (
            f"{name} does not share the base {base}: in the attention and MLP matrices its weights have cosine"
            f" {max(cosines):.2f} with the base's and its task vector is {min(norms):.2f}x their size"
            " (a fine-tune of the base keeps cosine near 1 and moves weights by a few percent)"
        )
        cos = [abs(c) for g in [overall, *layers] for j, c in enumerate(g["cosine"][i]) if j != i and c is not None]
        if cos and max(cos) < NEAR_ZERO_COSINE:
            text += f", and its task vector's cosine with the other models' is near zero in every layer (|cos| <= {max(cos):.2f})"
        out.append(text + "; it was trained from another base, and a task-vector merge with it will not work")
    for i in range(len(models)):
        for j in range(i + 1, len(models)):
            if i in foreign or j in foreign:
                continue
            fights = [(g["index"], g["cosine"][i][j]) for g in layers if (g["cosine"][i][j] or 0) < FIGHT_COSINE]
            if fights:
                worst = min(c for _, c in fights)
                rates = [g["sign_conflict"]["rate"] or 0 for g in layers if g["index"] in {x for x, _ in fights}]
                out.append(
                    f"{_layers([x for x, _ in fights])}: {models[i]} and {models[j]} pull against each other"
                    f" (task-vector cosine down to {worst:.2f}, sign conflict up to {max(rates):.0%});"
                    " averaging cancels them there and a TIES sign election drops most of one of them"
                )
    conflicted = [g["index"] for g in layers if (g["sign_conflict"]["rate"] or 0) > HIGH_CONFLICT]
    if conflicted:
        worst = max(g["sign_conflict"]["rate"] for g in layers if g["index"] in conflicted)
        out.append(
            f"{_layers(conflicted)}: high sign conflict (up to {worst:.0%} of the task vectors' magnitude disagrees"
            " with the elected sign); TIES-style methods discard that share"
        )
    kept = overall.get("kept_mass")
    if kept is not None:
        for i, name in enumerate(models):
            share, density = kept["kept"][i], kept["density"][i]
            if share is not None and share < LOW_KEPT and i not in foreign:
                out.append(
                    f"density {density:.2g} keeps only {share:.0%} of {name}'s task-vector magnitude; the density cut"
                    " throws most of what this fine-tune changed away (a higher density keeps more)"
                )
    for name, diff in report["tokenizers"].items():
        if diff:
            out.append(
                f"{name}'s tokenizer differs from the base's ({diff}); embedding rows stand for different tokens,"
                " so merge with a `tokenizer:` block (e.g. `source: union`)"
            )
    merged = overall.get("merged")
    if merged is not None:
        parts = [
            f"{t:.2f} of the way towards {name}"
            for name, t in zip(models, merged["toward"], strict=True)
            if t is not None
        ]
        out.append(f"the merge {report['merged']} moved {', '.join(parts)} (1 = all of that model's task vector)")
    if not any(not s.startswith("the merge ") for s in out):
        norms = [n for n in overall["norm"] if n is not None]
        span = f"{min(norms):.3f}-{max(norms):.3f}" if norms else "0"
        out.insert(
            0,
            f"no problems found: every model shares the base (task-vector norms {span} of the base's),"
            " no layer has opposing task vectors, and the tokenizers match",
        )
    return out
