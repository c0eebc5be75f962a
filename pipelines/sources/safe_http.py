"""Fetching one image from a URL that came from the web: bounded in size, time and hops, and only from public hosts.

A LAION URL is outside input. Fetching it must not reach the cluster's own network (loopback, private,
link-local, multicast addresses: the classic SSRF targets, cloud metadata endpoints among them), follow
redirects forever, accept a body that is compressed, too big or trickled in one byte at a time, or let
a malformed response escape as an exception. Every such outcome is a `FetchFailed` with a short reason
the encode job counts.

The address check runs where the socket is opened (a urllib3 connection class): the host is resolved
once, every address it resolves to is checked, and the connection goes to the checked address, so a
DNS answer that changes between check and connect (rebinding) cannot slip through, and redirect
targets are checked the same way. Retries of connection errors, timeouts and retryable statuses are
urllib3's `Retry` on the session's adapter. Proxies configured in the environment do their own connecting.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import NameResolutionError
from urllib3.util.retry import Retry

READ_CHUNK_BYTES = 64 * 1024
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
FETCHED_SCHEMES = ("http", "https")


class FetchFailed(Exception):
    """A download that produced no usable body; `reason` is the counter it increments."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class BlockedAddress(Exception):  # deliberately not an OSError: urllib3 must neither retry nor wrap it
    def __init__(self, host: str, address: str, kind: str) -> None:
        super().__init__(f"{host} resolves to {kind} address {address}")
        self.kind = kind


@dataclass(frozen=True)
class FetchLimits:
    """How much one download may cost."""

    timeout_s: float  # connect and per-read
    deadline_s: float  # the whole download
    max_bytes: int
    max_redirects: int


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def address_kind(address: str, allowed: tuple[Network, ...] = ()) -> str | None:
    """Why an address is not fetched from (`loopback`, `link_local`, `multicast`, `private`); None if it is
    public or inside one of the `allowed` networks."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone index
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if any(ip in network for network in allowed):
        return None
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link_local"
    if ip.is_multicast:
        return "multicast"
    if not ip.is_global:  # RFC 1918, CGNAT, unspecified, reserved, documentation ranges
        return "private"
    return None


def public_address(host: str, port: int, allowed: tuple[Network, ...] = ()) -> str:
    """The address to connect to for `host`, after checking every address it resolves to."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    for *_, sockaddr in infos:
        kind = address_kind(sockaddr[0], allowed)
        if kind is not None:
            raise BlockedAddress(host, sockaddr[0], kind)
    return infos[0][4][0]


class _PublicOnlyConnection(HTTPConnection):
    allowed_networks: tuple[Network, ...] = ()

    def _new_conn(self) -> socket.socket:
        name = self._dns_host
        try:
            # Connect to the checked address itself: a second lookup could answer differently (DNS rebinding).
            self._dns_host = public_address(name, self.port, self.allowed_networks)
        except socket.gaierror as error:
            raise NameResolutionError(name, self, error) from error
        try:
            return super()._new_conn()
        finally:
            self._dns_host = name  # TLS server name and Host header keep the real name


class _PublicOnlyHTTPSConnection(_PublicOnlyConnection, HTTPSConnection):
    pass


class _PublicOnlyAdapter(HTTPAdapter):
    """An adapter whose connections refuse non-public addresses outside `allowed_networks`."""

    def __init__(self, allowed_networks: tuple[Network, ...], **kwargs) -> None:
        # urllib3 builds connections from classes, so the allowance travels as a class attribute.
        policy = {"allowed_networks": allowed_networks}
        self.pool_classes = {
            "http": type("PublicOnlyPool", (HTTPConnectionPool,), {
                "ConnectionCls": type("PublicOnlyConnection", (_PublicOnlyConnection,), policy)}),
            "https": type("PublicOnlyHTTPSPool", (HTTPSConnectionPool,), {
                "ConnectionCls": type("PublicOnlyHTTPSConnection", (_PublicOnlyHTTPSConnection,), policy)}),
        }
        super().__init__(**kwargs)

    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = self.pool_classes


def make_session(*, retries: int, backoff_s: float, pool_size: int, user_agent: str,
                 allowed_networks: tuple[Network, ...] = ()) -> requests.Session:
    """A session whose adapter retries transient failures (urllib3 Retry) and only reaches public hosts and
    `allowed_networks`."""
    retry = Retry(
        total=retries, backoff_factor=backoff_s, status_forcelist=RETRIED_STATUSES, allowed_methods={"GET"},
        raise_on_status=False,  # the last retryable status comes back as a response: counted as http_<code>
        respect_retry_after_header=False,  # a hostile Retry-After could park a fetch thread for hours
    )
    adapter = _PublicOnlyAdapter(allowed_networks, pool_connections=pool_size, pool_maxsize=pool_size,
                                 max_retries=retry)
    session = requests.Session()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    # Images are never content-encoded; a compressed body would be a decompression bomb waiting to happen.
    session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
    return session


