"""Image references as http(s) URLs, against a real HTTP server on 127.0.0.1 whose failures are injected per path.
Loopback is refused by default (tests/test_hostile_catalog.py); these tests allow it by setting, as a deployment would
allow its own CDN."""
from __future__ import annotations

import io
import threading
import time
from collections import Counter
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest
from PIL import Image

from matcher.config import load_config
from matcher.io.catalog import CatalogReader
from tests.reference import clean_catalog

ALLOW_LOOPBACK = {"http_allow_networks": ["127.0.0.1/32"]}


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buf, format="JPEG")
    return buf.getvalue()


class QuietHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass


class KeepAliveHandler(QuietHandler):
    protocol_version = "HTTP/1.1"  # connections stay open between requests


@contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[int]:
    """`server` running on a thread; its port."""
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def image_server():
    hits: Counter = Counter()
    body = _jpeg()

    class Handler(QuietHandler):
        def _send(self, status: int, data: bytes = b"", kind: str = "image/jpeg", length: int | None = None):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(data) if length is None else length))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            hits[self.path] += 1
            if self.path in ("/ok.jpg", "/%E7%83%A7%E6%B0%B4%E5%A3%B6.jpg"):  # the second: /烧水壶.jpg
                self._send(200, body)
            elif self.path == "/flaky.jpg":  # busy twice, then fine
                self._send(503) if hits[self.path] <= 2 else self._send(200, body)
            elif self.path == "/busy.jpg":
                self._send(503)
            elif self.path == "/gone.jpg":
                self._send(404)
            elif self.path == "/forbidden.jpg":
                self._send(403)
            elif self.path == "/slow.jpg":
                time.sleep(1.5)
                self._send(200, body)
            elif self.path == "/page.jpg":
                self._send(200, b"<!DOCTYPE html><html>sign in</html>", kind="text/html")
            elif self.path == "/cut.jpg":  # the connection drops mid-body
                self._send(200, body[:20], length=len(body))
            elif self.path == "/trickle.jpg":  # a byte now and then: each read is within the timeout
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    for i in range(len(body)):
                        self.wfile.write(body[i:i + 1])
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client gave up
                    pass
            elif self.path in ("/trailers.jpg", "/chunk-size.jpg"):  # chunked, then trailer lines or a size line
                self.send_response(200)  # without end: read inside http.client, no byte reaches the size cap
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self.wfile.write(b"1\r\nA\r\n0\r\n" if self.path == "/trailers.jpg" else b"1;ext=")
                    for _ in range(400):
                        self.wfile.write(b"X-Pad: a\r\n" if self.path == "/trailers.jpg" else b"a")
                        self.wfile.flush()
                        time.sleep(0.05)
                except OSError:  # the client gave up
                    pass
            elif self.path == "/huge.jpg":
                self._send(200, b"", length=10**9)
            elif self.path == "/redirect.jpg":
                self._redirect("/ok.jpg")
            elif self.path == "/removed.jpg":
                self._send(410)
            elif self.path.startswith("/hop"):  # /hopN-K.jpg: K more redirects, then the photo
                chain, left = self.path[4:-4].split("-")
                self._redirect(f"/hop{chain}-{int(left) - 1}.jpg" if int(left) > 0 else "/ok.jpg")
            elif self.path == "/to-loopback.jpg":  # a redirect to a loopback address the config does not allow
                self._redirect(f"http://127.0.0.2:{self.server.server_address[1]}/ok.jpg")
            elif self.path == "/bad-location.jpg":  # a Location that is no URL
                self._redirect("http://[::1")
            elif self.path == "/odd-length.jpg":  # a Content-Length that str.isdigit() takes and int() does not
                self.send_response(200)
                self.send_header("Content-Length", "\u00b2")
                self.end_headers()
                self.wfile.write(body)
            elif self.path == "/far-retry.jpg":  # busy, back in a year Python's dates cannot hold
                self.send_response(503)
                self.send_header("Retry-After", "Mon, 01 Jan 99999 00:00:00 GMT")
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path.startswith("/slowhop"):  # /slowhopK.jpg: K more redirects, each a little under the timeout
                time.sleep(0.4)
                left = int(self.path[8:-4])
                self._redirect(f"/slowhop{left - 1}.jpg" if left > 0 else "/ok.jpg")

        def _redirect(self, location: str):
            self.send_response(302)
            self.send_header("Location", location)
            self.send_header("Content-Length", "0")
            self.end_headers()

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}", hits


