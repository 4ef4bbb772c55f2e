"""How the nightly pipeline scales with the catalog on a local Spark standalone cluster.

    .venv/bin/python bench/scale.py [--sizes 25000,50000,100000,200000] [--workdir /tmp/matcher-scale]
                                    [--code DIR] [--workers 1] [--cores 2] [--memory 3g] [--json OUT]

For each N it draws (once, cached under --workdir per N and seed) a synthetic catalog of N products: products.csv
(product_id, title, description, category, image) and 48x48 JPEGs, a category-dependent shape in the colour the
title names, plus noise. It then runs `matcher run` for one date as a child process against a Spark standalone
cluster started by this script (jobs/standalone_cluster.py of the repository this file lives in, whatever --code
says), with the scale profile's settings (matcher/profiles/scale.toml: the weightless encoders thumbnail-8x8 and
hashing-384, no extra views, a 64-d model) and the default result cap, and records

  * the ANN night's lists, probes and sampled recall@10 (from the manifest), where the night used ANN,
  * the wall seconds of each stage (from the child's `stage <name> for <date>: done in Xs` log lines),
  * the peak RSS of the driver side (the child python process + its JVM + any other descendants, summed at each
    poll) and of the executor side (every descendant of the Worker daemon(s): executor JVMs and their Python
    workers), overall and per stage, polled every --poll seconds with psutil.

It prints a Markdown table, a summary row per N, and the ratios: driver peak at each N / at the smallest N (the goal
is <= 1.15 at the largest) and seconds per 1k products per stage (linear in N = flat across N).

--code DIR picks the checkout whose `matcher` and `jobs` packages run, driver and executors alike: DIR goes first on
PYTHONPATH of the child and of the cluster daemons (executors and their Python workers inherit the Worker's
environment), ahead of the virtualenv's editable install (a meta-path finder appended after the path finder, so a
PYTHONPATH entry wins). The child prints the `matcher.__file__` it imported, and a one-task probe job on the cluster
prints what the executors import. Config keys the checkout does not know (its matcher/defaults.toml has every key;
old code rejects unknown ones) are not written.

Sums of RSS count pages shared between processes (forked Python workers, the JVM's shared libraries) once per
process: they are an upper bound of what the processes hold together, comparable between runs of this script.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATE = "2026-01-01"
STAGES = ("clean", "validate", "extract", "train", "score", "publish")  # matcher run's stages, in order
MB = 1024 * 1024
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"

from matcher.app.synthetic_catalog import ensure_catalog  # noqa: E402  (after REPO: the catalog needs no --code)

# -- cluster, config, child ----------------------------------------------------------------------------------------


def load_cluster_module():
    """jobs/standalone_cluster.py of this repository, loaded by file (not through the `jobs` package, which --code
    may point elsewhere, and whose old versions lack the module)."""
    path = REPO / "jobs" / "standalone_cluster.py"
    spec = importlib.util.spec_from_file_location("_scale_standalone_cluster", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def known_keys(code: Path) -> dict[str, set[str]]:
    with open(code / "matcher" / "defaults.toml", "rb") as f:
        defaults = tomllib.load(f)
    return {section: set(keys) for section, keys in defaults.items() if isinstance(keys, dict)}


def wanted_config(master: str, driver_memory: str = "", candidates: str = "auto") -> dict[str, dict]:
    """The scale profile (matcher/profiles/scale.toml of this repository) spelled out key by key, so a --code
    checkout without profiles runs the same night, and the bench's own settings over it."""
    with open(REPO / "matcher" / "profiles" / "scale.toml", "rb") as f:
        cfg = tomllib.load(f)
    # Both spellings: a checkout reads [spark] (this one) or [extract] spark_* (before it); write_config keeps the
    # one the checkout's defaults know.
    cfg.setdefault("spark", {})["master"] = master
    cfg["extract"]["spark_master"] = master
    if driver_memory:
        cfg["spark"]["driver_memory"] = driver_memory
        cfg["extract"]["spark_driver_memory"] = driver_memory
    cfg["train"].update({"epochs": 3, "max_products": 20000})
    cfg["score"] = {"top_k": 10, "rerank_candidates": 20, "block_size": 8192, "candidates": candidates}
    return cfg