def fetch(session: requests.Session, url: str, limits: FetchLimits) -> bytes:
    """The body of `url`, following at most `limits.max_redirects` redirects, each target checked like the first."""
    deadline = time.monotonic() + limits.deadline_s
    for _ in range(limits.max_redirects + 1):
        try:
            scheme = urlsplit(url).scheme.lower()
        except (TypeError, ValueError, AttributeError) as error:  # not a string, or e.g. an unclosed "[" in the host
            raise FetchFailed("invalid_url", f"{url!r:.200}: {error}") from None
        if scheme not in FETCHED_SCHEMES:
            raise FetchFailed("blocked_scheme", f"{scheme or 'no'} scheme in {url[:200]!r}")
        try:
            with session.get(url, timeout=limits.timeout_s, stream=True, allow_redirects=False) as response:
                target = session.get_redirect_target(response)
                if target is None:
                    return _body(response, limits, deadline)
        except Exception as error:  # noqa: BLE001 - every way a hostile server can fail becomes a reason
            raise FetchFailed(failure_reason(error), f"{type(error).__name__}: {error}") from None
        try:
            url = urljoin(url, target)
        except ValueError as error:
            raise FetchFailed("invalid_url", f"redirect to {target!r:.200}: {error}") from None
        if time.monotonic() > deadline:
            raise FetchFailed("too_slow", f"redirects took more than deadline_s={limits.deadline_s}")
    raise FetchFailed("too_many_redirects", f"more than max_redirects={limits.max_redirects}")


def _body(response: requests.Response, limits: FetchLimits, deadline: float) -> bytes:
    if response.status_code != 200:
        raise FetchFailed(f"http_{response.status_code}")
    encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding not in ("identity", ""):
        raise FetchFailed("compressed_body", f"Content-Encoding {encoding[:40]!r}")
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limits.max_bytes:
        raise FetchFailed("too_large", f"Content-Length {declared} > max_bytes={limits.max_bytes}")
    body = bytearray()
    # read1 returns after at most one socket read, so a trickling server meets the deadline check.
    while chunk := response.raw.read1(READ_CHUNK_BYTES, decode_content=False):
        body += chunk
        if len(body) > limits.max_bytes:
            raise FetchFailed("too_large", f"more than max_bytes={limits.max_bytes}")
        if time.monotonic() > deadline:
            raise FetchFailed("too_slow", f"{len(body)} bytes in deadline_s={limits.deadline_s}")
    return bytes(body)


# (reason, exception types anywhere in the chain), first match wins: requests wraps urllib3, which wraps http.client.
_REASONS: tuple[tuple[str, tuple[type[BaseException], ...]], ...] = (
    ("timeout", (requests.Timeout, urllib3.exceptions.TimeoutError, TimeoutError)),
    # The server closed the connection before sending the whole declared body.
    ("truncated_body", (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.IncompleteRead,
                        http.client.IncompleteRead)),
    ("invalid_url", (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema,
                     requests.exceptions.InvalidSchema, urllib3.exceptions.LocationParseError, UnicodeError)),
    ("connection_error", (ConnectionError, urllib3.exceptions.NewConnectionError, socket.gaierror)),
    # An invalid status line or header (a dropped connection was caught just above).
    ("bad_response", (urllib3.exceptions.InvalidHeader, requests.exceptions.InvalidHeader,
                      http.client.HTTPException, urllib3.exceptions.ProtocolError)),
    ("connection_error", (requests.ConnectionError, OSError, urllib3.exceptions.HTTPError)),
)


def failure_reason(error: BaseException) -> str:
    """The counted reason for an exception raised while fetching."""
    if isinstance(error, FetchFailed):
        return error.reason
    causes = _causes(error)
    blocked = next((cause for cause in causes if isinstance(cause, BlockedAddress)), None)
    if blocked is not None:
        return f"blocked_{blocked.kind}"
    for reason, types in _REASONS:
        if any(isinstance(cause, types) for cause in causes):
            return reason
    return "fetch_error"


def _causes(error: BaseException) -> list[BaseException]:
    """`error`, the exceptions it wraps (urllib3's MaxRetryError.reason, args, __cause__, __context__)."""
    seen: list[BaseException] = []
    pending = [error]
    while pending and len(seen) < 20:
        current = pending.pop()
        if any(current is known for known in seen):
            continue
        seen.append(current)
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        for linked in (getattr(current, "reason", None), current.__cause__, current.__context__):
            if isinstance(linked, BaseException):
                pending.append(linked)
    return seen
