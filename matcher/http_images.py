"""Image bytes from http(s) URLs (catalogs whose photos sit on a web server or CDN), with the image quarantine's
reasons: a page that is gone is image_missing, a server that keeps failing is image_unreadable."""
from __future__ import annotations

import http.client
import time
import urllib.error
import urllib.parse
import urllib.request

from matcher import __version__
from matcher.images import ImageRejected

# Statuses worth asking again: the server is busy or failing for now, not refusing this image.
_RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_GONE_STATUSES = frozenset({404, 410})
_USER_AGENT = f"matcher/{__version__} (catalog image fetch)"


def fetch_image(url: str, timeout: float, retries: int, max_bytes: int, backoff: float = 0.5) -> bytes:
    """The body of `url`, asked again up to `retries` times (backing off) on timeouts, refused connections and
    busy or failing servers. A body over `max_bytes` is not read further (image_too_large)."""
    # Non-ASCII paths (a Chinese file name) are percent-encoded as a browser does; existing escapes stay as they are.
    quoted = urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~")
    request = urllib.request.Request(quoted, headers={"User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"})
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                length = response.headers.get("Content-Length", "")
                expected = int(length) if length.isdigit() else None
                if expected is not None and expected > max_bytes:
                    raise ImageRejected("image_too_large", f"{expected} bytes > {max_bytes} at {url[:200]}")
                data = response.read(max_bytes + 1)
                if len(data) > max_bytes:
                    raise ImageRejected("image_too_large", f"more than {max_bytes} bytes at {url[:200]}")
                if expected is not None and len(data) < expected:  # the connection dropped mid-body
                    raise http.client.IncompleteRead(data, expected - len(data))
                return data
        except urllib.error.HTTPError as exc:
            if exc.code in _GONE_STATUSES:
                raise ImageRejected("image_missing", f"HTTP {exc.code} at {url[:200]}") from None
            problem = f"HTTP {exc.code} at {url[:200]}"
            if exc.code not in _RETRY_STATUSES:
                raise ImageRejected("image_unreadable", problem) from None
        except ValueError as exc:  # a URL urllib cannot even parse
            raise ImageRejected("image_reference_invalid", f"{exc}"[:200]) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, refused or dropped connections, TLS
            reason = getattr(exc, "reason", exc)
            problem = f"{type(reason).__name__}: {reason} at {url[:200]}"
        if attempt < retries:
            time.sleep(backoff * 2 ** attempt)
    raise ImageRejected("image_unreadable", f"{problem} (after {retries + 1} tries)")