def write_config(path: Path, code: Path, master: str, driver_memory: str = "",
                 candidates: str = "auto") -> tuple[dict, list[str]]:
    """The config TOML, without keys the checkout's defaults.toml lacks (returned as dropped)."""
    known = known_keys(code)
    cfg, dropped = {}, []
    for section, values in wanted_config(master, driver_memory, candidates).items():
        for key, value in values.items():
            if key in known.get(section, set()):
                cfg.setdefault(section, {})[key] = value
            else:
                dropped.append(f"{section}.{key}")
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return cfg, dropped


def child_env(code: Path, python: str, executor_memory: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(code)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env["SPARK_LOCAL_IP"] = "127.0.0.1"
    env["PYSPARK_PYTHON"] = python
    env["PYSPARK_DRIVER_PYTHON"] = python
    # spark-submit (which pyspark runs to start the driver's JVM) reads this when no spark.executor.memory is set:
    # one executor per worker, with the worker's memory instead of Spark's 1g default.
    env["SPARK_EXECUTOR_MEMORY"] = executor_memory
    for key in ("PYSPARK_SUBMIT_ARGS", "PYSPARK_GATEWAY_PORT", "SPARK_HOME"):
        env.pop(key, None)
    return env


# The child: `python -m matcher.app.cli ...` in effect, but first it reports which checkout it imported.
CHILD_BOOT = """\
import runpy, sys
import jobs, matcher
print(f"scale-bench: child imports matcher from {matcher.__file__}, jobs from {jobs.__file__}", file=sys.stderr,
      flush=True)
runpy.run_module("matcher.app.cli", run_name="__main__", alter_sys=True)
"""

PROBE = """\
import json, sys
import jobs, matcher
from pyspark.sql import SparkSession
spark = SparkSession.builder.master(sys.argv[1]).appName("scale-bench-probe").config("spark.ui.enabled", "false") \\
    .getOrCreate()
def where(_):
    import os, sys, jobs, matcher
    return [matcher.__file__, jobs.__file__, sys.executable, os.environ.get("PYTHONPATH", "")]
remote = spark.sparkContext.parallelize([0], 1).map(where).collect()[0]
spark.stop()
print(json.dumps({"driver": [matcher.__file__, jobs.__file__, sys.executable],
                  "executor": remote}))
"""


def probe_imports(python: str, env: dict, cwd: Path, master: str) -> dict:
    out = subprocess.run([python, "-c", PROBE, master], env=env, cwd=cwd, capture_output=True, text=True,
                         timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"import probe failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def find_workers(worker_dir: Path) -> list[int]:
    import psutil

    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if WORKER_CLASS in cmd and str(worker_dir) in cmd:
            pids.append(p.info["pid"])
    return pids


def tree_rss(pids: list[int], include_roots: bool) -> tuple[int, int, int]:
    """(summed RSS bytes, process count) of the processes' descendants (and themselves if include_roots), and the
    RSS of the roots alone (0 unless include_roots)."""
    import psutil

    total, count, roots, seen = 0, 0, 0, set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = ([root] if include_roots else []) + root.children(recursive=True)
        except psutil.Error:
            continue
        for p in procs:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                rss = p.memory_info().rss
            except psutil.Error:
                continue
            total += rss
            count += 1
            if include_roots and p.pid in pids:
                roots += rss
    return total, count, roots


STARTED_RE = re.compile(r"stage (\w+) for (\S+): started")
DONE_RE = re.compile(r"stage (\w+) for (\S+): done in ([\d.]+)s")


class Monitor:
    """Polls the driver tree and the executor trees; attributes each sample to the stage the child's log says runs."""

    def __init__(self, child_pid: int, worker_dir: Path, poll: float):
        self.child_pid = child_pid
        self.worker_dir = worker_dir
        self.poll = poll
        self.stage = "startup"
        self.lock = threading.Lock()
        self.peaks: dict[str, list[int]] = {}  # stage -> [driver max, executor max]
        self.driver_peak = 0
        self.driver_python_peak = 0  # the child python process alone (the rest of the driver side is its JVM)
        self.executor_peak = 0
        self.max_driver_procs = 0
        self.max_executor_procs = 0
        self.samples = 0
        self.loads: list[float] = []
        self.workers = find_workers(worker_dir)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def set_stage(self, stage: str) -> None:
        with self.lock:
            self.stage = stage

    def sample(self) -> None:
        if not self.workers:
            self.workers = find_workers(self.worker_dir)
        drv, nd, py = tree_rss([self.child_pid], include_roots=True)
        exe, ne, _ = tree_rss(self.workers, include_roots=False)
        with self.lock:
            peaks = self.peaks.setdefault(self.stage, [0, 0, 0])
            peaks[0] = max(peaks[0], drv)
            peaks[1] = max(peaks[1], exe)
            peaks[2] = max(peaks[2], py)
            self.driver_python_peak = max(self.driver_python_peak, py)
            self.driver_peak = max(self.driver_peak, drv)
            self.executor_peak = max(self.executor_peak, exe)
            self.max_driver_procs = max(self.max_driver_procs, nd)
            self.max_executor_procs = max(self.max_executor_procs, ne)
            self.samples += 1
            if self.samples % 20 == 1:
                self.loads.append(os.getloadavg()[0])

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # never let the poller die quietly mid-run
                print(f"scale-bench: poll error {exc!r}", file=sys.stderr)
            self._stop.wait(self.poll)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.thread.join()


def kill_tree(proc: subprocess.Popen) -> None:
    """The child's process group (it was started in its own session) and any descendant that left it."""
    import psutil

    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        for p in family:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        _, alive = psutil.wait_procs(family, timeout=wait)
        if not alive:
            return


def run_one(n: int, catalog: Path, args, cluster, env: dict, rundir: Path) -> dict:
    rundir.mkdir(parents=True, exist_ok=True)
    lake = rundir / "lake"
    if lake.exists():
        shutil.rmtree(lake)
    cfg_path = rundir / "config.toml"
    cfg, dropped = write_config(cfg_path, args.code, cluster.master_url, args.driver_memory, args.candidates)
    log_path = rundir / "child.log"
    cmd = [args.python, "-c", CHILD_BOOT, "run", "--catalog", str(catalog), "--lake", f"file://{lake}",
           "--date", DATE, "--config", str(cfg_path)]
    result = {"products": n, "status": "ok", "error": None, "stages": {}, "config": cfg, "dropped_keys": dropped,
              "log": str(log_path), "child_imports": None}
    print(f"\n== N={n}: matcher run ({args.code}) log {log_path}", flush=True)
    started = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=args.code, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.PIPE, text=True, errors="replace", bufsize=1,
                                start_new_session=True)
        mon = Monitor(proc.pid, cluster.worker_dir, args.poll)
        mon.start()
        tail: list[str] = []
        error_lines: list[str] = []

        def read_stderr():
            for line in proc.stderr:
                log.write(line)
                log.flush()
                line = line.rstrip("\n")
                tail.append(line)
                del tail[:-40]
                m = DONE_RE.search(line)
                if m:
                    result["stages"].setdefault(m.group(1), {})["seconds"] = float(m.group(3))
                    mon.set_stage("shutdown" if m.group(1) == STAGES[-1] else "between stages")
                    print(f"   {m.group(1)}: {m.group(3)}s", flush=True)
                    continue
                m = STARTED_RE.search(line)
                if m:
                    result["stages"].setdefault(m.group(1), {})
                    mon.set_stage(m.group(1))
                    continue
                if line.startswith("scale-bench: child imports"):
                    result["child_imports"] = line.split(": ", 1)[1]
                    print(f"   {line}", flush=True)
                elif line.startswith("matcher: error:") or "OutOfMemoryError" in line:
                    error_lines.append(line.strip())

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            rc = None
            kill_tree(proc)
        reader.join(30)
        mon.stop()
    result["seconds"] = round(time.perf_counter() - started, 2)
    if rc is None:
        result["status"] = "timeout"
        result["error"] = f"timed out after {args.timeout:.0f}s in stage {mon.stage}"
    elif rc != 0:
        result["status"] = "failed"
        matcher_err = [e for e in error_lines if e.startswith("matcher: error:")]
        picked = matcher_err[-1] if matcher_err else (error_lines[-1] if error_lines else
                                                      next((t for t in reversed(tail) if t.strip()), ""))
        result["error"] = f"exit {rc}: {picked}"
        if any("OutOfMemoryError" in e for e in error_lines) and "OutOfMemoryError" not in picked:
            result["error"] += " (OutOfMemoryError in the log)"
    result["driver_peak_mb"] = round(mon.driver_peak / MB, 1)
    result["driver_python_peak_mb"] = round(mon.driver_python_peak / MB, 1)
    result["executor_peak_mb"] = round(mon.executor_peak / MB, 1)
    result["max_driver_procs"] = mon.max_driver_procs
    result["max_executor_procs"] = mon.max_executor_procs
    result["samples"] = mon.samples
    result["load_avg_1m"] = round(sum(mon.loads) / len(mon.loads), 2) if mon.loads else None
    result["load_avg_1m_max"] = max(mon.loads) if mon.loads else None
    result["worker_pids"] = mon.workers
    for stage, (drv, exe, py) in mon.peaks.items():
        entry = result["stages"].setdefault(stage, {}) if stage in result["stages"] else None
        if entry is None:  # startup / between stages: kept apart from the pipeline's stages
            result.setdefault("outside_stages", {})[stage] = {"driver_peak_mb": round(drv / MB, 1),
                                                              "driver_python_peak_mb": round(py / MB, 1),
                                                              "executor_peak_mb": round(exe / MB, 1)}
            continue
        entry["driver_peak_mb"] = round(drv / MB, 1)
        entry["executor_peak_mb"] = round(exe / MB, 1)
        entry["driver_python_peak_mb"] = round(py / MB, 1)
    manifest = lake / "manifests" / f"dt={DATE}" / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text())
            result["candidates"] = m.get("candidates")
            result["manifest_counts"] = {k: v for k, v in m.items() if isinstance(v, (int, float)) and
                                         not isinstance(v, bool)}
            for key in ("rows", "row_counts", "counts"):
                if isinstance(m.get(key), dict):
                    result["manifest_counts"].update(m[key])
        except (OSError, ValueError):
            pass
    status = result["status"] + (f" ({result['error']})" if result["error"] else "")
    print(f"   N={n}: {status}; {result['seconds']:.1f}s, driver peak {result['driver_peak_mb']:.0f} MB, "
          f"executor peak {result['executor_peak_mb']:.0f} MB; machine load {result['load_avg_1m']}", flush=True)
    if not args.keep_lakes and lake.exists():
        shutil.rmtree(lake, ignore_errors=True)
    return result


