"""Images named by http(s) URL, fetched inside the task that ingests them, safely and politely.

A URL list is how web-scale image sets are distributed, and its hosts fail in every way: gone
(404), slow, rate limiting (429 with Retry-After), redirecting in loops, or serving something huge.
``fetch`` turns each of those into a :class:`FetchError` whose ``code`` comes from a small fixed set
(``http_404`` ... ``http_4xx``/``http_5xx`` for uncommon statuses, ``timeout``, ``too_large``,
``too_many_redirects``, ``connection_failed``, ``dns_failed``, ``tls_failed``, ``refused_scheme``,
``refused_address``) and whose reason names the URL and the status, so the ingest reports it as a
reject instead of failing. Connection errors, timeouts, 5xx and 429 are retried with exponential
backoff (a 429's or 503's Retry-After is honoured, capped); other statuses are final.

A manifest is input from anywhere, so a URL must not reach into the ingest's own network: only
http and https, and by default only globally routable addresses (no loopback, private,
link-local - the cloud metadata service at 169.254.169.254 - multicast or reserved ones). The
host is resolved once and the connection made to the checked address (so a DNS answer cannot
change between check and use), and every redirect hop is checked again. ``allow_private``
opts in to loopback and private networks (an intranet image server, or the tests' local server);
link-local and multicast addresses stay refused even then.

Politeness: at most ``per_host`` requests to one host at a time in a process, whatever the
number of threads loading the shard (``IngestConfig.load_threads``), and one connection pool per
(host, address).
"""

from __future__ import annotations

import email.utils
import ipaddress
import socket
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import urllib3

from system.config import option

_COMMON_STATUS = {400, 401, 403, 404, 405, 406, 408, 410, 429, 451, 500, 502, 503, 504}
_REDIRECTS = {301, 302, 303, 307, 308}
_USER_AGENT = "clustercam-ingest/1"


@dataclass
class FetchConfig:
    """How http(s) images of a manifest are fetched."""

    timeout_s: float = option(20.0, doc="seconds for a connection, each read, and a whole download")
    max_bytes: int = option(50_000_000, doc="an image larger than this is a reject (too_large)")
    max_redirects: int = option(5, doc="redirects followed per URL (each hop's address is checked again)")
    attempts: int = option(4, doc="tries of a URL on connection errors, timeouts, 5xx and 429")
    backoff_s: float = option(0.5, doc="first retry delay, doubled each try (a Retry-After header wins, capped)")
    max_backoff_s: float = option(30.0, doc="cap on one retry delay, Retry-After included")
    per_host: int = option(4, doc="requests to one host at a time per ingest process")
    allow_private: bool = option(
        False, doc="fetch from loopback and private addresses too (link-local ones, metadata services, never)"
    )


class FetchError(ValueError):
    """A URL that gave no image: ``code`` from the fixed set above, the message names the URL and status."""

    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code


def is_url(location: str) -> bool:
    return location[:8].lower().startswith(("http://", "https://"))


class _Retry(Exception):
    """A transient failure: worth another try after ``delay`` (None: the usual backoff)."""

    def __init__(self, code: str, reason: str, delay: float | None = None):
        super().__init__(reason)
        self.code, self.delay = code, delay


_lock = threading.Lock()
_hosts: dict[str, threading.BoundedSemaphore] = {}
_pools: dict[tuple, urllib3.HTTPConnectionPool] = {}


def _host_slot(host: str, limit: int) -> threading.BoundedSemaphore:
    with _lock:
        return _hosts.setdefault(f"{host}/{limit}", threading.BoundedSemaphore(limit))


def _pool(scheme: str, host: str, address: str, port: int, cfg: FetchConfig) -> urllib3.HTTPConnectionPool:
    key = (scheme, host, address, port, cfg.timeout_s, cfg.per_host)
    with _lock:
        pool = _pools.get(key)
        if pool is None:
            timeout = urllib3.Timeout(connect=cfg.timeout_s, read=cfg.timeout_s)
            common = {"port": port, "timeout": timeout, "maxsize": cfg.per_host, "retries": False}
            if scheme == "https":
                pool = urllib3.HTTPSConnectionPool(
                    address, server_hostname=host, assert_hostname=host, cert_reqs="CERT_REQUIRED", **common
                )
            else:
                pool = urllib3.HTTPConnectionPool(address, **common)
            _pools[key] = pool
        return pool


def check_address(address: str, allow_private: bool) -> None:
    """Refuse an address the ingest must not reach: link-local (metadata services) and multicast always,
    loopback, private and reserved ones unless ``allow_private``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    if ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        raise FetchError("refused_address", f"address {ip} is link-local, multicast or unspecified: never fetched")
    if not allow_private and not ip.is_global:
        raise FetchError(
            "refused_address",
            f"address {ip} is not public (loopback, private or reserved); "
            "set source.fetch.allow_private=true to fetch from private networks",
        )


def _resolve(host: str, port: int, allow_private: bool) -> str:
    """One checked address of ``host``: every address it resolves to must pass, not just the first."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_AGAIN,):
            raise _Retry("dns_failed", f"cannot resolve {host} ({exc})") from None
        raise FetchError("dns_failed", f"cannot resolve {host} ({exc})") from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        check_address(address, allow_private)
    return addresses[0]


