"""Image bytes from http(s) URLs (catalogs whose photos sit on a web server or CDN), with the image quarantine's
reasons: a page that is gone is image_missing, a server that keeps failing is image_unreadable, and an address the
config does not allow (the machine itself, a private network, the cloud metadata service) is image_address_not_allowed
before a byte is sent to it.

Every connection, the first and each redirect's, goes to an address checked here: the host name is resolved once
a request, every address it resolves to is checked, and the socket connects to that very address (the name is kept
for the Host header and TLS), so a name that resolves to a public address when checked and to 127.0.0.1 when
connected (DNS rebinding) cannot slip through. Redirects are followed here, not by urllib3, so each target is checked
the same way. Proxies (http_proxy and the like) are not used: through a proxy the address reached could not be
checked.

urllib3 carries the requests: one connection pool per host and checked address, so the photos of one CDN reuse their
TCP (and TLS) connections instead of opening one each. A busy server's Retry-After is honoured (up to
RETRY_AFTER_CAP seconds), and the back-off between tries is jittered, so that many executors failing together do not
ask again together."""
from __future__ import annotations

import http.client
import ipaddress
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Callable, Iterator

import urllib3
import urllib3.connection
from urllib3.exceptions import HTTPError as Urllib3Error
from urllib3.exceptions import InvalidHeader

from matcher import __version__
from matcher.config import is_ip_literal
from matcher.steps.images import ImageRejected
from matcher.steps.quarantine import Reason

# Statuses worth asking again: the server is busy or failing for now, not refusing this image.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_GONE_STATUSES = frozenset({404, 410})
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_USER_AGENT = f"matcher/{__version__} (catalog image fetch)"
_HEADERS = {"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5", "Accept-Encoding": "identity"}
_URL_SAFE = ":/?#[]@!$&'()*+,;=%~"  # existing escapes and URL syntax stay as they are
MAX_REDIRECTS = 5
# A body must arrive within this many request timeouts: the timeout bounds each socket read, so a server that
# trickles a byte now and then would otherwise hold an image thread for hours.
BODY_DEADLINE_TIMEOUTS = 3
RETRY_AFTER_CAP = 30.0  # seconds: a server asking for longer holds an image thread no longer than this a try
MAX_POOLS = 64  # hosts (each address apart) whose connections are kept open, least recently used dropped first
POOL_CONNECTIONS = 8  # kept open per host and address: about an executor's image threads

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def address_kind(ip: IPAddress) -> str | None:
    """Why `ip` is not a public internet address ("loopback", "private", "link-local"...), or None when it is.
    IPv6 addresses that carry an IPv4 one (IPv4-mapped, 6to4, Teredo, NAT64) are judged by it as well."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped:  # ::ffff:a.b.c.d is a.b.c.d itself
            return address_kind(ip.ipv4_mapped)
        embedded = [ip.sixtofour, ip.teredo[1] if ip.teredo else None,
                    ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF) if ip in _NAT64 else None]
        for inner in embedded:
            if inner is not None and (kind := address_kind(inner)):
                return kind
    for kind, test in (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
                       ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("site-local", getattr(ip, "is_site_local", False)),
                       ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if test:
            return kind
    return None if ip.is_global else "non-public"  # e.g. 100.64.0.0/10, carrier-grade NAT


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses http(s) image references may reach: public ones, plus the host names and networks a
    deployment names (a company CDN on a private network). A named host may resolve to any address."""
    allow_hosts: tuple[str, ...] = ()         # lower-case names; "*.cdn.example.com" allows its sub-domains
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, hosts: list[str], networks: list[str]) -> "AddressPolicy":
        """From catalog.http_allow_hosts and catalog.http_allow_networks (checked when the config loads)."""
        return cls(tuple(h.strip().lower().rstrip(".") for h in hosts),
                   tuple(ipaddress.ip_network(n.strip(), strict=False) for n in networks))

    def refusal(self, host: str, ip: IPAddress) -> str | None:
        """None when `host`, at `ip`, may be reached; else what kind of address it is."""
        if self._host_allowed(host):
            return None
        candidates = [ip, ip.ipv4_mapped] if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else [ip]
        if any(a in net for a in candidates for net in self.allow_networks if a.version == net.version):
            return None
        return address_kind(ip)

    def _host_allowed(self, host: str) -> bool:
        host = host.lower().rstrip(".")
        return any(host == allowed or (allowed.startswith("*.") and host.endswith(allowed[1:]))
                   for allowed in self.allow_hosts)


PUBLIC_ONLY = AddressPolicy()
_TLS = ssl.create_default_context()


class _Retry(Exception):
    """A failure worth asking again (a busy server, a timeout); its message is the quarantine detail."""

    def __init__(self, problem: str, retry_after: float | None = None):
        super().__init__(problem)
        self.retry_after = retry_after  # seconds the server asked for (Retry-After), if it did


