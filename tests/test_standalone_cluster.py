"""A real Spark standalone cluster (Master + Worker daemons from the pyspark package) and get_spark's settings."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.spark import assigned_gpu, get_spark, spark_settings, stop_spark, task_device
from jobs.standalone_cluster import ClusterError, StandaloneCluster, port_open
from matcher.config import ConfigError, load_config
from matcher.io.lake import Lake
from tests.conftest import SMALL_DRIVER_SAMPLES

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process


def _spark(**values):
    return load_config(overrides={**SMALL_DRIVER_SAMPLES, "spark": values}).spark


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting for its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
        out.append(pid)
    return out


def _listener(port: int) -> int | None:
    import psutil

    return next((c.pid for c in psutil.net_connections("tcp") if c.laddr and c.laddr.port == port
                 and c.status == psutil.CONN_LISTEN), None)


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def test_spark_settings_come_from_config():
    master, conf = spark_settings(_spark(), submitted=False)
    assert master == "local[2]"
    assert conf["spark.ui.enabled"] == "false"
    assert conf["spark.driver.maxResultSize"] == "256m"
    assert conf["spark.driver.memory"] == "2g"
    assert "spark.eventLog.enabled" not in conf

    cfg = _spark(ui="on", event_log_dir="s3a://logs/spark-events", max_result_size="2g",
                   executor_gpus=1, conf={"spark.sql.shuffle.partitions": "64",
                                                "spark.task.resource.gpu.amount": "0.5"})
    master, conf = spark_settings(cfg, submitted=True)
    assert master is None and "spark.driver.memory" not in conf  # spark-submit's --master and memory win
    assert conf["spark.ui.enabled"] == "true"
    assert conf["spark.eventLog.enabled"] == "true" and conf["spark.eventLog.dir"] == "s3a://logs/spark-events"
    assert conf["spark.driver.maxResultSize"] == "2g"
    assert conf["spark.executor.resource.gpu.amount"] == "1"
    assert conf["spark.sql.shuffle.partitions"] == "64"  # spark.conf is applied last
    assert conf["spark.task.resource.gpu.amount"] == "0.5"

    with pytest.raises(ConfigError, match="spark.ui must be one of auto, on or off"):
        _spark(ui="yes")
    with pytest.raises(ConfigError, match="spark.conf"):
        _spark(conf={"spark.ui.port": 4040})
    with pytest.raises(ConfigError, match="spark.conf"):
        _spark(conf={"executor.memory": "4g"})


def test_a_cluster_night_has_the_ui_and_an_event_log_in_the_lake_by_default(tmp_path):
    local_lake = Lake(f"file://{tmp_path}/lake", load_config().storage)
    # Local mode: neither, unless asked.
    _, conf = spark_settings(_spark(), submitted=False, lake=local_lake)
    assert conf["spark.ui.enabled"] == "false" and "spark.eventLog.dir" not in conf
    # A cluster master, or spark-submit: the UI, and event logs in the lake's _spark_events/ for the history server.
    for cfg, submitted in ((_spark(master="spark://10.0.0.5:7077"), False), (_spark(), True)):
        _, conf = spark_settings(cfg, submitted=submitted, lake=local_lake)
        assert conf["spark.ui.enabled"] == "true"
        assert conf["spark.eventLog.dir"] == f"file://{tmp_path}/lake/_spark_events"
    # An S3 lake (s3a:// would need hadoop-aws): a private folder on the driver.
    s3_lake = Lake("s3://bucket/lake", load_config(overrides={"storage": {"s3_endpoint": "http://127.0.0.1:1"}}).storage)
    _, conf = spark_settings(_spark(master="spark://10.0.0.5:7077"), submitted=False, lake=s3_lake)
    folder = Path(conf["spark.eventLog.dir"].removeprefix("file://"))
    assert folder.is_dir() and (folder.stat().st_mode & 0o077) == 0 and folder.stat().st_uid == os.getuid()
    # Off when asked, in cluster mode too.
    _, conf = spark_settings(_spark(master="spark://10.0.0.5:7077", ui="off", event_log_dir=""), submitted=False,
                             lake=local_lake)
    assert conf["spark.ui.enabled"] == "false" and "spark.eventLog.dir" not in conf


def test_get_spark_rebuilds_the_session_when_its_settings_change(tmp_path):
    one = get_spark(_spark(master="local[1]"))
    assert one.sparkContext.master == "local[1]"
    assert get_spark(_spark(master="local[1]")) is one  # equal config: the same session

    two = get_spark(_spark(master="local[2]"))
    assert two is not one and two.sparkContext.master == "local[2]"
    assert one.sparkContext._jsc is None  # the first one was stopped
    assert two.sparkContext.parallelize(range(10), 2).sum() == 45

    three = get_spark(_spark(master="local[2]", conf={"spark.sql.shuffle.partitions": "3"}))
    assert three is not two and three.conf.get("spark.sql.shuffle.partitions") == "3"
    assert three.sparkContext.uiWebUrl is None

    events = tmp_path / "spark-events"  # get_spark makes a missing local folder: Spark would refuse to start
    four = get_spark(_spark(master="local[2]", ui="on", event_log_dir=str(events)))
    assert four.sparkContext.uiWebUrl is not None
    assert four.sparkContext.parallelize(range(3)).count() == 3
    stop_spark()
    assert ["local-" in p.name for p in events.iterdir()] == [True]  # Spark 4: eventlog_v2_local-.../
    # Leave the default session for the tests that follow.
    assert get_spark(load_config().spark).conf.get("spark.sql.adaptive.enabled") == "true"


def test_standalone_cluster_runs_tasks_in_executors_and_stops_clean(tmp_path, monkeypatch):
    cluster = StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=2, memory_per_worker="2g")
    # The daemons get a python that does not exist: the executors must run the one the driver names.
    monkeypatch.setenv("PYSPARK_PYTHON", "/nonexistent/python3")
    cluster.start()
    try:
        monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)
        assert cluster.master_url.startswith("spark://127.0.0.1:")
        assert cluster.master_log.is_file() and len(cluster.worker_logs) == 1 and cluster.worker_logs[0].is_file()
        assert str(cluster.master_log).startswith(str(tmp_path))
        state = cluster.master_state()
        assert [(w["state"], w["cores"], w["memory"]) for w in state["workers"]] == [("ALIVE", 2, 2048)]
        worker_port = state["workers"][0]["port"]
        daemons = cluster.pids()
        assert len(daemons) == 2 and all(_running(p) for p in daemons.values())

        spark = get_spark(_spark(**cluster.spark_overrides(), max_result_size="1m",
                                   conf={"spark.executor.memory": "1g"}))
        sc = spark.sparkContext
        assert sc.master == cluster.master_url

        def probe(_):
            yield os.getpid(), sys.executable

        ran = sc.parallelize(range(4), 4).mapPartitions(probe).collect()
        workers = {pid for pid, _ in ran}
        assert os.getpid() not in workers
        assert {exe for _, exe in ran} == {sys.executable}
        # Each python worker descends from an executor JVM, itself launched by the Worker daemon.
        executor_jvms = set()
        for pid in workers:
            jvms = [p for p in _ancestors(pid) if "CoarseGrainedExecutorBackend" in _cmdline(p)]
            assert jvms, f"python worker {pid} is not under an executor JVM"
            executor_jvms.add(jvms[0])
            assert daemons[next(n for n in daemons if "Worker" in n)] in _ancestors(jvms[0])
        assert len(executor_jvms) == 1
        assert len(sc._jsc.sc().statusTracker().getExecutorInfos()) == 2  # the driver and one executor
        apps = cluster.master_state()["activeapps"]
        assert [(a["name"], a["state"], a["cores"]) for a in apps] == [("matcher", "RUNNING", 2)]

        # spark.driver.maxResultSize: ~4 MB collected against a 1 MB cap fails the job, not the session.
        with pytest.raises(Exception, match="maxResultSize"):
            sc.parallelize(range(4), 4).map(lambda _: b"x" * 1_000_000).collect()
        assert sc.parallelize(range(100), 4).sum() == 4950
    finally:
        stop_spark()
        cluster.stop()

    assert not any(_running(p) for p in [*daemons.values(), *executor_jvms, *workers])
    assert cluster.pids() == {}
    gone = {*daemons.values(), *executor_jvms, *workers}
    for port in [*cluster.ports, worker_port]:
        # Closed, or reused since by a process of something else on this machine (ports are ephemeral).
        assert not port_open(port) or _listener(port) not in gone, f"port {port} still open"


def test_each_concurrent_task_gets_its_own_gpu_and_a_gpu_without_cuda_fails_clearly(tmp_path):
    # The worker's two GPUs come from a discovery script that names addresses 0 and 1: on this machine they are
    # announced, not present, which also injects the fault of a GPU task on a torch without CUDA.
    script = tmp_path / "two-gpus.sh"
    script.write_text('#!/bin/sh\necho \'{"name": "gpu", "addresses": ["0", "1"]}\'\n')
    script.chmod(0o755)
    with StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=2, memory_per_worker="1g",
                           worker_gpus=2, gpu_discovery_script=script) as cluster:
        try:
            spark = get_spark(_spark(**cluster.spark_overrides(), executor_gpus=2, task_gpus=1.0,
                                       conf={"spark.executor.memory": "512m"}))

            def probe(_):
                import time

                import torch

                start = time.time()
                try:
                    device = task_device("auto")
                except RuntimeError as exc:
                    device = str(exc)
                cpu = task_device("cpu")
                time.sleep(1.5)  # long enough that the two slots' tasks overlap
                yield assigned_gpu(), device, cpu, torch.cuda.is_available(), start, time.time()

            ran = spark.sparkContext.parallelize(range(4), 4).mapPartitions(probe).collect()
        finally:
            stop_spark()
    assert sorted(gpu for gpu, *_ in ran) == ["0", "0", "1", "1"]
    for gpu, device, cpu, cuda, _, _ in ran:
        assert cpu == "cpu"
        if cuda:
            assert device == f"cuda:{gpu}"
        else:
            assert device.startswith(f"Spark gave this task GPU {gpu}, but torch") and "cannot use CUDA" in device
    overlapping = [(a[0], b[0]) for i, a in enumerate(ran) for b in ran[i + 1:] if a[4] < b[5] and b[4] < a[5]]
    assert overlapping and all(x != y for x, y in overlapping)
    assert assigned_gpu() is None and task_device("auto") == "auto"  # the driver is no task


def _master_answers(spark, port: int, secret: str | None) -> bool:
    """Whether the master at 127.0.0.1:port lets an RPC client with this secret (None: no authentication) look up
    its endpoint, as a driver does before it registers; a refusal fails within the 5 s lookup timeout."""
    jvm = spark.sparkContext._jvm
    conf = jvm.org.apache.spark.SparkConf(False)  # only what is set here, nothing from this JVM's own settings
    conf.set("spark.rpc.lookupTimeout", "5s")
    if secret is not None:
        conf.set("spark.authenticate", "true")
        conf.set("spark.authenticate.secret", secret)
    config_entries = getattr(getattr(jvm.org.apache.spark.internal.config, "package$"), "MODULE$")
    security = jvm.org.apache.spark.SecurityManager(conf, jvm.scala.Option.empty(), config_entries.AUTH_SECRET_FILE())
    client = jvm.org.apache.spark.rpc.RpcEnv.create("probe", "127.0.0.1", 0, conf, security, True)
    try:
        client.setupEndpointRef(jvm.org.apache.spark.rpc.RpcAddress("127.0.0.1", port), "Master")
        return True
    except Exception as exc:
        if "awaitResult" not in str(exc):  # anything but the refused lookup is a fault of the probe itself
            raise
        return False
    finally:
        client.shutdown()


def test_the_master_refuses_a_driver_without_the_clusters_secret(tmp_path):
    with StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=1, memory_per_worker="1g") as cluster:
        secret_file = cluster.auth_secret_file
        assert secret_file is not None and (secret_file.stat().st_mode & 0o777) == 0o600
        assert (cluster.conf_dir.stat().st_mode & 0o777) == 0o700
        secret = secret_file.read_text().strip()
        assert len(secret) == 64
        # In no daemon's command line (ps shows those to every user).
        assert not [name for name, pid in cluster.pids().items() if secret in _cmdline(pid)]

        spark = get_spark(_spark())  # a local session: only its JVM is used, to speak Spark's RPC
        assert not _master_answers(spark, cluster.port, None)
        assert not _master_answers(spark, cluster.port, "0" * 64)
        assert _master_answers(spark, cluster.port, secret)
        assert cluster.master_state()["activeapps"] == []
    # A second start makes a new secret.
    with StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=1, memory_per_worker="1g") as again:
        assert again.auth_secret_file.read_text().strip() != secret


def test_a_driver_names_the_clusters_secret_by_file(tmp_path):
    secret_file = tmp_path / "spark-secret"
    secret_file.write_text("s3cr3t-value\n")
    _, conf = spark_settings(_spark(master="spark://spark-master:7077",
                                      auth_secret_file=str(secret_file)), submitted=False)
    assert conf["spark.authenticate"] == "true" and conf["spark.authenticate.secret"] == "s3cr3t-value"
    _, conf = spark_settings(_spark(), submitted=False)
    assert "spark.authenticate" not in conf and "spark.authenticate.secret" not in conf
    with pytest.raises(ConfigError, match="spark.auth_secret_file .*missing"):
        spark_settings(_spark(auth_secret_file=str(tmp_path / "missing")))
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        spark_settings(_spark(auth_secret_file=str(tmp_path / "empty")))
    with pytest.raises(ConfigError, match="must not hold spark.authenticate.secret"):
        _spark(conf={"spark.authenticate.secret": "inline"})


def test_the_drivers_jvm_log_is_private(tmp_path):
    # A fresh process (the JVM starts once per process), its temp folder in tmp_path so its files can be found.
    code = ("import logging; logging.basicConfig(level=logging.INFO)\n"
            "from jobs.spark import get_spark, stop_spark\nfrom matcher.config import load_config\n"
            "get_spark(load_config(overrides={'spark': {'master': 'local[1]'}}).spark).range(3).count()\n"
            "stop_spark()\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parent.parent, timeout=300,
                         env=dict(os.environ, TMPDIR=str(tmp_path)), capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    folders = list(tmp_path.glob("matcher-spark-*"))
    assert len(folders) == 1 and folders[0].is_dir()  # mkdtemp's random name, not a pid anyone can guess
    log = folders[0] / "driver.log"
    assert f"Spark driver log: {log}" in run.stderr
    assert folders[0].stat().st_mode & 0o777 == 0o700 and log.stat().st_mode & 0o777 == 0o600
    banner = "Using Spark's default log4j profile"
    assert banner in log.read_text() and banner not in run.stderr  # the JVM's lines go there, not to stderr


def test_a_gpu_worker_without_its_discovery_script_is_a_clear_error(tmp_path):
    cluster = StandaloneCluster(tmp_path / "cluster", worker_gpus=1, gpu_discovery_script=tmp_path / "none.sh")
    with pytest.raises(ClusterError, match="none.sh is missing or not executable"):
        cluster.start()


def test_cli_starts_and_stops_a_cluster(tmp_path):
    work_dir = tmp_path / "cli-cluster"
    cmd = [sys.executable, "-m", "jobs.standalone_cluster"]
    root = Path(__file__).resolve().parent.parent
    started = subprocess.run([*cmd, "start", "--work-dir", str(work_dir), "--workers", "1", "--cores", "1",
                              "--memory", "1g"], cwd=root, capture_output=True, text=True, timeout=300)
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.strip()
        assert url.startswith("spark://127.0.0.1:")
        cluster = StandaloneCluster(work_dir)  # another process: ports and pids come from work_dir
        assert cluster.master_url == url
        assert [w["state"] for w in cluster.master_state()["workers"]] == ["ALIVE"]
        again = subprocess.run([*cmd, "start", "--work-dir", str(work_dir)], cwd=root, capture_output=True,
                               text=True, timeout=300)
        assert again.returncode == 1 and "already running" in again.stderr
        pids = cluster.pids()
    finally:
        stopped = subprocess.run([*cmd, "stop", "--work-dir", str(work_dir)], cwd=root, capture_output=True,
                                 text=True, timeout=300)
    assert stopped.returncode == 0, stopped.stderr
    assert pids and not any(_running(p) for p in pids.values())
    assert not any(port_open(p) for p in cluster.ports)


def _locked(*names: str) -> list[str]:
    """name==version of packages as requirements.lock pins them."""
    from matcher.config import REPO_ROOT

    pins = dict(line.split(" ")[0].split("==") for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line and not line.startswith((" ", "#")))
    return [f"{n}=={pins[n]}" for n in names]


def _assert_the_wheel_carries_the_package_data(wheel: Path, repo: Path) -> None:
    """The README's promise: the wheel carries the schemas, the DAG and the defaults (a machine without this
    repository reads them from the package)."""
    import zipfile

    want = {"matcher/defaults.toml",
            *(f"matcher/profiles/{p.name}" for p in (repo / "matcher/profiles").glob("*.toml")),
            *(f"matcher/schemas/{p.name}" for p in (repo / "schemas").glob("*.json")),
            *(f"matcher/dags/{p.name}" for p in (repo / "dags").glob("*.py"))}
    assert {"matcher/schemas/tables.json", "matcher/dags/product_matching_nightly.py"} <= want
    missing = want - set(zipfile.ZipFile(wheel).namelist())
    assert not missing, f"{wheel.name} lacks {sorted(missing)}"


def test_executors_run_the_packed_environment_they_unpack_not_the_drivers_venv(tmp_path, monkeypatch):
    from matcher.config import REPO_ROOT

    # A small packed environment (what `make pack-env` makes of the whole lock): pandas and Arrow for the pandas
    # UDFs, and matcher from its wheel, not from this checkout.
    env, wheels = tmp_path / "env", tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(REPO_ROOT)], check=True)
    _assert_the_wheel_carries_the_package_data(next(wheels.glob("matcher-*.whl")), REPO_ROOT)
    packages = _locked("pandas", "numpy", "pyarrow", "python-dateutil", "six", "pytz", "tzdata")
    subprocess.run([str(env / "bin/pip"), "install", "--quiet", "--no-deps", *packages,
                    *map(str, wheels.glob("matcher-*.whl"))], check=True)
    archive = tmp_path / "matcher-env.tar.gz"
    subprocess.run([str(Path(sys.executable).with_name("venv-pack")), "--quiet", "-p", str(env), "-o", str(archive)],
                   check=True)

    cluster = StandaloneCluster(tmp_path / "cluster", workers=1, cores_per_worker=2, memory_per_worker="1g")
    monkeypatch.setenv("PYSPARK_PYTHON", "/nonexistent/python3")  # the daemons' own python: never used
    cluster.start()
    try:
        spark = get_spark(_spark(**cluster.spark_overrides(), python_env=str(archive),
                                 conf={"spark.executor.memory": "512m"}))

        def probe(_):
            import matcher

            yield sys.prefix, os.path.realpath(matcher.__file__), os.getcwd()

        seen = set(spark.sparkContext.parallelize(range(2), 2).mapPartitions(probe).collect())
        for prefix, matcher_file, cwd in seen:
            assert prefix == os.path.join(cwd, "matcher_env"), (prefix, cwd)  # the unpacked archive's interpreter
            assert matcher_file.startswith(os.path.realpath(cwd)) and "site-packages" in matcher_file  # its wheel
            assert not matcher_file.startswith(str(REPO_ROOT)) and not prefix.startswith(sys.prefix)

        import pandas as pd

        def doubled(batches):
            for frame in batches:
                yield pd.DataFrame({"x": frame["id"] * 2})

        assert spark.range(100).mapInPandas(doubled, "x long").agg({"x": "sum"}).first()[0] == 9900
    finally:
        stop_spark()
        cluster.stop()


def test_a_packed_environment_that_is_missing_or_not_an_archive_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist: build it with `make pack-env`"):
        spark_settings(_spark(master="spark://127.0.0.1:7077", python_env=str(tmp_path / "env.tar.gz")))
    with pytest.raises(ConfigError, match="is a .tar.gz"):
        spark_settings(_spark(master="spark://127.0.0.1:7077", python_env=str(tmp_path)))
    assert "spark.archives" not in spark_settings(_spark(master="local[2]", python_env="ignored.tar.gz"))[1]
    shared = "https://artifacts.example/matcher-env.tar.gz"  # executors fetch it themselves: passed as it is
    assert spark_settings(_spark(master="spark://127.0.0.1:7077", python_env=shared))[1]["spark.archives"] == \
        shared + "#matcher_env"