def test_http_images_are_fetched_retried_and_quarantined_with_reasons(tmp_path, image_server):
    base, hits = image_server
    names = ["ok", "flaky", "busy", "gone", "forbidden", "slow", "cut", "page", "huge", "redirect"]
    names.append("烧水壶")
    (tmp_path / "products.csv").write_text("product_id,title,image\n" + "".join(
        f"{n},Product {n},{base}/{n}.jpg\n" for n in names), encoding="utf-8")
    cfg = load_config(overrides={"catalog": {"http_timeout": 0.5, "http_retries": 2, **ALLOW_LOOPBACK}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)

    assert sorted(result.clean["product_id"]) == ["flaky", "ok", "redirect", "烧水壶"]
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert reasons == {"busy": "image_unreadable", "gone": "image_missing", "forbidden": "image_unreadable",
                       "slow": "image_unreadable", "cut": "image_unreadable", "page": "not_an_image",
                       "huge": "image_too_large"}
    details = dict(zip(result.quarantine["product_id"], result.quarantine["detail"]))
    assert details["busy"].startswith("HTTP 503 at ") and details["busy"].endswith("(after 3 tries)")
    assert "timed out" in details["slow"] and details["slow"].endswith("(after 3 tries)")
    # Asked again only where asking again can help: busy servers and timeouts, not a 404 or a 403.
    assert details["cut"].startswith("IncompleteRead")
    assert hits["/flaky.jpg"] == 3 and hits["/busy.jpg"] == 3 and hits["/slow.jpg"] == 3 and hits["/cut.jpg"] == 3
    assert hits["/gone.jpg"] == 1 and hits["/forbidden.jpg"] == 1


def test_redirects_are_followed_five_deep_a_410_is_missing_and_a_refused_address_is_never_asked_again(
        tmp_path, image_server):
    base, hits = image_server
    refs = {"five": "hop5-4.jpg", "six": "hop6-5.jpg", "removed": "removed.jpg", "refused": "to-loopback.jpg"}
    (tmp_path / "products.csv").write_text("product_id,title,image\n" + "".join(
        f"{p},Product {p},{base}/{r}\n" for p, r in refs.items()), encoding="utf-8")
    cfg = load_config(overrides={"catalog": {"http_timeout": 0.5, "http_retries": 2, **ALLOW_LOOPBACK}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert result.clean["product_id"].tolist() == ["five"]  # 5 redirects: /hop5-4 .. /hop5-0, then /ok.jpg
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert reasons == {"six": "image_unreadable", "removed": "image_missing", "refused": "image_address_not_allowed"}
    details = dict(zip(result.quarantine["product_id"], result.quarantine["detail"]))
    assert details["six"].startswith("more than 5 redirects from ")
    assert hits["/removed.jpg"] == 1 and hits["/to-loopback.jpg"] == 1  # neither asked again (http_retries 2)
    assert sum(n for path, n in hits.items() if path.startswith("/hop6-")) == 6  # the sixth redirect not followed


def test_a_servers_malformed_answer_or_slow_redirects_cost_their_own_row_not_the_batch(tmp_path, image_server):
    """A Location that is no URL, a Content-Length int() refuses and a Retry-After date past Python's years each
    raised ValueError out of the image threads: the whole batch (its good rows too) failed the task. Redirects each
    under the timeout held a thread for every hop: a try, redirects included, now ends within its deadline."""
    base, hits = image_server
    refs = {"good": "ok.jpg", "bad-location": "bad-location.jpg", "odd-length": "odd-length.jpg",
            "far-retry": "far-retry.jpg", "slow-chain": "slowhop4.jpg", "two-slow-hops": "slowhop1.jpg"}
    (tmp_path / "products.csv").write_text("product_id,title,image\n" + "".join(
        f"{p},Product {p},{base}/{r}\n" for p, r in refs.items()), encoding="utf-8")
    cfg = load_config(overrides={"catalog": {"http_timeout": 0.5, "http_retries": 1, **ALLOW_LOOPBACK}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    started = time.monotonic()
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    elapsed = time.monotonic() - started
    assert sorted(result.clean["product_id"]) == ["good", "odd-length", "two-slow-hops"]  # 0.8 s, under 1.5 s
    reasons = dict(zip(result.quarantine["product_id"], result.quarantine["reason"]))
    assert reasons == {"bad-location": "image_reference_invalid", "far-retry": "image_unreadable",
                       "slow-chain": "image_unreadable"}
    details = dict(zip(result.quarantine["product_id"], result.quarantine["detail"]))
    assert "redirects to 'http://[::1'" in details["bad-location"]
    assert details["far-retry"].startswith("HTTP 503") and hits["/far-retry.jpg"] == 2
    # 5 hops of 0.4 s (2 s) against a deadline of 3 timeouts (1.5 s) a try, two tries
    assert hits["/slowhop4.jpg"] == 2 and hits["/slowhop0.jpg"] == 1 and elapsed < 9, (hits, elapsed)


def test_a_refused_connection_is_retried_then_quarantined(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "products.csv").write_text(f"product_id,title,image\nx,Lamp,http://127.0.0.1:{port}/x.jpg\n")
    cfg = load_config(overrides={"catalog": {"http_timeout": 0.5, "http_retries": 1, **ALLOW_LOOPBACK}})
    reader = CatalogReader(str(tmp_path), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert result.clean.empty
    assert result.quarantine[["product_id", "reason"]].values.tolist() == [["x", "image_unreadable"]]
    detail = result.quarantine["detail"][0]
    assert "Connection refused" in detail and "(after 2 tries)" in detail


def test_a_server_trickling_its_body_is_cut_off_at_the_deadline(image_server):
    """The timeout bounds each socket read: a server sending a byte every 50 ms never trips it, so the whole body
    has its own deadline (a few timeouts), after which the photo is quarantined instead of holding a thread."""
    from matcher.io.http_images import BODY_DEADLINE_TIMEOUTS, AddressPolicy, fetch_image
    from matcher.steps.images import ImageRejected

    base, hits = image_server
    policy = AddressPolicy.from_settings([], ["127.0.0.1/32"])
    started = time.monotonic()
    with pytest.raises(ImageRejected, match="did not arrive in time") as err:
        fetch_image(f"{base}/trickle.jpg", timeout=0.3, retries=1, max_bytes=10**6, backoff=0.01, policy=policy)
    elapsed = time.monotonic() - started
    assert err.value.reason == "image_unreadable" and hits["/trickle.jpg"] == 2
    assert elapsed < 2 * (BODY_DEADLINE_TIMEOUTS * 0.3) + 2, elapsed  # two tries, each cut at its deadline
    assert fetch_image(f"{base}/ok.jpg", timeout=0.3, retries=0, max_bytes=10**6, policy=policy)[:2] == b"\xff\xd8"


@pytest.mark.parametrize("path", ["/trailers.jpg", "/chunk-size.jpg"])
def test_a_chunked_body_whose_trailer_or_size_line_never_ends_is_cut_off_at_the_deadline(image_server, path):
    """http.client reads a chunk's size line and the trailer lines itself, between the reads the deadline is
    checked at: the socket is shut at the deadline instead (a server could hold the thread for days)."""
    from matcher.io.http_images import BODY_DEADLINE_TIMEOUTS, AddressPolicy, fetch_image
    from matcher.steps.images import ImageRejected

    base, hits = image_server
    policy = AddressPolicy.from_settings([], ["127.0.0.1/32"])
    started = time.monotonic()
    with pytest.raises(ImageRejected, match="did not arrive in time") as err:
        fetch_image(f"{base}{path}", timeout=0.3, retries=0, max_bytes=10**6, policy=policy)
    assert err.value.reason == "image_unreadable" and hits[path] == 1
    assert time.monotonic() - started < BODY_DEADLINE_TIMEOUTS * 0.3 + 2
    assert fetch_image(f"{base}/ok.jpg", timeout=0.3, retries=0, max_bytes=10**6, policy=policy)[:2] == b"\xff\xd8"


def _fetch_from_a_header_trickler(url: str, policy, retries: int, wrap=None) -> tuple[list, float]:
    """fetch_image(url) against a server on 127.0.0.1 (its connections through `wrap`, e.g. TLS) that answers
    "200 OK" and then a header byte every 100 ms, in a thread given 20 s: (what it raised or returned, seconds)."""
    import contextlib
    import socket

    from matcher.io.http_images import fetch_image
    from matcher.steps.images import ImageRejected

    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle(conn: socket.socket) -> None:
        with contextlib.suppress(OSError), (wrap(conn) if wrap else conn) as peer:  # the client hangs up
            peer.recv(65536)
            peer.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
            while not stop.wait(0.1):
                peer.sendall(b"a")

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=trickle, args=(conn,), daemon=True).start()

    outcome: list = []

    def fetch() -> None:
        try:
            fetch_image(url.format(port=listener.getsockname()[1]), timeout=0.3, retries=retries, max_bytes=10**6,
                        backoff=0.01, policy=policy)
            outcome.append("returned")
        except ImageRejected as exc:
            outcome.append(exc)

    threading.Thread(target=accept, daemon=True).start()
    started = time.monotonic()
    worker = threading.Thread(target=fetch, daemon=True)
    worker.start()
    worker.join(20)
    elapsed = time.monotonic() - started
    stop.set()
    listener.close()
    return outcome, elapsed


def test_a_server_trickling_its_headers_is_cut_off_at_the_deadline():
    """Before the body, the status line and headers: a byte every 100 ms held an image thread for good."""
    from matcher.io.http_images import BODY_DEADLINE_TIMEOUTS, AddressPolicy
    from matcher.steps.images import ImageRejected

    policy = AddressPolicy.from_settings([], ["127.0.0.1/32"])
    outcome, elapsed = _fetch_from_a_header_trickler("http://127.0.0.1:{port}/x.jpg", policy, retries=1)
    assert outcome, "still waiting for the headers after 20 s"
    assert isinstance(outcome[0], ImageRejected) and outcome[0].reason == "image_unreadable", outcome
    assert "timed out" in outcome[0].detail and outcome[0].detail.endswith("(after 2 tries)")
    assert elapsed < 2 * (BODY_DEADLINE_TIMEOUTS * 0.3) + 2, elapsed


def test_https_headers_trickled_a_byte_at_a_time_are_cut_off_at_the_deadline(tmp_path, monkeypatch):
    """TLS detaches the socket it wraps: the cut must reach the connection through another handle."""
    import ssl

    import matcher.io.http_images as http_images
    from matcher.steps.images import ImageRejected

    cert_file, key_file = _localhost_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    monkeypatch.setattr(http_images, "_TLS", ssl.create_default_context(cafile=str(cert_file)))
    monkeypatch.setattr(http_images, "_POOLS", type(http_images._POOLS)())
    policy = http_images.AddressPolicy.from_settings(["localhost"], ["127.0.0.1/32"])
    outcome, elapsed = _fetch_from_a_header_trickler("https://localhost:{port}/x.jpg", policy, retries=0,
                                                     wrap=lambda conn: context.wrap_socket(conn, server_side=True))
    assert outcome, "still waiting for the headers after 20 s"
    assert isinstance(outcome[0], ImageRejected) and outcome[0].reason == "image_unreadable", outcome
    assert "timed out" in outcome[0].detail and elapsed < http_images.BODY_DEADLINE_TIMEOUTS * 0.3 + 2, elapsed


@pytest.fixture
def keep_alive_server():
    """An HTTP/1.1 server that keeps connections open; it counts the connections it accepts."""
    seen = {"connections": 0, "hits": []}
    body = _jpeg()

    class Handler(KeepAliveHandler):
        def setup(self):
            seen["connections"] += 1
            super().setup()

        def do_GET(self):
            seen["hits"].append((self.path, time.monotonic()))
            busy_first = self.path.startswith("/busy-then-ok") and len([h for h in seen["hits"]
                                                                           if h[0] == self.path]) == 1
            self.send_response(503 if busy_first else 200)
            if busy_first:
                self.send_header("Retry-After", self.path.rsplit("-", 1)[-1].removesuffix(".jpg"))
            self.send_header("Content-Type", "image/jpeg")
            data = b"" if busy_first else body
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    with serving(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as port:
        yield f"http://127.0.0.1:{port}", seen


def test_photos_from_one_host_reuse_one_connection(keep_alive_server):
    from matcher.io.http_images import AddressPolicy, fetch_image

    base, seen = keep_alive_server
    policy = AddressPolicy.from_settings([], ["127.0.0.1/32"])
    for i in range(6):
        assert fetch_image(f"{base}/p{i}.jpg", 2.0, 0, 10**6, policy=policy)[:2] == b"\xff\xd8"
    assert len(seen["hits"]) == 6 and seen["connections"] == 1


def test_a_busy_servers_retry_after_is_honoured(keep_alive_server):
    from matcher.io.http_images import AddressPolicy, fetch_image

    base, seen = keep_alive_server
    policy = AddressPolicy.from_settings([], ["127.0.0.1/32"])
    data = fetch_image(f"{base}/busy-then-ok-1.jpg", 2.0, 1, 10**6, backoff=0.01, policy=policy)
    assert data[:2] == b"\xff\xd8"
    (_, first), (_, second) = seen["hits"]
    assert second - first >= 0.95  # Retry-After: 1, though the back-off alone would wait 10 ms


def test_retry_pauses_are_jittered_and_a_long_retry_after_is_capped():
    from matcher.io.http_images import RETRY_AFTER_CAP, parse_retry_after, retry_pause

    pauses = [retry_pause(2, 0.5) for _ in range(50)]
    assert all(1.0 <= p <= 2.0 for p in pauses) and len(set(pauses)) > 40  # half to all of 0.5 * 2**2, spread
    assert retry_pause(0, 0.5, retry_after=7.0) == 7.0
    assert retry_pause(0, 0.5, retry_after=3600.0) == RETRY_AFTER_CAP == 30.0  # running.md: "at most 30 s a try"
    assert parse_retry_after("12") == 12.0 and parse_retry_after(None) is None
    assert parse_retry_after("soon") is None and parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0
    assert parse_retry_after("99999") == RETRY_AFTER_CAP


def _localhost_certificate(tmp_path) -> tuple:
    """A self-signed certificate naming only `localhost`, and its key: (cert file, key file)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server on 127.0.0.1 whose self-signed certificate names only `localhost`."""
    import ssl

    cert_file, key_file = _localhost_certificate(tmp_path)
    body = _jpeg()

    class Handler(KeepAliveHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    with serving(server) as port:
        yield port, cert_file


def test_https_photos_are_verified_against_the_host_name(tls_server, monkeypatch):
    import ssl

    import matcher.io.http_images as http_images
    from matcher.steps.images import ImageRejected

    port, cert_file = tls_server
    policy = http_images.AddressPolicy.from_settings(["localhost"], ["127.0.0.1/32"])
    with pytest.raises(ImageRejected, match="CERTIFICATE_VERIFY_FAILED") as err:  # not trusted: refused
        http_images.fetch_image(f"https://localhost:{port}/a.jpg", 2.0, 0, 10**6, policy=policy)
    assert err.value.reason == "image_unreadable"
    trusting = ssl.create_default_context(cafile=str(cert_file))
    monkeypatch.setattr(http_images, "_TLS", trusting)
    monkeypatch.setattr(http_images, "_POOLS", type(http_images._POOLS)())  # pools made with the untrusting context
    assert http_images.fetch_image(f"https://localhost:{port}/b.jpg", 2.0, 0, 10**6, policy=policy)[:2] == b"\xff\xd8"
    # The same server and certificate, asked for by an address the certificate does not name: refused.
    with pytest.raises(ImageRejected, match="(?i)mismatch|doesn't match|not valid for"):
        http_images.fetch_image(f"https://127.0.0.1:{port}/c.jpg", 2.0, 0, 10**6, policy=policy)