def fetch_image(url: str, timeout: float, retries: int, max_bytes: int, backoff: float = 0.5,
                policy: AddressPolicy = PUBLIC_ONLY) -> bytes:
    """The body of `url`, asked again up to `retries` times (backing off) on timeouts, refused connections and
    busy or failing servers. A body over `max_bytes` is not read further (image_too_large). An address `policy`
    refuses, the URL's or a redirect's, is image_address_not_allowed, never connected to and never retried."""
    # Non-ASCII paths (a Chinese file name) are percent-encoded as a browser does; existing escapes stay as they are.
    url = urllib.parse.quote(url, safe=_URL_SAFE)
    for attempt in range(retries + 1):
        retry_after = None
        try:
            return _follow(url, timeout, max_bytes, policy)
        except _Retry as exc:
            problem, retry_after = str(exc), exc.retry_after
        except (OSError, http.client.HTTPException, Urllib3Error) as exc:  # timeouts, refused or dropped, DNS, TLS
            problem = f"{type(exc).__name__}: {exc} at {url[:200]}"
        except (ValueError, LookupError, TypeError) as exc:  # an answer the parsers choke on: the row's, not the task's
            # Logged whole: a bug of ours would surface here as well, not only in the quarantine.
            logging.getLogger("matcher").warning("an http image answer that could not be read: %s", url[:200],
                                                 exc_info=True)
            raise ImageRejected(Reason.IMAGE_UNREADABLE,
                                f"an answer that could not be read ({type(exc).__name__}: {exc}) at {url[:200]}"
                                [:400]) from None
        if attempt < retries:
            time.sleep(retry_pause(attempt, backoff, retry_after))
    raise ImageRejected(Reason.IMAGE_UNREADABLE, f"{problem} (after {retries + 1} tries)")


def retry_pause(attempt: int, backoff: float, retry_after: float | None = None) -> float:
    """Seconds to wait before try `attempt` + 2: exponential back-off with equal jitter (between half and all of
    `backoff` * 2**attempt, so clients that failed together spread out), or longer when the server asked for it
    (Retry-After, at most RETRY_AFTER_CAP)."""
    jittered = backoff * 2 ** attempt * (0.5 + random.random() / 2)  # noqa: S311 - spreading retries, not secrets
    return max(jittered, min(retry_after or 0.0, RETRY_AFTER_CAP))


def parse_retry_after(value: str | None) -> float | None:
    """A Retry-After header (seconds or an HTTP date) in seconds from now, None when absent or unreadable."""
    if not value:
        return None
    try:
        return urllib3.Retry(retry_after_max=RETRY_AFTER_CAP).parse_retry_after(value)
    except (InvalidHeader, ValueError, OverflowError):  # a date Python cannot hold (year 99999) as well
        return None


def _follow(url: str, timeout: float, max_bytes: int, policy: AddressPolicy) -> bytes:
    """GET `url`, following up to MAX_REDIRECTS redirects, each to a checked address, all within one deadline of
    BODY_DEADLINE_TIMEOUTS timeouts: each hop's waits are cut to what is left of it (a chain of slow redirects, or a
    name with many slow addresses, held a thread for every hop and address in turn)."""
    origin = url
    deadline = time.monotonic() + BODY_DEADLINE_TIMEOUTS * timeout
    for _ in range(MAX_REDIRECTS + 1):
        status, location, body = _get(url, timeout, max_bytes, policy, origin, deadline)
        if location is None:
            return body
        try:
            url = urllib.parse.urljoin(url, urllib.parse.quote(location, safe=_URL_SAFE))
        except ValueError as exc:  # the server's Location is no URL (`http://[::1`)
            raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID,
                                f"{origin[:200]} redirects to {location[:200]!r}: {exc}") from None
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme not in ("http", "https"):
            raise ImageRejected(Reason.IMAGE_ADDRESS_NOT_ALLOWED,
                                f"{origin[:200]} redirects to a {scheme or 'schemeless'}: URL; "
                                "only http(s) is followed")
    raise ImageRejected(Reason.IMAGE_UNREADABLE, f"more than {MAX_REDIRECTS} redirects from {origin[:200]}")


