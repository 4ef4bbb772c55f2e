#!/usr/bin/env bash
# All-pairs top-K on a GPU machine, N = 1,000,000, d = 256, K = 20, in under 5 minutes, plus a check of exactness:
# for 2,000 sampled rows the GPU answer must equal a direct sort of those rows' full similarity rows (recall 1.0).
# One run per precision in PRECISIONS (default fp32 fp16 bf16): fp16 / bf16 multiply in that precision with float32
# accumulation and rescore in float32 whatever the rounding could have moved, so each must still be exact.
# A CPU baseline at N = 100,000 in the same run gives the ratio. matcher.steps.scoring needs only numpy and torch, so
# this runs with the project's .venv or, on a bare GPU image, its python3 (PYTHON=... to choose another).
# A dry run of the script itself on a machine without a GPU:
#     DEVICE=cpu N=20000 BASE_N=5000 PRECISIONS="fp32 bf16" bench/gpu_allpairs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi here"
PYTHONPATH=. timeout 400 "$PYTHON" - <<'PY'
import os, time
import numpy as np
import torch
from matcher.steps.scoring import topk

d, k = 256, 20
n = int(os.environ.get("N", 1_000_000))
base_n = int(os.environ.get("BASE_N", 100_000))
device = os.environ.get("DEVICE", "cuda")
precisions = os.environ.get("PRECISIONS", "fp32 fp16 bf16").split()


def data(rows: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((rows, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact_rows(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Top-k of the sampled rows straight from their full similarity rows, self excluded, 500 rows at a time."""
    xt = torch.as_tensor(x, device=device)
    out = []
    for chunk in np.array_split(rows, max(1, len(rows) // 500)):
        sims = xt[torch.as_tensor(chunk, device=device)] @ xt.T
        sims[torch.arange(len(chunk), device=device), torch.as_tensor(chunk, device=device)] = -torch.inf
        out.append(torch.topk(sims, k, dim=1).indices.cpu().numpy())
    return np.concatenate(out)


def run(x: np.ndarray, device: str, block: int, precision: str = "fp32") -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    _, idx = topk(x, x, k, block_size=block, exclude_self=True, device=device, precision=precision)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, idx


small = data(base_n)
cpu_s, cpu_idx = run(small, "cpu", 2048)
dev_small_s, dev_small_idx = run(small, device, 8192)
print(f"N={base_n:,}: cpu {cpu_s:.1f}s ({torch.get_num_threads()} threads), {device} {dev_small_s:.1f}s, "
      f"ratio {cpu_s / dev_small_s:.1f}x, same neighbours {np.mean(cpu_idx == dev_small_idx):.6f}")

x = data(n)
rows = np.random.default_rng(1).choice(n, 2000, replace=False)
expected = exact_rows(x, rows)
where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
for precision in precisions:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds, idx = run(x, device, 8192, precision)
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(idx[rows].tolist(), expected.tolist())])
    peak = f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB, " if device == "cuda" else ""
    print(f"N={n:,} d={d} K={k} {precision}: {seconds:.1f}s on {where}, {peak}recall@K on 2,000 sampled rows "
          f"{recall:.6f}, identical rows {np.mean((idx[rows] == expected).all(1)):.4f}", flush=True)
PY