def _status_code(status: int) -> str:
    if status in _COMMON_STATUS:
        return f"http_{status}"
    return f"http_{status // 100}xx"


def _retry_after(value: str | None, cap: float) -> float | None:
    if not value:
        return None
    try:
        return min(cap, max(0.0, float(value)))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(cap, max(0.0, when.timestamp() - time.time()))


def _body(response: urllib3.BaseHTTPResponse, url: str, cfg: FetchConfig, deadline: float) -> bytes:
    length = response.headers.get("Content-Length")
    if length and length.isdigit() and int(length) > cfg.max_bytes:
        raise FetchError("too_large", f"{url}: {int(length):,} bytes (Content-Length) > max_bytes {cfg.max_bytes:,}")
    chunks, size = [], 0
    for chunk in response.stream(1 << 16):
        size += len(chunk)
        if size > cfg.max_bytes:
            raise FetchError("too_large", f"{url}: more than max_bytes {cfg.max_bytes:,} bytes")
        if time.monotonic() > deadline:
            raise _Retry("timeout", f"{url}: download not finished within {cfg.timeout_s:g} s")
        chunks.append(chunk)
    return b"".join(chunks)


def _once(url: str, cfg: FetchConfig) -> bytes:
    """One try, following redirects, each hop checked as the first was."""
    deadline = time.monotonic() + cfg.timeout_s
    current = url
    for _ in range(cfg.max_redirects + 1):
        parts = urlsplit(current)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise FetchError("refused_scheme", f"{url}: only http(s) URLs are fetched, not {current[:200]!r}")
        port = parts.port or (443 if scheme == "https" else 80)
        address = _resolve(parts.hostname, port, cfg.allow_private)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        headers = {"Host": host_header, "User-Agent": _USER_AGENT, "Accept": "image/*,*/*;q=0.5"}
        with _host_slot(parts.hostname, cfg.per_host):
            try:
                response = _pool(scheme, parts.hostname, address, port, cfg).urlopen(
                    "GET", path, headers=headers, redirect=False, preload_content=False, assert_same_host=False
                )
            except urllib3.exceptions.NewConnectionError as exc:  # urllib3 files it under connect timeouts
                raise _Retry("connection_failed", f"{url}: cannot connect ({exc})") from None
            except (TimeoutError, urllib3.exceptions.TimeoutError):
                raise _Retry("timeout", f"{url}: no answer within {cfg.timeout_s:g} s") from None
            except urllib3.exceptions.SSLError as exc:  # a certificate does not get better by asking again
                raise FetchError("tls_failed", f"{url}: TLS failed ({exc})") from None
            except urllib3.exceptions.HTTPError as exc:
                raise _Retry("connection_failed", f"{url}: connection failed ({type(exc).__name__}: {exc})") from None
            finished = False
            try:
                status = response.status
                if status in _REDIRECTS:
                    location = response.headers.get("Location")
                    if not location:
                        raise FetchError(_status_code(status), f"{url}: HTTP {status} without a Location")
                    current = urljoin(current, location)
                    continue
                if status == 200:
                    try:
                        body = _body(response, url, cfg, deadline)
                        finished = True
                        return body
                    except (TimeoutError, urllib3.exceptions.TimeoutError):
                        raise _Retry("timeout", f"{url}: download stalled for {cfg.timeout_s:g} s") from None
                    except urllib3.exceptions.HTTPError as exc:
                        raise _Retry("connection_failed", f"{url}: download broke off ({exc})") from None
                reason = f"{url}: HTTP {status} {response.reason or ''}".rstrip()
                if status == 429 or status >= 500:
                    delay = _retry_after(response.headers.get("Retry-After"), cfg.max_backoff_s)
                    raise _Retry(_status_code(status), reason, delay)
                raise FetchError(_status_code(status), reason)
            finally:
                if finished:
                    response.release_conn()
                else:  # an error body is not read (it could be huge): the connection goes, not back to the pool
                    response.close()
    raise FetchError("too_many_redirects", f"{url}: more than {cfg.max_redirects} redirects")


def fetch(url: str, cfg: FetchConfig) -> bytes:
    """The body of ``url``, or FetchError naming what went wrong (after retries when it may pass)."""
    delay = cfg.backoff_s
    for attempt in range(1, cfg.attempts + 1):
        try:
            return _once(url, cfg)
        except _Retry as exc:
            if attempt == cfg.attempts:
                raise FetchError(exc.code, f"{exc} (after {attempt} tries)") from None
            time.sleep(exc.delay if exc.delay is not None else min(delay, cfg.max_backoff_s))
            delay *= 2
    raise AssertionError("unreachable")
