import shutil
import subprocess
from pathlib import Path

import yaml

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_compose_file_describes_the_cluster():
    spec = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = spec["services"]
    assert {"s3", "airflow-scheduler", "airflow-api", "spark-master", "spark-worker-gpu"} <= set(services)
    devices = services["spark-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    # Credentials are never baked in: they come from the environment.
    text = (DOCKER / "compose.yaml").read_text()
    assert "${S3_ACCESS_KEY" in text and "${S3_SECRET_KEY" in text


def test_compose_config_validates_where_docker_compose_exists(tmp_path):
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        import pytest

        pytest.skip("no docker compose client on this machine")
    result = subprocess.run([docker, "compose", "-f", str(DOCKER / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True,
                            env={"S3_ACCESS_KEY": "x", "S3_SECRET_KEY": "y", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
