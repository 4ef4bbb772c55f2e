#!/usr/bin/env bash
# All-pairs top-K on a GPU machine, N = 1,000,000, d = 256, K = 20, in under 5 minutes (matcher on cuda; FAISS CPU
# is left out at this size). Run from the repository root with the project's .venv built (make install).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
timeout 280 .venv/bin/python - <<'PY'
import time, torch
from matcher.scoring import topk
n, d, k = 1_000_000, 256, 20
x = torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(0)), dim=1).numpy()
start = time.perf_counter()
scores, idx = topk(x, x, k, block_size=8192, exclude_self=True, device="cuda")
torch.cuda.synchronize()
print(f"N={n} d={d} K={k}: {time.perf_counter() - start:.1f}s on {torch.cuda.get_device_name()}, "
      f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, first row {idx[0][:5]}")
PY
