#!/usr/bin/env bash
# Install mergesmith (and, when no torch is installed, the CPU build of torch 2.13.0), then build a
# tiny base and two fine-tunes that each learn one skill (seconds of CPU training), TIES-merge them,
# load the result with transformers and generate, then score the merge beside its inputs with
# `mergesmith eval`: each fine-tune knows its own skill, the merge knows both.
# GPU users: install the torch build for your CUDA first; this script keeps an installed torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[test]"
DEMO="${1:-${TMPDIR:-/tmp}/mergesmith-demo}"
"$PY" -m mergesmith.cli demo "$DEMO"
# Score the merge beside its inputs (read from the recipe it carries) on the two skills.
"$PY" -m mergesmith.cli eval "$DEMO/merged" --task "$DEMO/demo-count.jsonl" --task "$DEMO/demo-colors.jsonl"
