"""A catalog row never makes matcher read or fetch what the config does not allow: files outside the catalog root and
catalog.image_sources, S3 objects outside them, and http(s) addresses that are not public (the machine itself, private
networks, the cloud metadata service), directly, through a DNS name or through a redirect. Each such row is
quarantined with its own reason, nothing of the target reaches the lake, and the good rows are clean."""
from __future__ import annotations

import io
import ipaddress
import os
import secrets
import socket
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.context import RunContext
from jobs.pipeline import run_pipeline
from matcher.config import ConfigError, load_config
from matcher.io.catalog import CatalogReader
from matcher.io.http_images import AddressPolicy, address_kind, fetch_image
from matcher.steps.images import ImageRejected, canonicalize_image
from tests.reference import clean_catalog

GOOD = 20
ALLOWED_HOST = "127.0.0.2"  # a loopback address the tests allow by setting, as a deployment allows its CDN


def jpeg(colour: tuple[int, int, int], comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), colour).save(buf, format="JPEG", comment=comment)
    return buf.getvalue()


class Server:
    """A real HTTP server on one address that counts the requests it gets, by path."""

    def __init__(self, host: str, routes: dict[str, tuple[int, dict[str, str], bytes]], port: int = 0):
        self.hits: Counter = Counter()
        hits = self.hits

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hits[self.path] += 1
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self.server = server_class((host, port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def servers():
    """`served`: the image a hostile row wants fetched, on 127.0.0.1 (and ::1); `redirector`: an allowed host whose
    redirects lead to loopback, the metadata service and a local file."""
    marker = "W" + secrets.token_hex(5)
    served_jpeg = jpeg((30, 160, 30), comment=marker.encode())
    image = (200, {"Content-Type": "image/jpeg"}, served_jpeg)
    served = Server("127.0.0.1", {"/served.jpg": image, "/x.jpg": image})
    served6 = Server("::1", {"/x.jpg": image}) if ipv6_loopback_available() else None
    p = served.port

    def to(location):
        return 302, {"Location": location}, b""

    redirector = Server(ALLOWED_HOST, {
        "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, jpeg((10, 10, 200))),
        "/to-loopback": to(f"http://127.0.0.1:{p}/served.jpg"),
        "/to-localhost": to(f"http://localhost:{p}/served.jpg"),
        "/to-metadata": to("http://169.254.169.254/latest/meta-data/"),
        "/to-file": to("file:///etc/hostname"),
    })
    yield {"served": served, "served6": served6, "redirector": redirector, "marker": marker, "jpeg": served_jpeg}
    for s in (served, served6, redirector):
        if s:
            s.close()


def make_catalog(tmp_path: Path, hostile: dict[str, str]) -> Path:
    root = tmp_path / "catalog"
    (root / "img").mkdir(parents=True)
    lines = ["product_id,title,category,image"]
    for i in range(GOOD):
        (root / "img" / f"g{i}.jpg").write_bytes(jpeg((10 * i, 255 - 10 * i, 90)))
        lines.append(f"G{i:02d},Good product {i},Shirts,img/g{i}.jpg")
    lines += [f"{pid},Hostile {pid},Shirts,{ref}" for pid, ref in hostile.items()]
    (root / "products.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.integration
def test_a_hostile_catalog_reads_nothing_it_may_not_and_publishes_nothing_of_it(tmp_path, servers):
    secret_marker = "K" + secrets.token_hex(5)  # short: the first bytes of secret.txt hold all of it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret_jpeg = jpeg((250, 250, 0), comment=secret_marker.encode())
    (elsewhere / "secret.jpg").write_bytes(secret_jpeg)
    (elsewhere / "secret.txt").write_text(f"{secret_marker} password=hunter2\n")
    served, served6, redirector = servers["served"], servers["served6"], servers["redirector"]
    p, r = served.port, f"http://{ALLOWED_HOST}:{redirector.port}"
    root_path = tmp_path / "catalog"
    hostile = {
        "H-FILE-JPG": (f"file://{elsewhere}/secret.jpg", "image_source_not_allowed"),
        "H-FILE-TXT": (f"file://{elsewhere}/secret.txt", "image_source_not_allowed"),
        "H-FILE-DOTDOT": (f"file://{root_path}/../elsewhere/secret.jpg", "image_source_not_allowed"),
        "H-FILE-LINK": (f"file://{root_path}/img/link.jpg", "image_source_not_allowed"),
        "H-REL-LINK": ("img/link.jpg", "image_path_escapes_root"),
        # absolute paths are read as their file:// URIs are
        "H-ABS": (f"{elsewhere}/secret.jpg", "image_source_not_allowed"),
        "H-ABS-DOTDOT": (f"{root_path}/../elsewhere/secret.jpg", "image_source_not_allowed"),
        "H-ABS-LINK": (f"{root_path}/img/link.jpg", "image_source_not_allowed"),
        "H-ABS-PROC": ("/proc/self/environ", "image_source_not_allowed"),
        "H-WINDOWS": ("C:\\export\\secret.jpg", "image_path_escapes_root"),
        # file:// paths are percent-decoded, then checked: %2e%2e is .., out of the root
        "H-FILE-ESCAPED": (f"file://{root_path}/%2e%2e/elsewhere/secret.jpg", "image_source_not_allowed"),
        "H-S3": ("s3://other-bucket/x.jpg", "image_source_not_allowed"),
        "H-S3A": ("s3a://other-bucket/products/../x.jpg", "image_source_not_allowed"),
        "H-LOOPBACK": (f"http://127.0.0.1:{p}/served.jpg", "image_address_not_allowed"),
        "H-LOCALHOST": (f"http://localhost:{p}/served.jpg", "image_address_not_allowed"),
        "H-DECIMAL": (f"http://2130706433:{p}/served.jpg", "image_address_not_allowed"),  # 127.0.0.1 as one number
        "H-ZEROS": (f"http://0.0.0.0:{p}/served.jpg", "image_address_not_allowed"),
        "H-MAPPED": (f"http://[::ffff:127.0.0.1]:{p}/served.jpg", "image_address_not_allowed"),
        "H-IPV6": (f"http://[::1]:{served6.port if served6 else p}/x.jpg", "image_address_not_allowed"),
        "H-METADATA": ("http://169.254.169.254/latest/meta-data/", "image_address_not_allowed"),
        "H-PRIVATE": ("http://10.0.0.1/x.jpg", "image_address_not_allowed"),
        "H-REDIRECT": (f"{r}/to-loopback", "image_address_not_allowed"),
        "H-REDIRECT-DNS": (f"{r}/to-localhost", "image_address_not_allowed"),
        "H-REDIRECT-META": (f"{r}/to-metadata", "image_address_not_allowed"),
        "H-REDIRECT-FILE": (f"{r}/to-file", "image_address_not_allowed"),
    }
    root = make_catalog(tmp_path, {pid: ref for pid, (ref, _) in hostile.items()}
                        | {"G-CDN": f"{r}/ok.jpg", "G-ABS": f"{root_path}/img/g0.jpg"})
    os.symlink(elsewhere / "secret.jpg", root / "img" / "link.jpg")
    lake = tmp_path / "lake"
    cfg = load_config(overrides={
        "run": {"lake": f"file://{lake}", "catalog": str(root)},
        "clean": {"image_size": 32},
        "catalog": {"http_timeout": 0.3, "http_retries": 0, "http_allow_networks": [f"{ALLOWED_HOST}/32"]},
        "validate": {"max_quarantine_rate": 1.0},
    })
    ctx = RunContext(cfg, "2026-03-01")
    stats = run_pipeline(ctx, ["clean"])["clean"]

    quarantine = ctx.lake.read_partition("quarantine", ctx.date).to_pandas()
    clean = ctx.lake.read_partition("clean", ctx.date).to_pandas()
    assert dict(zip(quarantine["product_id"], quarantine["reason"])) == {
        pid: reason for pid, (_, reason) in hostile.items()}
    assert sorted(clean["product_id"]) == sorted([f"G{i:02d}" for i in range(GOOD)] + ["G-CDN", "G-ABS"])
    assert stats["clean_rows"] == GOOD + 2 and stats["quarantined_rows"] == len(hostile)

    # No request reached a refused address; the allowed host was asked once per redirect, and followed no further.
    assert sum(served.hits.values()) == 0, served.hits
    assert served6 is None or sum(served6.hits.values()) == 0, served6.hits
    assert all(redirector.hits[path] == 1 for path in ("/to-loopback", "/to-localhost", "/to-metadata", "/to-file"))

    details = dict(zip(quarantine["product_id"], quarantine["detail"]))
    assert "169.254.169.254, a link-local address" in details["H-METADATA"]
    assert "10.0.0.1, a private address" in details["H-PRIVATE"]
    assert "127.0.0.1, a loopback address" in details["H-REDIRECT"] and "redirected from" in details["H-REDIRECT"]
    assert "localhost is " in details["H-LOCALHOST"] and "a loopback address" in details["H-LOCALHOST"]

    # Nothing of any target anywhere in the lake: raw file bytes, and every value of every Parquet table decoded
    # (a compressed page could hide a string from the byte scan). An admitted photo would be there re-encoded: the
    # canonical JPEG of each target is looked for too.
    c = cfg.clean
    canonical = [canonicalize_image(data, c.image_size, c.max_image_bytes, c.max_image_pixels, c.jpeg_quality).data
                 for data in (secret_jpeg, servers["jpeg"])]
    needles = [secret_marker.encode(), servers["marker"].encode(), secret_jpeg, servers["jpeg"], b"hunter2",
               *canonical]
    files = [f for f in lake.rglob("*") if f.is_file()]
    assert files
    for f in files:
        data = f.read_bytes()
        assert not [n[:20] for n in needles if n in data], f
        if f.suffix == ".parquet":
            for column in pq.read_table(f).columns:
                for value in column.to_pylist():
                    blob = value if isinstance(value, bytes) else str(value).encode("utf-8", "surrogateescape")
                    assert not [n[:20] for n in needles if n in blob], (f, column)


@pytest.mark.integration
def test_a_night_the_gate_stops_for_photos_outside_the_sources_names_that_cause_and_its_setting(tmp_path):
    photos = tmp_path / "photos"  # a user's photo folder beside the catalog, not named in catalog.image_sources
    photos.mkdir()
    for i in range(10):
        (photos / f"p{i}.jpg").write_bytes(jpeg((i, 2, 3)))
    root = make_catalog(tmp_path, {f"P{i}": f"file://{photos}/p{i}.jpg" for i in range(10)})
    cfg = load_config(overrides={"run": {"lake": f"file://{tmp_path}/lake"}, "clean": {"image_size": 32}})
    from jobs.context import StageError

    with pytest.raises(StageError) as failed:  # 10 of 30 rows quarantined: over the 0.2 ceiling
        run_pipeline(RunContext(cfg, "2026-01-01", catalog=str(root)), ["clean", "validate"])
    assert "quarantined by the clean stage: image_source_not_allowed 10 (photos outside the catalog folder need " \
           "catalog.image_sources)" in str(failed.value), failed.value


def test_an_allowed_network_or_host_is_fetched(servers):
    served = servers["served"]
    url = f"http://127.0.0.1:{served.port}/served.jpg"
    assert fetch_image(url, 1.0, 0, 10**6, policy=AddressPolicy.from_settings([], ["127.0.0.0/8"])) == servers["jpeg"]
    assert fetch_image(url, 1.0, 0, 10**6, policy=AddressPolicy.from_settings(["127.0.0.1"], [])) == servers["jpeg"]
    by_name = f"http://localhost:{served.port}/served.jpg"
    assert fetch_image(by_name, 1.0, 0, 10**6, policy=AddressPolicy.from_settings(["localhost"], [])) == \
        servers["jpeg"]
    assert served.hits["/served.jpg"] == 3
    # The same URLs with nothing allowed: refused, and no further request.
    for refused in (url, by_name):
        with pytest.raises(ImageRejected) as err:
            fetch_image(refused, 1.0, 2, 10**6)
        assert err.value.reason == "image_address_not_allowed"
    assert served.hits["/served.jpg"] == 3


def test_a_redirect_from_an_allowed_host_to_another_allowed_one_is_followed(servers):
    served, redirector = servers["served"], servers["redirector"]
    policy = AddressPolicy.from_settings([], [f"{ALLOWED_HOST}/32", "127.0.0.1/32"])
    url = f"http://{ALLOWED_HOST}:{redirector.port}/to-loopback"
    assert fetch_image(url, 1.0, 0, 10**6, policy=policy) == servers["jpeg"]
    assert served.hits["/served.jpg"] == 1


def test_a_name_is_resolved_once_and_every_address_it_has_is_checked(servers, monkeypatch):
    """DNS rebinding: the name's first answer (an allowed address) is what is checked and connected to; a later
    answer (loopback, where a twin server listens on the same port) is never asked for. A name with any refused
    address among its answers is refused outright."""
    redirector = servers["redirector"]
    twin = Server("127.0.0.1", {"/ok.jpg": (200, {"Content-Type": "image/jpeg"}, servers["jpeg"])},
                  port=redirector.port)
    real = socket.getaddrinfo
    asked: Counter = Counter()

    def resolver(host, port, *args, **kwargs):  # an injected DNS fault: answers change between lookups
        asked[host] += 1
        if host == "rebind.example":
            ip = ALLOWED_HOST if asked[host] == 1 else "127.0.0.1"
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port))]
        if host == "mixed.example":
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ALLOWED_HOST, port)),
                    (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    policy = AddressPolicy.from_settings([], [f"{ALLOWED_HOST}/32"])
    try:
        with pytest.raises(ImageRejected) as err:
            fetch_image(f"http://mixed.example:{redirector.port}/ok.jpg", 0.5, 0, 10**6, policy=policy)
        assert err.value.reason == "image_address_not_allowed" and "127.0.0.1, a loopback" in err.value.detail
        assert redirector.hits["/ok.jpg"] == 0
        data = fetch_image(f"http://rebind.example:{redirector.port}/ok.jpg", 0.5, 0, 10**6, policy=policy)
        assert data != servers["jpeg"] and redirector.hits["/ok.jpg"] == 1
        assert asked["rebind.example"] == 1 and asked["mixed.example"] == 1
        assert sum(twin.hits.values()) == 0
    finally:
        twin.close()


@pytest.mark.parametrize("address, kind", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"), ("0.0.0.0", "unspecified"),
    ("::", "unspecified"), ("10.0.0.1", "private"), ("172.16.5.4", "private"), ("192.168.1.1", "private"),
    ("169.254.169.254", "link-local"), ("fe80::1", "link-local"), ("fd00:ec2::254", "private"),
    ("fec0::1", "site-local"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("240.0.0.1", "reserved"),
    ("255.255.255.255", "reserved"), ("100.64.0.1", "non-public"), ("192.0.2.1", "private"),
    ("::ffff:127.0.0.1", "loopback"), ("::ffff:169.254.169.254", "link-local"),
    ("2002:7f00:1::1", "loopback"), ("64:ff9b::a00:1", "private"),
    ("8.8.8.8", None), ("2606:4700:4700::1111", None), ("::ffff:8.8.8.8", None),
])
def test_address_kinds(address, kind):
    assert address_kind(ipaddress.ip_address(address)) == kind


def test_image_sources_let_a_named_folder_through_and_nothing_beside_it(tmp_path):
    photos, beside = tmp_path / "photos", tmp_path / "photos2"
    for folder in (photos, beside):
        folder.mkdir()
        (folder / "a.jpg").write_bytes(jpeg((1, 2, 3)))
    root = make_catalog(tmp_path, {
        "IN": f"file://{photos}/a.jpg",
        "BESIDE": f"file://{beside}/a.jpg",
        "OUT-AGAIN": f"file://{photos}/../photos2/a.jpg",
        # an absolute path is read as its file:// URI is
        "ABS-IN": f"{photos}/a.jpg", "ABS-ROOT": f"{tmp_path}/catalog/img/g0.jpg",
        "ABS-BESIDE": f"{beside}/a.jpg", "ABS-OUT-AGAIN": f"{photos}/../photos2/a.jpg",
        "ABS-ENVIRON": "/proc/self/environ", "WINDOWS": "C:\\export\\img\\a.jpg",
    })
    cfg = load_config(overrides={"catalog": {"image_sources": [f"file://{photos}/"]}, "clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert {"IN", "ABS-IN", "ABS-ROOT"} <= set(result.clean["product_id"]) and len(result.clean) == GOOD + 3
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "BESIDE": "image_source_not_allowed", "OUT-AGAIN": "image_source_not_allowed",
        "ABS-BESIDE": "image_source_not_allowed", "ABS-OUT-AGAIN": "image_source_not_allowed",
        "ABS-ENVIRON": "image_source_not_allowed", "WINDOWS": "image_path_escapes_root"}


def test_a_named_pipe_named_as_a_photo_is_quarantined_not_waited_on(tmp_path):
    root = make_catalog(tmp_path, {"PIPE": "img/p.jpg", "PIPE-URI": f"file://{tmp_path}/catalog/img/p.jpg",
                                   "PIPE-ABS": f"{tmp_path}/catalog/img/p.jpg"})
    os.mkfifo(root / "img" / "p.jpg")  # opened for reading, it blocks until a writer comes: none ever does
    cfg = load_config(overrides={"clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(clean_catalog(reader.read(), reader.read_image, cfg.clean)),
                              daemon=True)
    worker.start()
    worker.join(30)
    if not done:  # let the blocked open end before failing
        os.close(os.open(root / "img" / "p.jpg", os.O_WRONLY | os.O_NONBLOCK))
    assert done, "the clean step blocked opening a named pipe"
    result = done[0]
    assert len(result.clean) == GOOD
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "PIPE": "image_reference_invalid", "PIPE-URI": "image_reference_invalid", "PIPE-ABS": "image_reference_invalid"}


def test_a_link_loop_and_malformed_s3_uris_are_quarantined_not_a_failed_night(tmp_path):
    root = make_catalog(tmp_path, {
        "LOOP": "img/loop.jpg", "LOOP-URI": f"file://{tmp_path}/catalog/img/loop.jpg",
        "LOOP-ABS": f"{tmp_path}/catalog/img/loop.jpg",
        "S3-NO-BUCKET": "s3:///media/products/a.jpg", "S3-EMPTY-SEGMENT": "s3://media/products//a.jpg"})
    os.symlink(root / "img" / "loop.jpg", root / "img" / "loop.jpg")  # resolving it never ends
    cfg = load_config(overrides={"clean": {"image_size": 32}, "catalog": {"image_sources": ["s3://media/products/"]}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert len(result.clean) == GOOD
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "LOOP": "image_missing", "LOOP-URI": "image_reference_invalid", "LOOP-ABS": "image_reference_invalid",
        "S3-NO-BUCKET": "image_reference_invalid", "S3-EMPTY-SEGMENT": "image_reference_invalid"}


def test_file_uris_are_read_percent_decoded_and_in_any_case_and_stay_inside_the_sources(tmp_path):
    photos, beside = tmp_path / "my photos", tmp_path / "photos2"
    for folder in (photos, beside):
        folder.mkdir()
    (photos / "café.jpg").write_bytes(jpeg((1, 2, 3)))
    (photos / "100%.jpg").write_bytes(jpeg((4, 5, 6)))  # a literal % in a name that exists as written
    (beside / "b.jpg").write_bytes(jpeg((7, 8, 9)))
    root = make_catalog(tmp_path, {
        "ENCODED": (photos / "café.jpg").as_uri(),  # file:///.../my%20photos/caf%C3%A9.jpg
        "AS-WRITTEN": f"file://{photos}/café.jpg",
        "UPPER-SCHEME": f"FILE://{photos}/café.jpg",
        "LITERAL-PERCENT": f"file://{photos}/100%.jpg",
        "ENCODED-ESCAPE": f"file://{photos.as_uri()[7:]}/..%2F..%2Fphotos2/b.jpg",
        "ENCODED-NUL": f"file://{photos}/x%00.jpg",
        "ENCODED-NOT-UTF8": f"file://{photos}/%C3%28.jpg",
        "UPPER-OUTSIDE": "FILE:///etc/hostname",
        "DATA-URI": "\"data:image/png;base64,iVBORw0KGgo=\"",  # quoted: the comma is the URI's
    })
    cfg = load_config(overrides={"catalog": {"image_sources": [f"file://{photos}/"]}, "clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert {"ENCODED", "AS-WRITTEN", "UPPER-SCHEME", "LITERAL-PERCENT"} <= set(result.clean["product_id"])
    assert len(result.clean) == GOOD + 4
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "ENCODED-ESCAPE": "image_source_not_allowed", "ENCODED-NUL": "image_reference_invalid",
        "ENCODED-NOT-UTF8": "image_reference_invalid",
        "UPPER-OUTSIDE": "image_source_not_allowed", "DATA-URI": "image_unsupported_uri"}


def test_relative_references_written_as_url_paths_are_read_decoded_and_stay_inside_the_root(tmp_path):
    """"img/red%20shirt.jpg" is img/red shirt.jpg when only that exists; a name with a literal % is read as written;
    decoded, a reference is checked as any other: ..%2F climbs out of nothing, %00 is refused."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "secret.jpg").write_bytes(jpeg((250, 250, 0)))
    root = make_catalog(tmp_path, {
        "SPACE": "img/red%20shirt.jpg",
        "UTF8": "img/caf%C3%A9.jpg",
        "LITERAL-PERCENT": "img/100%25.jpg",  # the file's name is "100%25.jpg" as written
        "ESCAPE": "img/..%2F..%2Felsewhere/secret.jpg",
        "ESCAPE-BACKSLASH": "img%5C..%5C..%5Celsewhere%5Csecret.jpg",
        "NUL": "img/x%00.jpg",
        "NOT-UTF8": "img/%FF.jpg",  # no file name: bytes that are no text once decoded
        "ABSENT": "img/blue%20shirt.jpg",
    })
    (root / "img" / "red shirt.jpg").write_bytes(jpeg((200, 10, 10)))
    (root / "img" / "café.jpg").write_bytes(jpeg((20, 10, 10)))
    (root / "img" / "100%25.jpg").write_bytes(jpeg((40, 10, 10)))
    (root / "img" / "100%.jpg").write_bytes(jpeg((60, 10, 10)))  # what the decoded name would read instead
    cfg = load_config(overrides={"clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    assert reader.read_image("img/100%25.jpg") == (root / "img" / "100%25.jpg").read_bytes()
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert {"SPACE", "UTF8", "LITERAL-PERCENT"} <= set(result.clean["product_id"]) and len(result.clean) == GOOD + 3
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "ESCAPE": "image_path_escapes_root", "ESCAPE-BACKSLASH": "image_path_escapes_root",
        "NUL": "image_reference_invalid", "NOT-UTF8": "image_reference_invalid", "ABSENT": "image_missing"}


@pytest.mark.integration
def test_s3_image_sources_let_a_named_prefix_through(tmp_path, s3_config):
    from matcher.io.storage import resolve_uri, write_bytes

    for key in ("media/products/a.jpg", "media/other/b.jpg"):
        fs, path = resolve_uri(f"s3://lake/{key}", s3_config.storage)
        write_bytes(fs, path, jpeg((9, 9, 9)))
    root = make_catalog(tmp_path, {
        "IN": "s3://lake/media/products/a.jpg",
        "OTHER": "s3://lake/media/other/b.jpg",
        "DOTDOT": "s3://lake/media/products/../other/b.jpg",
        "ESCAPED": "s3://lake/media/products/%2E%2E/other/b.jpg",
    })
    cfg = s3_config.with_overrides({"catalog": {"image_sources": ["s3://lake/media/products/"]},
                                    "clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert "IN" in set(result.clean["product_id"]) and len(result.clean) == GOOD + 1
    assert dict(zip(result.quarantine["product_id"], result.quarantine["reason"])) == {
        "OTHER": "image_source_not_allowed", "DOTDOT": "image_source_not_allowed",
        "ESCAPED": "image_source_not_allowed"}


def test_http_images_can_be_switched_off(tmp_path, servers):
    root = make_catalog(tmp_path, {"WEB": f"http://{ALLOWED_HOST}:{servers['redirector'].port}/ok.jpg"})
    cfg = load_config(overrides={"catalog": {"http_images": False, "http_allow_networks": [f"{ALLOWED_HOST}/32"]},
                                 "clean": {"image_size": 32}})
    reader = CatalogReader(str(root), cfg.storage, cfg.catalog)
    result = clean_catalog(reader.read(), reader.read_image, cfg.clean)
    assert result.quarantine[["product_id", "reason"]].values.tolist() == [["WEB", "image_source_not_allowed"]]
    assert servers["redirector"].hits["/ok.jpg"] == 0


@pytest.mark.parametrize("key, value, message", [
    ("http_allow_networks", ["10.0.0.0/33"], "http_allow_networks"),
    ("http_allow_networks", ["cdn.example.com"], "http_allow_networks"),
    ("http_allow_hosts", ["http://cdn.example.com/"], "http_allow_hosts"),
    ("image_sources", ["https://cdn.example.com/"], "image_sources"),
    ("image_sources", ["file://relative/photos"], "image_sources"),
    ("image_sources", ["s3:///no-bucket"], "image_sources"),
])
def test_bad_image_source_settings_fail_when_the_config_loads(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"catalog": {key: value}})
