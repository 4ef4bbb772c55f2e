#!/usr/bin/env bash
# The extraction comparison on a GPU machine, in under 5 minutes: Spark job vs bare loop, both on cuda.
# Run from the repository root with the project's .venv built (make install) and ../shared/data/fashion beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 280 .venv/bin/python bench/extract.py --device cuda --n "${N:-4096}" --batch-size "${BATCH:-128}"
