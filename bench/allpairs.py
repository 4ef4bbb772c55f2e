"""All-pairs exact top-K: matcher.steps.scoring.topk against the bare symmetric matrix product (the floor), FAISS
IndexFlatIP (exact) and a naive full-matrix numpy baseline, same data, same threads, each method in its own
process so peak memory is its own.

    .venv/bin/pip install -r requirements-bench.txt
    .venv/bin/python bench/allpairs.py [--n 20000 100000] [--dim 256] [--k 20] [--threads 2] [--repeat 3]
                                       [--device cpu|cuda] [--precision fp32 fp16 bf16]
    .venv/bin/python bench/allpairs.py --ann [--n 1000000] [--queries 2000] [--query-probes 32] [--sample 0]
                                       [--refine 3] [--target-recall 0.98]

Each repeat runs every method once, in turn (matcher right after the bare product), so that a noisy neighbour on
the machine slows them alike; the table shows the median time, and time/bare is the median of each repeat's own
ratio (the two runs next to each other), with every repeat's ratio beside it. Peak memory is the process's
maximum resident set minus its resident set once the data was made (the largest over the repeats); on a GPU,
torch's peak allocated device memory."""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _data(n: int, d: int) -> np.ndarray:
    x = np.random.default_rng(0).standard_normal((n, d), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _run(method: str, n: int, d: int, k: int, threads: int, block: int, queue) -> None:
    import torch

    torch.set_num_threads(threads)
    x = _data(n, d)
    base = _rss_mb()
    started, elapsed = time.perf_counter(), None
    if method.startswith("matcher"):
        from matcher.steps.scoring import topk

        precision = method.split()[-1] if method.startswith("matcher cuda") else "fp32"
        device = "cuda" if method.startswith("matcher cuda") else "cpu"
        if device == "cuda":
            topk(x[:2048], x[:2048], k, exclude_self=True, device=device, precision=precision)  # CUDA start-up
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
        _, idx = topk(x, x, k, exclude_self=True, device=device, threads=threads, precision=precision)
        if device == "cuda":
            elapsed = time.perf_counter() - started
            queue.put((elapsed, torch.cuda.max_memory_allocated() / 2**20, idx))
            return
    elif method == "faiss":
        import faiss

        faiss.omp_set_num_threads(threads)
        index = faiss.IndexFlatIP(d)
        index.add(x)
        _, found = index.search(x, k + 1)
        idx = np.array([[j for j in row if j != i][:k] for i, row in enumerate(found)])
    elif method == "bare product":
        # The arithmetic alone, in the same shape as matcher's all-pairs path: each block pair (a, b >= a) of the
        # symmetric matrix multiplied once, no selection; the floor matcher's top-K is measured against. Timed at
        # --block and at matcher's own block size, numpy's BLAS on all threads; the faster one is the floor.
        from threadpoolctl import threadpool_limits

        from matcher.steps.scoring import default_block_size

        times = []
        with threadpool_limits(limits=threads, user_api="blas"):
            for size in sorted({block, default_block_size(threads=threads)}):
                started = time.perf_counter()
                for a in range(0, n, size):
                    for b in range(a, n, size):
                        np.matmul(x[a:a + size], x[b:b + size].T)
                times.append(time.perf_counter() - started)
        elapsed = min(times)
        idx = None
    else:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        part = np.argpartition(-sims, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, part, 1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, 1)
    seconds = elapsed if elapsed is not None else time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put((seconds, peak - base, idx))


def measure(method: str, n: int, d: int, k: int, threads: int, block: int):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_run, args=(method, n, d, k, threads, block, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def clustered(n: int, d: int, seed: int = 0, per_cluster: int = 50, spread: float = 0.7) -> np.ndarray:
    """Unit vectors around n / per_cluster random centres: centre + spread * N(0, I) per dimension, so products of
    one cluster sit at a cosine of about 1 / (1 + spread^2) from each other."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(1, n // per_cluster), d), dtype=np.float32)
    x = np.empty((n, d), np.float32)
    for a in range(0, n, 100_000):  # in slices: the noise of a million rows at once would double peak memory
        b = min(n, a + 100_000)
        x[a:b] = centres[rng.integers(0, len(centres), b - a)] + spread * rng.standard_normal((b - a, d), np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _run_ann(n: int, d: int, k: int, threads: int, queries: int, query_probes: int, spread: float, lists: int,
             sample: int, refine: int, target_recall: float, queue) -> None:
    import torch

    from matcher.steps.ann import ann_all_pairs, list_count, recall_at_k
    from matcher.steps.scoring import topk

    torch.set_num_threads(threads)
    x = clustered(n, d, spread=spread)
    base = _rss_mb()
    started = time.perf_counter()
    _, idx, probes = ann_all_pairs(x, k, lists=lists, probes=1, query_probes=query_probes, sample=sample,
                                   threads=threads, refine=refine, target_recall=target_recall or None)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    sample = np.random.default_rng(1).choice(n, min(n, queries), replace=False)
    started = time.perf_counter()
    _, exact = topk(x[sample], x, k, exclude=sample, threads=threads)
    exact_seconds = time.perf_counter() - started
    queue.put((seconds, peak, recall_at_k(idx[sample], exact), exact_seconds, list_count(n, lists), probes))


def ann_table(args) -> None:
    """ANN candidates against exact search on a sample of queries, one process per N."""
    print(f"d={args.dim} K={args.k} threads={args.threads} spread={args.spread} query_probes={args.query_probes} "
          f"training sample={args.sample} refine={args.refine} target recall={args.target_recall} "
          f"sampled queries={args.queries}\n")
    print(f"{'N':>9} {'lists':>6}{'probes':>7}{'ANN s':>9}{'peak MB':>9}{'recall@K':>10}{'exact s, sample':>17}"
          f"{'exact s, all (projected)':>26}{'exact/ANN':>10}")
    for n in args.n:
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        proc = ctx.Process(target=_run_ann, args=(n, args.dim, args.k, args.threads, args.queries,
                                                  args.query_probes, args.spread, args.lists, args.sample,
                                                  args.refine, args.target_recall, queue))
        proc.start()
        seconds, peak, recall, exact_seconds, lists, probes = queue.get()
        proc.join()
        # The general exact path's measured rate, times N queries; the symmetric path does about half the work.
        projected = exact_seconds * n / min(n, args.queries)
        print(f"{n:>9} {lists:>6}{probes:>7}{seconds:>9.1f}{peak:>9.0f}{recall:>10.4f}{exact_seconds:>17.2f}"
              f"{projected:>14.0f} ({projected / 2:>5.0f} sym){projected / 2 / seconds:>10.1f}")
    print("\nANN: k-means lists (about 4 sqrt(N) unless --lists), each product searched exactly against its own list's "
          "covering lists and its nearest lists (probes: --query-probes, doubled until the recall on other sampled "
          "rows reaches --target-recall); recall@K against the exact top-K of the sampled queries. exact/ANN: the "
          "symmetric projection over the ANN time (goal recall >= 0.98).")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--block", type=int, default=2048)
    parser.add_argument("--device", default="cpu", help="cuda: also matcher on the GPU, one row per --precision")
    parser.add_argument("--precision", nargs="+", default=["fp32", "fp16", "bf16"], help="with --device cuda")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each method; the median time is shown")
    parser.add_argument("--memory-gb", type=float, default=20.0, help="skip the naive baseline above this")
    parser.add_argument("--ann", action="store_true",
                        help="approximate candidates on synthetic clustered vectors (default N = 1,000,000)")
    parser.add_argument("--queries", type=int, default=2000, help="--ann: sampled queries for recall")
    parser.add_argument("--query-probes", type=int, default=32, help="--ann: lists searched per query")
    parser.add_argument("--spread", type=float, default=0.7, help="--ann: noise around each cluster centre")
    parser.add_argument("--lists", type=int, default=0, help="--ann: k-means lists (0: about 4 sqrt(N))")
    parser.add_argument("--sample", type=int, default=0,
                        help="--ann: vectors the lists are trained on (0: 64 per list, at least 100,000)")
    parser.add_argument("--target-recall", type=float, default=0.98,
                        help="--ann: probes grow until this (score.ann_target_recall); 0: fixed --query-probes")
    parser.add_argument("--refine", type=int, default=3,
                        help="--ann: k-means passes over all N after the sample's (score.ann_refine_iterations)")
    args = parser.parse_args()
    if args.ann:
        if args.n == parser.get_default("n"):
            args.n = [1_000_000]
        ann_table(args)
        return 0
    try:
        import faiss  # noqa: F401
        have_faiss = True
    except ImportError:
        have_faiss = False
        print("faiss not installed (pip install -r requirements-bench.txt): FAISS rows skipped")

    print(f"d={args.dim} K={args.k} threads={args.threads} block={args.block} device={args.device} "
          f"repeat={args.repeat}\n")
    print(f"{'N':>8} {'method':<20}{'seconds':>9}  {'runs (s)':<26}{'peak MB':>9}{'time/faiss':>11}"
          f"{'time/bare':>10}  {'each repeat':<24}{'recall@K vs faiss':>19}")
    for n in args.n:
        methods = []
        gpu = [f"matcher cuda {p}" for p in args.precision] if args.device == "cuda" else []
        for method in ("bare product", "matcher", *gpu, "faiss", "numpy naive"):
            if method == "faiss" and not have_faiss:
                continue
            if method == "numpy naive" and 4 * n * n / 2**30 > args.memory_gb:
                print(f"{n:>8} {method:<20}skipped: the float32 N x N matrix alone needs {4 * n * n / 2**30:.0f} GB")
                continue
            methods.append(method)
        runs: dict[str, list] = {method: [] for method in methods}
        for _ in range(max(1, args.repeat)):
            for method in methods:
                runs[method].append(measure(method, n, args.dim, args.k, args.threads, args.block))
        results = {method: (float(np.median([r[0] for r in rs])), max(r[1] for r in rs), rs[0][2],
                            [r[0] for r in rs]) for method, rs in runs.items()}
        ref, bare = results.get("faiss"), results["bare product"]
        for method, (seconds, peak, idx, times) in results.items():
            ratio = f"{seconds / ref[0]:.2f}" if ref else ""
            per_repeat = [t / b for t, b in zip(times, bare[3])]
            to_bare = f"{np.median(per_repeat):.2f}"
            each = " ".join(f"{r:.2f}" for r in per_repeat)
            recall = ""
            if ref and idx is not None:
                hits = [len(set(a) & set(b)) for a, b in zip(idx.tolist(), ref[2].tolist())]
                recall = f"{np.sum(hits) / (len(hits) * args.k):.6f}"
            spread = " ".join(f"{t:.2f}" for t in times)
            print(f"{n:>8} {method:<20}{seconds:>9.2f}  {spread:<26}{peak:>9.0f}{ratio:>11}{to_bare:>10}  {each:<24}"
                  f"{recall:>19}")
    print("\nmatcher's memory bound: O(N*K + block^2) for all pairs; the naive baseline holds N*N. time/bare: "
          "against the symmetric blocked matrix product alone, same data and threads: the median of the repeats' "
          "own ratios (goal for matcher <= 1.3).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
