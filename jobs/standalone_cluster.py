"""A real Spark standalone cluster (one Master, N Workers) on this machine, from the pyspark package alone.

    with StandaloneCluster(tmp_dir, workers=1, cores_per_worker=2, memory_per_worker="2g") as cluster:
        cfg = load_config(overrides={"spark": cluster.spark_overrides()})  # master URL and secret file
        spark = get_spark(cfg.spark)

Or from a shell, for operators and the bench:

    python -m jobs.standalone_cluster start --work-dir /tmp/spark-cluster --workers 2   # prints the master URL
    python -m jobs.standalone_cluster stop --work-dir /tmp/spark-cluster

The daemons are started with the package's own sbin/spark-daemon.sh; logs, pid files, the workers' application
folders and Spark's scratch space all live under work_dir, so nothing is written into the virtualenv. Everything
binds to 127.0.0.1, and the master and workers require Spark's RPC authentication (spark.authenticate) with a
secret made for each start, kept in work_dir/conf/auth-secret (mode 0600): anyone else on the machine who could
reach the master's port could otherwise run code as this user. The driver picks the executors' python (PYSPARK_PYTHON
in the driver's environment, which
jobs.spark.get_spark sets to this interpreter), so executors run the venv's python with torch and pyarrow."""
from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from jobs.processes import descendants, is_running, proc_cmdline, proc_start_time, terminate

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
IDENT = "matcher"  # SPARK_IDENT_STRING: names the pid and log files
STATE_FILE = "cluster.json"
AUTH_SECRET_FILE = "auth-secret"  # noqa: S105 (a file name) in conf_dir: the secret the master, workers and drivers share
GPU_DISCOVERY_SCRIPT = Path(__file__).resolve().parent.parent / "docker" / "gpu-discovery.sh"  # nvidia-smi's indices


class ClusterError(RuntimeError):
    pass


def spark_home() -> Path:
    """The pyspark package folder: it ships bin/, sbin/ and jars/ like a Spark distribution."""
    import pyspark

    home = Path(pyspark.__file__).resolve().parent
    if not (home / "sbin" / "spark-daemon.sh").is_file():
        raise ClusterError(f"{home}/sbin/spark-daemon.sh not found: this pyspark install has no daemon scripts")
    return home


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


