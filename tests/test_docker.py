"""The deployment in docker/: what the image is built from (.dockerignore applied as Docker applies it), the
environment each compose service really gets once YAML merges are resolved, and Spark's secret in the cluster."""
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from jobs.standalone_cluster import free_port, port_open
from matcher.config import load_config, undated_catalog_warning

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"

# What `pip install -e .` and the services need from the context.
NEEDED = ["requirements.txt", "requirements.lock", "setup.cfg", "pyproject.toml", "README.md", "matcher/defaults.toml",
          "matcher/config.py",
          "jobs/pipeline.py", "dags/product_matching_nightly.py", "schemas/clean_products.json",
          "docker/gpu-discovery.sh", "docker/spark-daemon.sh", "docker/matcher.example.toml"]
# Files a deployment or a developer has beside the code, none of which may reach the image.
SECRETS = ["docker/s3.json", "docker/matcher.toml", "docker/.env", ".env", ".env.production", "docker/spark-secret",
           "docker/seaweedfs-security.toml", ".matcher/config.toml", ".matcher/seaweedfs/s3.json",
           "bench/work/.matcher/lake/runs/x.json", "prod.toml", "configs/prod.toml", "certs/server.key",
           ".venv/bin/python", ".venv/lib/python3.11/site-packages/x.py", "venv/bin/activate", ".git/config",
           "matcher/__pycache__/config.cpython-311.pyc", "build/lib/matcher/config.py", "dist/matcher.whl",
           "matcher.egg-info/PKG-INFO", "spark-warehouse/t/part-0.parquet", "derby.log"]


# -- .dockerignore, matched as Docker's builder does (github.com/moby/patternmatcher) ---------------------------------

def _pattern_regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**", i):
            i += 2
            if pattern.startswith("/", i):  # **/ is **
                i += 1
            out += ".*" if i == len(pattern) else "(.*/)?"
            continue
        out += "[^/]*" if ch == "*" else "[^/]" if ch == "?" else re.escape(ch)
        i += 1
    return re.compile(f"^{out}$")


def _ignore_rules(dockerignore: Path) -> list[tuple[bool, re.Pattern, str]]:
    rules = []
    for line in dockerignore.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip()).lstrip("/")
        rules.append((negated, _pattern_regex(pattern), pattern))
    return rules


def _excluded(path: str, rules) -> bool:
    """The last rule that matches the path, or one of its parent folders, decides."""
    parts = path.split("/")
    excluded = False
    for negated, regex, _ in rules:
        if regex.match(path) or any(regex.match("/".join(parts[:i])) for i in range(1, len(parts))):
            excluded = not negated
    return excluded


def build_context(root: Path) -> set[str]:
    """The files Docker sends for a build of `root` (relative paths), .dockerignore applied."""
    rules = _ignore_rules(root / ".dockerignore")
    files = set()
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        prefix = "" if rel == "." else rel + "/"
        # An excluded folder is not walked unless an exception could take something inside it back in.
        dirs[:] = [d for d in dirs if not _excluded(prefix + d, rules)
                   or any(neg and pat.startswith(prefix + d + "/") for neg, _, pat in rules)]
        files |= {prefix + n for n in names if not _excluded(prefix + n, rules)}
    return files


def test_the_pattern_matcher_reads_patterns_as_docker_does():
    rules = _ignore_rules_from("*.toml\n!keep.toml\n**/cache\ndocs/*.md\n/abs\n")
    assert _excluded("a.toml", rules) and not _excluded("sub/a.toml", rules)  # * stays in one folder
    assert not _excluded("keep.toml", rules)
    assert _excluded("cache/x", rules) and _excluded("a/b/cache/x/y", rules) and not _excluded("a/cachex", rules)
    assert _excluded("docs/a.md", rules) and not _excluded("docs/sub/a.md", rules)
    assert _excluded("abs/file", rules) and not _excluded("x/abs", rules)


def _ignore_rules_from(text: str):
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / ".dockerignore").write_text(text)
        return _ignore_rules(Path(d) / ".dockerignore")


def test_the_build_context_holds_the_code_and_no_secret_workspace_or_venv(tmp_path):
    # This checkout as it is: its .venv and .git are really there.
    context = build_context(ROOT)
    assert set(NEEDED) <= context
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    present = {f for f in tracked.stdout.split("\0") if f and (ROOT / f).is_file()}
    assert present - context == set()  # every committed file goes in: none of them is a secret
    assert not [f for f in context if f.split("/")[0] in (".venv", ".git", ".matcher") or "__pycache__" in f]

    # A deployment's checkout: the secrets made from the examples, a demo workspace, build outputs.
    for rel in [*NEEDED, *SECRETS, "docker/seaweedfs-security.example.toml", "docker/s3.example.json"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    shutil.copy(ROOT / ".dockerignore", tmp_path / ".dockerignore")
    context = build_context(tmp_path)
    assert set(NEEDED) <= context
    assert {"docker/seaweedfs-security.example.toml", "docker/s3.example.json"} <= context
    assert sorted(context & set(SECRETS)) == []


def test_secret_files_are_kept_out_of_git_too():
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "--stdin"], cwd=ROOT, capture_output=True,
                             text=True, input="\n".join(["docker/s3.json", "docker/matcher.toml", "docker/.env",
                                                         "docker/spark-secret", "docker/seaweedfs-security.toml",
                                                         ".matcher/config.toml", "docker/s3.example.json"]))
    assert ignored.stdout.split() == ["docker/s3.json", "docker/matcher.toml", "docker/.env", "docker/spark-secret",
                                      "docker/seaweedfs-security.toml", ".matcher/config.toml"]


