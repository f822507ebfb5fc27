#!/usr/bin/env bash
# Creates .venv in the repository root with what tools/*.py need.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r tools/requirements.txt
# FusionBench's WEMoE module, for tools/make_wemoe_fixtures.py: without its long dependency list, plus
# the few modules its imports touch (peft: the import chain of its TiesMergingAlgorithm).
.venv/bin/pip install -q --no-deps fusion-bench accelerate bidict lightning lightning-utilities torchmetrics peft
.venv/bin/pip install -q omegaconf hydra-core
echo ".venv ready: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