# -- report --------------------------------------------------------------------------------------------------------

def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def render(results: list[dict], meta: dict) -> str:
    out = [f"# matcher scale bench: code {meta['code']} ({meta['code_rev']})", "",
           f"cluster: {meta['workers']} worker(s) x {meta['cores']} cores, worker memory {meta['memory']}, "
           f"executor memory {meta['executor_memory']}, driver memory {meta.get('driver_memory', 'config default')}; "
           f"poll {meta['poll']}s; seed {meta['seed']}; "
           f"dropped config keys: {', '.join(meta['dropped_keys']) or 'none'}", "",
           "| N | stage | seconds | s per 1k | driver peak MB | executor peak MB |",
           "|---:|---|---:|---:|---:|---:|"]
    for r in results:
        n = r["products"]
        for stage in [s for s in STAGES if s in r["stages"]] + [s for s in r["stages"] if s not in STAGES]:
            st = r["stages"][stage]
            sec = st.get("seconds")
            out.append(f"| {n} | {stage}{'' if sec is not None else ' (unfinished)'} | {_f(sec)} | "
                       f"{_f(None if sec is None else sec / n * 1000, '{:.3f}')} | "
                       f"{_f(st.get('driver_peak_mb'), '{:.0f}')}"
                       f" | {_f(st.get('executor_peak_mb'), '{:.0f}')} |")
        for stage, st in r.get("outside_stages", {}).items():
            out.append(f"| {n} | ({stage}) | - | - | {_f(st.get('driver_peak_mb'), '{:.0f}')} | "
                       f"{_f(st.get('executor_peak_mb'), '{:.0f}')} |")
        tag = "**total**" if r["status"] == "ok" else f"**{r['status'].upper()}**"
        out.append(f"| **{n}** | {tag} | **{r['seconds']:.1f}** | {r['seconds'] / n * 1000:.3f} | "
                   f"**{r['driver_peak_mb']:.0f}** | **{r['executor_peak_mb']:.0f}** |")
    errors = [r for r in results if r["error"]]
    if errors:
        out += ["", "Failures:"] + [f"- N={r['products']}: {r['error']}" for r in errors]
    out += ["", "Driver peak / driver peak at the smallest N (goal <= 1.15 at the largest N):", ""]
    base = results[0]["driver_peak_mb"] if results else None
    out.append("| N | status | driver peak MB | ratio | python process alone, peak MB | executor peak MB | ratio |")
    out.append("|---:|---|---:|---:|---:|---:|---:|")
    ebase = results[0]["executor_peak_mb"] if results else None
    for r in results:
        out.append(f"| {r['products']} | {r['status']} | {r['driver_peak_mb']:.0f} | "
                   f"{_f(r['driver_peak_mb'] / base if base else None, '{:.2f}')} | "
                   f"{_f(r.get('driver_python_peak_mb'), '{:.0f}')} | {r['executor_peak_mb']:.0f} | "
                   f"{_f(r['executor_peak_mb'] / ebase if ebase else None, '{:.2f}')} |")
    if results and results[0]["status"] != "ok":
        out.append("(the smallest N did not finish: its peak is a lower bound)")
    out += ["", "Candidates (from the manifest): " + "; ".join(
        f"N={r['products']}: " + (", ".join(f"{k} {v}" for k, v in (r.get("candidates") or {}).items()) or "-")
        for r in results)]
    out += ["", "Seconds per 1k products (flat across N = linear):", "",
            "| stage | " + " | ".join(str(r["products"]) for r in results) + " | largest / smallest |",
            "|---|" + "---:|" * (len(results) + 1)]
    for stage in STAGES + ("total",):
        cells, vals = [], []
        for r in results:
            sec = r["seconds"] if stage == "total" else r["stages"].get(stage, {}).get("seconds")
            if stage == "total" and r["status"] != "ok":
                sec = None
            v = None if sec is None else sec / r["products"] * 1000
            vals.append(v)
            cells.append(_f(v, "{:.3f}"))
        ratio = vals[-1] / vals[0] if len(vals) > 1 and vals[0] and vals[-1] is not None else None
        out.append(f"| {stage} | " + " | ".join(cells) + f" | {_f(ratio, '{:.2f}')} |")
    out += ["", "(startup) = before the first stage's log line, (between stages) = from one stage's `done` line to the "
            "next one's `started` line (the next stage's module import happens there), (shutdown) = after the last "
            "stage; total seconds = the child's wall time, startup and shutdown included.", "",
            f"machine load (1-min load average, mean over each run, {os.cpu_count()} cores; other work on the machine "
            "inflates the seconds): " + ", ".join(f"N={r['products']}: {r.get('load_avg_1m')}" for r in results)]
    if results:
        out += ["", "child imports: " + "; ".join(f"N={r['products']}: {r['child_imports']}" for r in results)]
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25000,50000,100000,200000")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/matcher-scale"))
    parser.add_argument("--code", type=Path, default=REPO, help="checkout whose matcher/jobs packages run")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2, help="cores per worker")
    parser.add_argument("--memory", default="3g", help="memory per worker")
    parser.add_argument("--executor-memory", default=None, help="spark.executor.memory (default: --memory)")
    parser.add_argument("--driver-memory", default="", help="spark.driver_memory, the driver JVM's heap "
                        "(default: the config's); a night that passes with a small heap needs no more")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", default="auto", choices=["exact", "ann", "auto"],
                        help="score.candidates (auto: ANN above score.exact_max_products)")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds per N before the run is killed")
    parser.add_argument("--poll", type=float, default=0.25, help="seconds between memory samples")
    parser.add_argument("--python", default=sys.executable, help="interpreter of the child and the executors")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--md", type=Path, help="write the Markdown report here")
    parser.add_argument("--keep-lakes", action="store_true", help="keep each N's lake under --workdir/runs")
    args = parser.parse_args()
    args.code = args.code.resolve()
    args.workdir = args.workdir.resolve()
    args.executor_memory = args.executor_memory or args.memory
    sizes = sorted(int(s) for s in args.sizes.split(",") if s.strip())
    for pkg in ("matcher", "jobs"):
        if not (args.code / pkg / "__init__.py").is_file():
            parser.error(f"--code {args.code} has no {pkg}/ package")

    args.workdir.mkdir(parents=True, exist_ok=True)
    catalogs = {n: ensure_catalog(args.workdir, n, args.seed) for n in sizes}

    rev = subprocess.run(["git", "-C", str(args.code), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True).stdout.strip() or "?"
    dirty = subprocess.run(["git", "-C", str(args.code), "status", "--short", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.split()
    code_rev = rev + (f", modified: {' '.join(p for p in dirty if '/' in p or '.' in p)}" if dirty else "")
    label = f"{args.code.name}-{os.getpid()}"
    env = child_env(args.code, args.python, args.executor_memory)
    sc = load_cluster_module()
    cluster_dir = args.workdir / "cluster" / label
    # The daemons inherit this process's environment: executors (and their Python workers) get PYTHONPATH=code.
    saved = dict(os.environ)
    os.environ.update({k: env[k] for k in ("PYTHONPATH", "PYSPARK_PYTHON")})
    # No spark.authenticate: the drivers measured may be other checkouts', which know no spark.auth_secret_file.
    cluster = sc.StandaloneCluster(cluster_dir, args.workers, args.cores, args.memory, authenticate=False)
    results: list[dict] = []
    meta = {"code": str(args.code), "code_rev": code_rev, "workers": args.workers, "cores": args.cores,
            "memory": args.memory, "executor_memory": args.executor_memory,
            "driver_memory": args.driver_memory or "config default", "poll": args.poll, "seed": args.seed,
            "candidates": args.candidates,
            "python": args.python, "timeout_s": args.timeout, "dropped_keys": []}
    try:
        cluster.start()
        os.environ.clear()
        os.environ.update(saved)
        print(f"cluster {cluster.master_url} up in {cluster.startup_seconds:.1f}s ({cluster_dir})", flush=True)
        probe = probe_imports(args.python, env, args.code, cluster.master_url)
        meta["probe"] = probe
        print(f"import probe: driver matcher {probe['driver'][0]}; executor matcher {probe['executor'][0]} "
              f"(executor PYTHONPATH {probe['executor'][3]})", flush=True)
        for where, paths in (("driver", probe["driver"]), ("executor", probe["executor"])):
            if not all(Path(p).resolve().is_relative_to(args.code) for p in paths[:2]):
                raise SystemExit(f"scale-bench: the {where} imports {paths[:2]}, not {args.code}: refusing to measure")
        meta["worker_pids"] = find_workers(cluster.worker_dir)
        for n in sizes:
            r = run_one(n, catalogs[n], args, cluster, env, args.workdir / "runs" / label / f"n{n}")
            meta["dropped_keys"] = r["dropped_keys"]
            results.append(r)
            if r["child_imports"] and str(args.code) not in r["child_imports"]:
                print(f"scale-bench: WARNING the child imported another checkout: {r['child_imports']}", flush=True)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        cluster.stop()
    report = render(results, meta)
    print("\n" + report, flush=True)
    if args.md:
        args.md.write_text(report + "\n")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
