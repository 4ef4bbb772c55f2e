"""The embedded SeaweedFS: reachable from this machine only; its internal HTTP ports refuse requests without a
token signed with the keys of this start, its gRPC ports connections without a certificate its CA signed; only the
S3 port, with its keys, serves the data."""
from __future__ import annotations

import json
import re
import secrets
import socket
import ssl
import time
import urllib.error
import urllib.request

import psutil
import pytest

from matcher.io.s3server import EmbeddedS3

pytestmark = pytest.mark.integration  # every test here starts Spark, Airflow, S3 or a process

SECRET_BYTES = b"only-through-s3-" + secrets.token_hex(8).encode()


def _request(url: str, data: bytes | None = None, method: str | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, method=method), timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_every_port_of_the_embedded_s3_server_listens_on_loopback_only(s3_server):
    listening = [c.laddr for c in psutil.Process(s3_server.process.pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    ports = {addr.port for addr in listening}
    http_ports = [s3_server.port, *s3_server.internal_ports.values()]
    # Each HTTP port and its gRPC port (10000 above) is there, and nothing listens on 0.0.0.0 or ::.
    assert set(http_ports) | {p + 10000 for p in http_ports} <= ports
    assert sorted({addr.ip for addr in listening}) == ["127.0.0.1"]


def test_the_filer_and_volume_ports_refuse_requests_without_a_token(s3_server):
    client = s3_server.client()
    client.put_object(Bucket=s3_server.bucket, Key="private/object.bin", Body=SECRET_BYTES)
    ports = s3_server.internal_ports
    filer = f"http://127.0.0.1:{ports['filer']}/buckets/{s3_server.bucket}"
    for url, data, method in [(f"{filer}/private/object.bin", None, None),     # read the object
                              (f"{filer}/private/", None, None),                 # list the folder
                              (f"{filer}/private/object.bin", b"x", "PUT"),      # overwrite it
                              (f"{filer}/private/object.bin", None, "DELETE")]:
        status, body = _request(url, data, method)
        assert (status, b"jwt" in body) == (401, True), (method or "GET", url, status, body[:200])
        assert SECRET_BYTES not in body
    # The master hands out a file id to anyone on this machine, but the volume server takes no write without the
    # token the master signs for its own parts, and serves no read without one.
    status, body = _request(f"http://127.0.0.1:{ports['master']}/dir/assign")
    assert status == 200 and "auth" not in json.loads(body)
    fid = json.loads(body)["fid"]
    assert _request(f"http://127.0.0.1:{ports['volume']}/{fid}", b"x", "PUT")[0] == 401
    assert _request(f"http://127.0.0.1:{ports['volume']}/{fid}")[0] == 401
    # The S3 port with the keys still reads and writes.
    assert client.get_object(Bucket=s3_server.bucket, Key="private/object.bin")["Body"].read() == SECRET_BYTES


def _grpc_handshake(port: int, context: ssl.SSLContext) -> bytes:
    """Open TLS to a gRPC port, send HTTP/2's preface, return the server's first bytes (its SETTINGS frame)."""
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return tls.recv(64)


def test_the_grpc_ports_refuse_connections_without_the_servers_client_certificate(s3_server):
    tls_dir = s3_server.data_dir / "tls"
    grpc_ports = [p + 10000 for p in [s3_server.port, *s3_server.internal_ports.values()]]
    for port in grpc_ports:
        # Plain HTTP/2, as an unconfigured gRPC client speaks it: no answer but a closed connection.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert raw.recv(64)[:1] in (b"", b"\x15"), port  # closed, or a TLS alert
        # TLS that trusts the server but shows no certificate of its own: refused.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            _grpc_handshake(port, ssl.create_default_context(cafile=str(tls_dir / "ca.crt")))
        # With the certificate the server's own parts use, HTTP/2 begins (a SETTINGS frame, type 4).
        with_cert = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
        with_cert.load_cert_chain(tls_dir / "node.crt", tls_dir / "node.key")
        assert _grpc_handshake(port, with_cert)[3] == 4, port
    # The server's parts still reach each other (a maintenance worker that could not would log this).
    assert "error reading server preface" not in (s3_server.data_dir / "weed.log").read_text()


def test_the_servers_keys_are_private_and_new_at_each_start(tmp_path):
    server = EmbeddedS3(tmp_path / "s3", "k" + secrets.token_hex(3), secrets.token_hex(16))
    with server:
        first = (server.data_dir / "security.toml").read_text()
        private = ("s3.json", "security.toml", "weed.log", "tls/ca.crt", "tls/node.crt", "tls/node.key")
        assert {name: (server.data_dir / name).stat().st_mode & 0o777 for name in private} == dict.fromkeys(
            private, 0o600)
        ca = (server.data_dir / "tls" / "ca.crt").read_text()
        assert server.data_dir.stat().st_mode & 0o777 == 0o700  # the unix sockets and the data are in there too
        assert server.secret_key not in " ".join(psutil.Process(server.process.pid).cmdline())
    with server:
        second = (server.data_dir / "security.toml").read_text()
        assert (server.data_dir / "tls" / "ca.crt").read_text() != ca
        assert server.client().head_bucket(Bucket=server.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
    jwt_keys = [re.findall(r'key = "([0-9a-f]{64})"', text) for text in (first, second)]
    assert len(jwt_keys[0]) == len(jwt_keys[1]) == 4 and not set(jwt_keys[0]) & set(jwt_keys[1])


def test_no_chosen_port_is_another_ones_grpc_port():
    """SeaweedFS reserves each HTTP port + 10000 for gRPC and refuses to start when another of its ports is one."""
    from matcher.io.s3server import _fits

    assert _fits(40000, [39135, 41000])
    assert not _fits(49135, [39135]) and not _fits(39135, [49135])  # 39135's gRPC port, or the other way round
    assert not _fits(39135, [39135]) and not _fits(56000, [])  # taken; no room for its gRPC port


def test_seaweedfs_logs_only_to_its_private_weed_log_never_to_the_shared_tmp(tmp_path):
    import glob
    import tempfile

    server = EmbeddedS3(tmp_path / "s3", "k" + secrets.token_hex(3), secrets.token_hex(16))
    with server:
        pid = server.process.pid
    # glog's own files (weed.<host>.<user>.log.<LEVEL>.<time>.<pid>) are world-readable in /tmp unless told not to
    assert glob.glob(f"{tempfile.gettempdir()}/weed.*.{pid}") == []
    log = (server.data_dir / "weed.log").read_text(errors="replace")
    assert re.search(r"^[IWE]\d{4} ", log, re.M), log[-2000:]  # its log lines (stderr) are in weed.log


def test_a_second_process_on_the_same_data_folder_waits_then_is_told_to_retry(tmp_path):
    """SeaweedFS cannot share its store: the second server waits, then says who holds the folder, retryable (it
    crashed with a Go stack dump, reported as a bug)."""
    import subprocess
    import sys

    from matcher.failures import classify
    from matcher.io.s3server import S3ServerBusy

    folder, keys = tmp_path / "s3", ("k" + secrets.token_hex(3), secrets.token_hex(16))
    hold = ("import sys, time; from matcher.io.s3server import EmbeddedS3\n"
            f"with EmbeddedS3({str(folder)!r}, {keys[0]!r}, {keys[1]!r}):\n"
            "    print('up', flush=True); sys.stdin.readline()\n")
    other = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "up"
        started = time.monotonic()
        with pytest.raises(S3ServerBusy, match=rf"in use by matcher process {other.pid} ") as busy:
            EmbeddedS3(folder, *keys, busy_wait=1.0).start()
        assert time.monotonic() - started >= 1.0  # it waited for the holder before giving up
        assert classify(busy.value).retryable  # matcher exits 75 (EXIT_RETRYABLE) for it
    finally:
        other.communicate("\n", timeout=60)
    with EmbeddedS3(folder, *keys, busy_wait=1.0) as server:  # free again once the holder stopped its server
        assert server.client().head_bucket(Bucket=server.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_a_server_that_cannot_start_frees_its_data_folder(tmp_path, monkeypatch):
    import matcher.io.s3server as s3server
    from matcher.io.s3server import S3ServerError

    def no_weed():
        raise S3ServerError("no weed here")  # an injected fault: the binary missing

    folder, keys = tmp_path / "s3", ("k" + secrets.token_hex(3), secrets.token_hex(16))
    monkeypatch.setattr(s3server, "_weed_binary", no_weed)
    with pytest.raises(S3ServerError, match="no weed here"):
        EmbeddedS3(folder, *keys).start()
    monkeypatch.undo()
    with EmbeddedS3(folder, *keys, busy_wait=0.5) as server:  # the folder's lock went with the failed start
        assert server.client().head_bucket(Bucket=server.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200


def test_a_server_a_killed_holder_left_running_is_stopped_before_the_next_starts(tmp_path):
    """A task killed (Airflow's SIGKILL after a clear) runs no clean-up: its server, in its own session, stayed up,
    and the next command started a second one on the same store."""
    import os
    import signal
    import subprocess
    import sys

    import matcher.io.s3server as s3server

    folder, keys = tmp_path / "s3", ("k" + secrets.token_hex(3), secrets.token_hex(16))
    hold = ("import sys, time; from matcher.io.s3server import EmbeddedS3\n"
            f"server = EmbeddedS3({str(folder)!r}, {keys[0]!r}, {keys[1]!r}).start()\n"
            "print(server.process.pid, flush=True); sys.stdin.readline()\n")
    holder = subprocess.Popen([sys.executable, "-c", hold], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    orphan = int(holder.stdout.readline())
    holder.kill()  # the injected fault: no clean-up runs
    holder.wait(timeout=30)
    try:
        assert s3server._running(orphan)  # the holder is gone, its server is not
        with EmbeddedS3(folder, *keys, busy_wait=1.0) as server:
            assert not s3server._running(orphan)
            assert server.client().head_bucket(Bucket=server.bucket)["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert not (folder / "server.pid").exists()
    finally:
        if s3server._running(orphan):
            os.kill(orphan, signal.SIGKILL)