# -- compose -------------------------------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())  # merge keys (<<) resolved, as compose does


def test_compose_file_describes_the_cluster():
    services = _compose()["services"]
    assert {"s3", "airflow-scheduler", "airflow-api", "spark-master", "spark-worker-gpu"} <= set(services)
    devices = services["spark-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_every_service_running_matcher_code_has_the_whole_environment():
    spec = _compose()
    services = spec["services"]
    matcher = {name for name, svc in services.items() if "build" in svc}  # the services of matcher's image
    assert matcher == {"airflow-scheduler", "airflow-api", "spark-master", "spark-worker-gpu"}
    for name in matcher:
        env = services[name]["environment"]
        assert isinstance(env, dict), name
        # Credentials referenced from the environment (docker/.env), never written here.
        assert env.get("AWS_ACCESS_KEY_ID", "").startswith("${S3_ACCESS_KEY"), name
        assert env.get("AWS_SECRET_ACCESS_KEY", "").startswith("${S3_SECRET_KEY"), name
        assert env.get("MATCHER_CONFIG") == "/opt/matcher/matcher.toml", name
        assert "./matcher.toml:/opt/matcher/matcher.toml:ro" in services[name]["volumes"], name
    assert "gpu.discoveryScript" in services["spark-worker-gpu"]["environment"]["SPARK_WORKER_OPTS"]
    # No value anywhere that looks like a secret written inline.
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if re.search(r"KEY|SECRET|PASSWORD|TOKEN", key):
                assert re.fullmatch(r"\$\{[A-Z0-9_]+(:?\?[^}]*)?\}", str(value)), (name, key, value)


def test_the_compose_cluster_requires_spark_and_seaweedfs_secrets_from_files():
    spec = _compose()
    services = spec["services"]
    assert spec["secrets"]["spark_secret"] == {"file": "./spark-secret"}
    for name in ("spark-master", "spark-worker-gpu"):
        assert services[name]["entrypoint"][0] == "/opt/matcher/docker/spark-daemon.sh", name
        assert "spark_secret" in services[name]["secrets"], name
    assert "spark_secret" in services["airflow-scheduler"]["secrets"]  # its tasks are the drivers
    # The drivers' config names the same secret file, and is a valid config.
    example = load_config(DOCKER / "matcher.example.toml")
    assert example.spark.auth_secret_file == "/run/secrets/spark_secret"
    assert example.storage.s3_access_key == example.storage.s3_secret_key == ""
    assert undated_catalog_warning(example.run.catalog) is None  # a rerun of an old date reads that date's snapshot
    security = services["s3"]["secrets"]
    assert security == [{"source": "seaweedfs_security", "target": "/etc/seaweedfs/security.toml"}]
    assert spec["secrets"]["seaweedfs_security"] == {"file": "./seaweedfs-security.toml"}
    # Published ports are on the host's loopback only.
    published = [p for svc in services.values() for p in svc.get("ports", [])]
    assert published and all(p.startswith("127.0.0.1:") for p in published), published


def test_the_spark_daemon_script_starts_a_master_that_refuses_drivers_without_the_secret(tmp_path):
    from jobs.spark import get_spark
    from tests.test_standalone_cluster import _master_answers, _spark

    env = dict(os.environ, PATH=f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", SPARK_LOCAL_IP="127.0.0.1",
               SPARK_LOG_DIR=str(tmp_path), TMPDIR=str(tmp_path), SPARK_AUTH_SECRET_FILE=str(tmp_path / "none"))
    missing = subprocess.run([str(DOCKER / "spark-daemon.sh"), "org.apache.spark.deploy.master.Master"], env=env,
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 1 and "no Spark secret in" in missing.stderr

    secret = os.urandom(32).hex()
    (tmp_path / "spark-secret").write_text(secret + "\n")
    env["SPARK_AUTH_SECRET_FILE"] = str(tmp_path / "spark-secret")
    port, ui = free_port(), free_port()
    master = subprocess.Popen([str(DOCKER / "spark-daemon.sh"), "org.apache.spark.deploy.master.Master",
                               "--host", "127.0.0.1", "--port", str(port), "--webui-port", str(ui)], env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "master.log", "wb"),
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while not port_open(port):
            assert master.poll() is None and time.monotonic() < deadline, (tmp_path / "master.log").read_text()
            time.sleep(0.3)
        assert secret not in Path(f"/proc/{master.pid}/cmdline").read_bytes().decode()
        conf_dirs = list(tmp_path.glob("spark-conf.*"))
        assert len(conf_dirs) == 1 and conf_dirs[0].stat().st_mode & 0o777 == 0o700
        assert (conf_dirs[0] / "spark-defaults.conf").stat().st_mode & 0o777 == 0o600
        spark = get_spark(_spark())
        assert not _master_answers(spark, port, None)
        assert _master_answers(spark, port, secret)
    finally:
        os.killpg(master.pid, signal.SIGTERM)
        master.wait(timeout=30)


def test_compose_config_validates_where_docker_compose_exists(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True,
                            env={"S3_ACCESS_KEY": "x", "S3_SECRET_KEY": "y", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