def _get(url: str, timeout: float, max_bytes: int, policy: AddressPolicy, origin: str,
         deadline: float) -> tuple[int, str | None, bytes]:
    """One request, done by `deadline` (monotonic): (status, redirect location or None, body). Raises
    ImageRejected, _Retry or a network error."""
    scheme, host, port, target = _parts(url)
    via = "" if url == origin else f" (redirected from {origin[:200]})"
    addresses = _resolve(host, port)
    for ip in addresses:  # every address the name has, so that no order of them reaches a refused one
        kind = policy.refusal(host, ip)
        if kind:
            article = "an" if kind[0] in "aeiou" else "a"
            raise ImageRejected(Reason.IMAGE_ADDRESS_NOT_ALLOWED,
                                f"{url[:200]}{via}: {host} is {ip}, {article} {kind} address; allow it with "
                                "catalog.http_allow_hosts or catalog.http_allow_networks")
    last_error: Exception | None = None
    for ip in addresses:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer in time ({BODY_DEADLINE_TIMEOUTS} timeouts, redirects and addresses "
                               f"included) at {url[:200]}{via}")
        wait = min(timeout, left)  # a later hop or address has what is left of the deadline, up to a timeout
        try:
            response = _pool(scheme, host, port, ip, policy).urlopen(
                "GET", target, headers=_HEADERS, retries=False, redirect=False, preload_content=False,
                assert_same_host=False, enforce_content_length=False,
                timeout=urllib3.Timeout(connect=wait, read=wait))
        except (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError) as exc:
            last_error = exc  # this address refuses or times out: the name's next one may answer
            continue
        body_cut = getattr(response, "body_cut_handle", None)
        try:
            # The deadline is checked between reads; a read inside http.client (a chunk's size line, trailer
            # lines: neither bounded by the size cap) is ended by shutting the socket at the deadline.
            with _cut_off_after(max(deadline - time.monotonic(), 0.001), lambda cut=body_cut: cut, "the body"):
                answer = _answer(response, url, via, max_bytes, deadline)
        except BaseException:
            response.close()  # a half-read body: the connection cannot serve another request
            response.release_conn()
            raise
        finally:
            if body_cut is not None:
                body_cut.close()
        response.release_conn()  # read to its end: back to the pool for the host's next photo
        return answer
    raise last_error if last_error else OSError(f"{host} has no address")


_POOLS: OrderedDict[tuple, urllib3.HTTPConnectionPool] = OrderedDict()
_POOLS_LOCK = threading.Lock()


def _pool(scheme: str, host: str, port: int, ip: IPAddress, policy: AddressPolicy) -> urllib3.HTTPConnectionPool:
    """The connection pool of `host` at the checked address `ip`: its connections go nowhere else."""
    key = (scheme, host, port, ip, policy)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is not None:
            _POOLS.move_to_end(key)
            return pool
        cls = _CheckedHTTPSPool if scheme == "https" else _CheckedHTTPPool
        extra = {"ssl_context": _TLS} if scheme == "https" else {}
        pool = cls(host, port, maxsize=POOL_CONNECTIONS, block=False, retries=False, checked_ip=ip, policy=policy,
                   **extra)
        _POOLS[key] = pool
        while len(_POOLS) > MAX_POOLS:
            _POOLS.popitem(last=False)[1].close()
        return pool


def _answer(response: urllib3.BaseHTTPResponse, url: str, via: str,
            max_bytes: int, deadline: float) -> tuple[int, str | None, bytes]:
    status = response.status
    if status in _REDIRECT_STATUSES:
        location = response.headers.get("Location", "").strip()
        if not location:
            raise ImageRejected(Reason.IMAGE_UNREADABLE, f"HTTP {status} without a Location at {url[:200]}{via}")
        return status, location, b""
    problem = f"HTTP {status} at {url[:200]}{via}"
    if status in _GONE_STATUSES:
        raise ImageRejected(Reason.IMAGE_MISSING, problem)
    if status in _RETRY_STATUSES:
        raise _Retry(problem, parse_retry_after(response.headers.get("Retry-After")))
    if not 200 <= status < 300:
        raise ImageRejected(Reason.IMAGE_UNREADABLE, problem)
    length = response.headers.get("Content-Length", "")
    expected = int(length) if length.isascii() and length.isdigit() else None  # "²".isdigit(), but no int
    if expected is not None and expected > max_bytes:
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"{expected} bytes > {max_bytes} at {url[:200]}")
    chunks, size = [], 0
    while size <= max_bytes:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the body did not arrive in time ({size} bytes read) at {url[:200]}{via}")
        chunk = response.read1(min(1 << 16, max_bytes + 1 - size), decode_content=False)  # what has arrived
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    if len(data) > max_bytes:
        raise ImageRejected(Reason.IMAGE_TOO_LARGE, f"more than {max_bytes} bytes at {url[:200]}")
    if expected is not None and len(data) < expected:  # the connection dropped mid-body
        raise http.client.IncompleteRead(data, expected - len(data))
    return status, None, data


