#!/usr/bin/env bash
# The extraction comparison on a GPU machine, in under 5 minutes: each encoder in fp32 and in the default precision
# (auto: fp16 on cuda) with the lowest cosine between the two, a profile of the parts, and the Spark stage against a
# bare fp32 loop, all on cuda. Run from the repository root with the project's .venv built (make install) and
# ../shared/data/fashion beside it.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 280 .venv/bin/python bench/extract.py --device cuda --n "${N:-4096}"