class StandaloneCluster:
    def __init__(self, work_dir: Path | str, workers: int = 1, cores_per_worker: int = 2,
                 memory_per_worker: str = "3g", startup_timeout: float = 120.0, worker_gpus: int = 0,
                 gpu_discovery_script: Path | str = GPU_DISCOVERY_SCRIPT, authenticate: bool = True):
        """authenticate: the daemons require spark.authenticate with a fresh random secret (spark_overrides() names
        its file for the driver's config); False only for drivers that cannot be given one.
        worker_gpus > 0: each worker offers that many GPUs to Spark's scheduler, their addresses printed by
        gpu_discovery_script (Spark's discovery-script JSON); executors then get them with
        spark.executor.resource.gpu.amount and each task its own with spark.task.resource.gpu.amount."""
        if workers < 1:
            raise ValueError("workers must be >= 1")
        if worker_gpus < 0:
            raise ValueError("worker_gpus must be >= 0")
        self.work_dir = Path(work_dir).resolve()
        self.workers = workers
        self.cores_per_worker = cores_per_worker
        self.memory_per_worker = memory_per_worker
        self.startup_timeout = startup_timeout
        self.worker_gpus = worker_gpus
        self.gpu_discovery_script = Path(gpu_discovery_script).resolve()
        self.authenticate = authenticate
        self.log_dir = self.work_dir / "logs"
        self.pid_dir = self.work_dir / "pids"
        self.worker_dir = self.work_dir / "work"      # executors' stdout/stderr, per application
        self.local_dir = self.work_dir / "local"      # shuffle and scratch files
        self.conf_dir = self.work_dir / "conf"        # ours (0700): spark-defaults.conf with the auth settings only
        self.port: int | None = None
        self.webui_port: int | None = None
        self.rest_port: int | None = None
        self.worker_webui_ports: list[int] = []
        self.startup_seconds: float | None = None  # set by start(): launch to every worker ALIVE
        self._load_state()

    # -- what callers use -------------------------------------------------------------------------------------

    @property
    def master_url(self) -> str:
        if self.port is None:
            raise ClusterError("the cluster is not started")
        return f"spark://127.0.0.1:{self.port}"

    @property
    def webui_url(self) -> str:
        if self.webui_port is None:
            raise ClusterError("the cluster is not started")
        return f"http://127.0.0.1:{self.webui_port}"

    @property
    def auth_secret_file(self) -> Path | None:
        """The file holding the cluster's Spark secret (None when started without authentication)."""
        return self.conf_dir / AUTH_SECRET_FILE if self.authenticate else None

    def spark_overrides(self) -> dict[str, str]:
        """The [spark] settings a driver needs to use this cluster: its master URL and its secret's file."""
        return {"master": self.master_url, "auth_secret_file": str(self.auth_secret_file or "")}

    @property
    def master_log(self) -> Path:
        return self._log_path(MASTER_CLASS, 1)

    @property
    def worker_logs(self) -> list[Path]:
        return [self._log_path(WORKER_CLASS, i) for i in range(1, self.workers + 1)]

    @property
    def ports(self) -> list[int]:
        """The ports this class chose for the daemons: master RPC, master UI, master REST, worker UIs (the workers'
        RPC ports are random: see master_state()["workers"])."""
        return [p for p in [self.port, self.webui_port, self.rest_port, *self.worker_webui_ports] if p is not None]

    def master_state(self) -> dict:
        """The master's own JSON status (workers, their state, cores, memory, applications)."""
        with urllib.request.urlopen(f"{self.webui_url}/json/", timeout=5) as resp:  # noqa: S310 (our http URL)
            return json.load(resp)

    def pids(self) -> dict[str, int]:
        """Daemon name (pid file stem) -> pid, for the daemons whose pid files exist."""
        out = {}
        for f in sorted(self.pid_dir.glob(f"spark-{IDENT}-*.pid")):
            try:
                out[f.stem] = int(f.read_text().strip())
            except (OSError, ValueError):
                pass
        return out

    def start(self) -> "StandaloneCluster":
        running = {name: pid for name, pid in self.pids().items()
                   if is_running(pid, None) and _parse_pid_name(name)[0] in proc_cmdline(pid)}
        if running:
            raise ClusterError(f"a cluster is already running from {self.work_dir} (pids {running}); stop it first")
        for d in (self.log_dir, self.pid_dir, self.worker_dir, self.local_dir, self.conf_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.conf_dir.chmod(0o700)
        self._write_auth_conf()
        home = spark_home()
        self.port, self.webui_port, self.rest_port = free_port(), free_port(), free_port()
        self.worker_webui_ports = [free_port() for _ in range(self.workers)]
        self._save_state()
        env = self._env(home)
        # The master's REST submission server listens on 6066 unless told otherwise: give it a free port too.
        master_env = dict(env, SPARK_MASTER_OPTS=f"{env.get('SPARK_MASTER_OPTS', '')} "
                                                 f"-Dspark.master.rest.port={self.rest_port}".strip())
        worker_env = env
        if self.worker_gpus:
            if not os.access(self.gpu_discovery_script, os.X_OK):
                raise ClusterError(f"GPU discovery script {self.gpu_discovery_script} is missing or not executable")
            worker_env = dict(env, SPARK_WORKER_OPTS=(
                f"{env.get('SPARK_WORKER_OPTS', '')} -Dspark.worker.resource.gpu.amount={self.worker_gpus} "
                f"-Dspark.worker.resource.gpu.discoveryScript={self.gpu_discovery_script}").strip())
        started = time.monotonic()
        try:
            # spark-daemon.sh sleeps ~2.5 s after each launch: start the workers as soon as the master's RPC port
            # answers (a worker that finds no master retries only after 5-15 s), and run their scripts side by side.
            master = self._daemon(home, master_env, "start", MASTER_CLASS, 1, "--host", "127.0.0.1",
                                  "--port", str(self.port), "--webui-port", str(self.webui_port), wait=False)
            self._wait(lambda: port_open(self.port), started, "the master's port to open", master)
            procs = [master] + [
                self._daemon(home, worker_env, "start", WORKER_CLASS, i,
                             "--host", "127.0.0.1", "--port", "0", "--webui-port", str(ui),
                             "--cores", str(self.cores_per_worker), "--memory", self.memory_per_worker,
                             "--work-dir", str(self.worker_dir), self.master_url, wait=False)
                for i, ui in enumerate(self.worker_webui_ports, start=1)]
            for p in procs:
                self._finish(p)
            self._wait(lambda: self._alive_workers() >= self.workers, started,
                       f"{self.workers} worker(s) to register ALIVE")
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Workers first (each takes its executors down), then the master; whatever outlives spark-daemon.sh stop
        is killed by the pid recorded in its pid file, checked against its start time so a reused pid is spared."""
        pids = self.pids()
        if not pids:
            return
        home = spark_home()
        env = self._env(home)
        order = sorted(pids, key=lambda name: MASTER_CLASS in name)  # workers, then the master
        for name in order:
            pid = pids[name]
            cls, instance = _parse_pid_name(name)
            started = proc_start_time(pid)
            if started is None or cls not in proc_cmdline(pid):
                (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)
                continue
            family = [(p, proc_start_time(p)) for p in descendants(pid)]  # executors and their python workers
            try:
                self._daemon(home, env, "stop", cls, instance, timeout=30)
            except (ClusterError, subprocess.TimeoutExpired):
                pass
            terminate([(pid, started)] + family, grace=15.0)
            (self.pid_dir / f"{name}.pid").unlink(missing_ok=True)

    def __enter__(self) -> "StandaloneCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- internals --------------------------------------------------------------------------------------------

    def _env(self, home: Path) -> dict[str, str]:
        env = dict(os.environ)
        # spark-daemon.sh rsyncs the install from $SPARK_MASTER when that is set, and SPARK_NO_DAEMONIZE would run
        # the daemon in the foreground; neither belongs here. SPARK_CONF_DIR is ours (empty) for the same reason.
        for key in ("SPARK_MASTER", "SPARK_NO_DAEMONIZE", "SPARK_ENV_LOADED", "PYSPARK_PYTHONPATH_SET"):
            env.pop(key, None)
        env.update({
            "SPARK_HOME": str(home),
            "SPARK_CONF_DIR": str(self.conf_dir),
            "SPARK_LOG_DIR": str(self.log_dir),
            "SPARK_PID_DIR": str(self.pid_dir),
            "SPARK_WORKER_DIR": str(self.worker_dir),
            "SPARK_LOCAL_DIRS": str(self.local_dir),
            "SPARK_LOCAL_IP": "127.0.0.1",
            "SPARK_IDENT_STRING": IDENT,
        })
        # No PYSPARK_PYTHON here: the driver names the executors' python with each Python function it ships.
        return env

    def _daemon(self, home: Path, env: dict[str, str], action: str, cls: str, instance: int, *args: str,
                wait: bool = True, timeout: float = 60.0):
        # Run with bash: that needs no executable bit on the script, whatever the installer kept.
        cmd = ["bash", str(home / "sbin" / "spark-daemon.sh"), action, cls, str(instance), *args]
        proc = subprocess.Popen(cmd, env=env,  # noqa: S603 (pyspark's own script, no shell) cwd=self.work_dir, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if not wait:
            return proc
        return self._finish(proc, timeout)

    def _finish(self, proc: subprocess.Popen, timeout: float = 60.0) -> str:
        out, _ = proc.communicate(timeout=timeout)
        if proc.returncode != 0 or "failed to launch" in out:
            raise ClusterError(f"{' '.join(proc.args[1:4])} failed (exit {proc.returncode}):\n{out}"
                               f"{self._log_report()}")
        return out

    def _alive_workers(self) -> int:
        state = self.master_state()
        if state.get("status") != "ALIVE":
            return 0
        return sum(w.get("state") == "ALIVE" for w in state.get("workers", []))

    def _wait(self, ready, started: float, what: str, script: subprocess.Popen | None = None) -> None:
        last_error = None
        while True:
            if script is not None and script.poll() is not None:
                self._finish(script)  # raises if the script failed
                script = None
            dead = [name for name, pid in self.pids().items() if not is_running(pid, None)]
            if dead:
                raise ClusterError(f"Spark daemon(s) {dead} exited while waiting for {what}.{self._log_report()}")
            try:
                if ready():
                    return
            except (urllib.error.URLError, OSError, ValueError) as exc:
                last_error = exc
            if time.monotonic() - started > self.startup_timeout:
                raise ClusterError(f"timed out after {self.startup_timeout:.0f}s waiting for {what} "
                                   f"(master UI {self.webui_url}/json/, last error: {last_error}).{self._log_report()}")
            time.sleep(0.2)

    def _write_auth_conf(self) -> None:
        """spark-defaults.conf in our SPARK_CONF_DIR, read by the master and each worker at start (the secret is in
        no command line, so `ps` does not show it); the workers hand it to their executors in the environment."""
        defaults = self.conf_dir / "spark-defaults.conf"
        secret_file = self.conf_dir / AUTH_SECRET_FILE
        if not self.authenticate:
            defaults.unlink(missing_ok=True)
            secret_file.unlink(missing_ok=True)
            return
        secret = secrets.token_hex(32)
        _write_private(secret_file, secret + "\n")
        _write_private(defaults, f"spark.authenticate true\nspark.authenticate.secret {secret}\n")

    def _log_path(self, cls: str, instance: int) -> Path:
        # spark-daemon.sh names it spark-$SPARK_IDENT_STRING-$command-$instance-$HOSTNAME.out
        found = sorted(self.log_dir.glob(f"spark-{IDENT}-{cls}-{instance}-*.out"))
        return found[0] if found else self.log_dir / f"spark-{IDENT}-{cls}-{instance}-{socket.gethostname()}.out"

    def _log_report(self) -> str:
        lines = []
        for log in [self.master_log, *self.worker_logs]:
            lines.append(f"\n  log: {log}")
            if log.is_file():
                tail = log.read_text(errors="replace").splitlines()[-8:]
                lines += [f"\n    {line[:300]}" for line in tail]
        return "".join(lines)

    def _save_state(self) -> None:
        state = {"port": self.port, "webui_port": self.webui_port, "rest_port": self.rest_port,
                 "worker_webui_ports": self.worker_webui_ports,
                 "workers": self.workers, "cores_per_worker": self.cores_per_worker,
                 "memory_per_worker": self.memory_per_worker, "authenticate": self.authenticate}
        (self.work_dir / STATE_FILE).write_text(json.dumps(state, indent=2))

    def _load_state(self) -> None:
        """A cluster started by another process (the CLI) from the same work_dir: its ports and worker count."""
        path = self.work_dir / STATE_FILE
        if not path.is_file() or not self.pids():
            return
        state = json.loads(path.read_text())
        self.port, self.webui_port, self.rest_port = state["port"], state["webui_port"], state.get("rest_port")
        self.worker_webui_ports = state["worker_webui_ports"]
        self.workers = state["workers"]
        self.authenticate = state.get("authenticate", False)


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read, whatever mode an earlier file there had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


def _parse_pid_name(name: str) -> tuple[str, int]:
    m = re.fullmatch(rf"spark-{IDENT}-(.+)-(\d+)", name)
    if not m:
        raise ClusterError(f"unexpected pid file name {name}")
    return m.group(1), int(m.group(2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.standalone_cluster",
                                     description="A Spark standalone cluster on 127.0.0.1 from the pyspark package.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a master and workers; prints the master URL")
    start.add_argument("--work-dir", required=True, type=Path)
    start.add_argument("--workers", type=int, default=1)
    start.add_argument("--cores", type=int, default=2, help="cores per worker")
    start.add_argument("--memory", default="3g", help="memory per worker, e.g. 3g")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the workers")
    start.add_argument("--gpus", type=int, default=0, help="GPUs each worker offers to Spark's scheduler")
    start.add_argument("--gpu-discovery-script", type=Path, default=GPU_DISCOVERY_SCRIPT,
                       help="prints the GPUs' addresses as Spark's discovery JSON (default: docker/gpu-discovery.sh)")
    start.add_argument("--no-auth", action="store_true",
                       help="start without spark.authenticate (any local user could then run code on the cluster)")
    stop = sub.add_parser("stop", help="stop the cluster started from --work-dir")
    stop.add_argument("--work-dir", required=True, type=Path)
    status = sub.add_parser("status", help="print the master's JSON status")
    status.add_argument("--work-dir", required=True, type=Path)
    args = parser.parse_args(argv)
    try:
        if args.command == "start":
            cluster = StandaloneCluster(args.work_dir, args.workers, args.cores, args.memory, args.timeout,
                                        args.gpus, args.gpu_discovery_script, authenticate=not args.no_auth).start()
            print(cluster.master_url)
            print(f"started in {cluster.startup_seconds:.1f}s; web UI {cluster.webui_url}; logs in {cluster.log_dir}",
                  file=sys.stderr)
            if cluster.auth_secret_file:
                print(f"drivers need spark.auth_secret_file = \"{cluster.auth_secret_file}\"", file=sys.stderr)
        elif args.command == "stop":
            StandaloneCluster(args.work_dir).stop()
        else:
            print(json.dumps(StandaloneCluster(args.work_dir).master_state(), indent=2))
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