def _parts(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, request target) of an http(s) URL; image_reference_invalid when it has none."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
        host = parts.hostname or ""
        if host and not is_ip_literal(host):
            host = host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as exc:
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"{exc}: {url[:200]}"[:300]) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not host:
        raise ImageRejected(Reason.IMAGE_REFERENCE_INVALID, f"not an http(s) URL with a host: {url[:200]}")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return scheme, host, port or (443 if scheme == "https" else 80), target


def _resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, once, in the resolver's order (an IP literal is itself)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%", 1)[0])  # a link-local address's %zone is not the address
        if ip not in addresses:
            addresses.append(ip)
    return addresses


def _connect(host: str, ip: IPAddress, port: int, timeout: float, policy: AddressPolicy) -> socket.socket:
    """A socket connected to exactly `ip`, whose peer is checked again before anything is sent."""
    sock = socket.create_connection((str(ip), port), timeout)
    try:
        peer = ipaddress.ip_address(sock.getpeername()[0].split("%", 1)[0])
        kind = policy.refusal(host, peer)
        if peer != ip or kind:
            raise ImageRejected(Reason.IMAGE_ADDRESS_NOT_ALLOWED,
                                f"{host}:{port} connected to {peer}, not the checked {ip}"
                                + (f" ({kind})" if kind else ""))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def _cut_off_after(seconds: float | None, sock: Callable[[], socket.socket | None], what: str) -> Iterator[None]:
    """Shut the socket down if the block outlasts `seconds` (the blocked read then ends), and raise TimeoutError:
    what was read before the cut (headers without their end) is not an answer."""
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        current = sock()
        if current is not None:
            with suppress(OSError):
                current.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, cut) if seconds else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        yield
    except Exception:
        if not fired.is_set():
            raise
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()  # a cut under way ends before the caller may close the handle it shuts
    if fired.is_set():
        raise TimeoutError(f"{what} did not arrive in time ({seconds:.1f} s)")


class _Deadlines:
    """Connecting (TLS included) and the response's status and headers, each within BODY_DEADLINE_TIMEOUTS
    timeouts: the timeout bounds each wait, so a server trickling a byte before each would hold a thread for good.
    The cut goes through a duplicate of the connection's socket: TLS detaches the socket it wraps."""
    _cut_handle: socket.socket | None = None
    timeout: object

    def _within_deadline(self, what: str):
        seconds = BODY_DEADLINE_TIMEOUTS * self.timeout if isinstance(self.timeout, (int, float)) else None
        return _cut_off_after(seconds, lambda: self._cut_handle, what)

    def _keep_cut_handle(self, sock: socket.socket) -> socket.socket:
        self._drop_cut_handle()
        self._cut_handle = sock.dup()
        return sock

    def _drop_cut_handle(self) -> None:
        if self._cut_handle is not None:
            self._cut_handle.close()
            self._cut_handle = None

    def close(self) -> None:
        self._drop_cut_handle()
        super().close()  # type: ignore[misc]

    def connect(self) -> None:
        with self._within_deadline("the connection"):
            super().connect()  # type: ignore[misc]

    def getresponse(self, *args, **kwargs):
        # The body's deadline needs a handle of its own: a response that ends the connection (HTTP/1.0, "Connection:
        # close") closes the connection, and its handle with it, before the body is read. The caller closes it.
        body_cut = self._cut_handle.dup() if self._cut_handle is not None else None
        try:
            with self._within_deadline("the response's headers"):
                response = super().getresponse(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            if body_cut is not None:
                body_cut.close()
            raise
        response.body_cut_handle = body_cut
        return response


class _CheckedHTTPConnection(_Deadlines, urllib3.connection.HTTPConnection):
    """An HTTP connection to a checked address; the Host header still names the host."""

    def __init__(self, *args, checked_ip: IPAddress, policy: AddressPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_ip, self.policy = checked_ip, policy

    def _new_conn(self) -> socket.socket:
        try:
            return self._keep_cut_handle(_connect(self.host, self.checked_ip, self.port, self.timeout, self.policy))
        except TimeoutError as exc:
            raise urllib3.exceptions.ConnectTimeoutError(self, f"connecting to {self.host} timed out") from exc
        except OSError as exc:
            raise urllib3.exceptions.NewConnectionError(self, f"{type(exc).__name__}: {exc}") from exc


class _CheckedHTTPSConnection(_Deadlines, urllib3.connection.HTTPSConnection):
    """An HTTPS connection to a checked address; SNI and the certificate check use the host name."""

    def __init__(self, *args, checked_ip: IPAddress, policy: AddressPolicy, **kwargs):
        super().__init__(*args, **kwargs)
        self.checked_ip, self.policy = checked_ip, policy

    _new_conn = _CheckedHTTPConnection._new_conn


class _CheckedHTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _CheckedHTTPConnection


class _CheckedHTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _CheckedHTTPSConnection
