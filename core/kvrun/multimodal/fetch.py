"""Fetching a medium's bytes from a URL, safely.

Accepted URLs: ``http://`` and ``https://`` (downloaded), ``data:<type>;base64,...``
(decoded in place) and ``file://`` (read only under ``--allowed-local-media-path``).
Anything else (``ftp:``, ``gopher:``, ...) is refused.

The guard against server-side request forgery, for every http(s) URL and every
redirect target:

1. With ``allowed_domains`` set, the URL's host must be one of them (exact, case-
   insensitive); redirects to other hosts are refused.
2. The host is resolved once (``getaddrinfo``, off the event loop). If ANY address
   it resolves to is not a public unicast address (loopback, private, shared/CGNAT,
   link-local including the cloud metadata 169.254.169.254, unspecified, multicast,
   reserved, documentation, or one of those inside an IPv4-mapped, 6to4, Teredo or
   NAT64 IPv6 address), the URL is refused. A host in ``allowed_domains`` is trusted
   by the operator who named it and skips this check: that is how a server reaches
   media on its own network (and how the tests reach 127.0.0.1).
3. The connection goes to an address that was checked, never through a second DNS
   lookup (no rebinding window); the Host header and the TLS server name (SNI and
   certificate check) stay the URL's host. Proxies from the environment are ignored.
4. At most :data:`MAX_REDIRECTS` redirects, each target checked as above.

Bounds: the whole fetch (DNS, connect, redirects, body) must finish within the
kind's timeout (VLLM_IMAGE_FETCH_TIMEOUT / VLLM_VIDEO_FETCH_TIMEOUT /
VLLM_AUDIO_FETCH_TIMEOUT); the body is read as it streams and the connection is
dropped as soon as it passes the kind's size cap (:data:`DEFAULT_MAX_BYTES`).
Compressed transfer encodings are not accepted (``Accept-Encoding: identity``), so the
cap counts the bytes that are kept.

Every refusal is a :class:`MediaFetchError` whose message names the reason and never
echoes a filesystem path, a resolved address or a fetched body.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import os
import socket
import ssl
import stat
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import httpx

from kvrun.errors import ConfigError, KvrunError

if TYPE_CHECKING:
    from kvrun.envs import EnvSnapshot
    from kvrun.multimodal.assets import AssetCache

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MAX_REDIRECTS",
    "MediaFetchError",
    "MediaKind",
    "MediaPolicy",
    "address_refusal",
    "check_allowed_local_path",
    "fetch_media",
]

MediaKind = Literal["image", "video", "audio"]

# The most bytes one medium may have, per kind (downloaded, decoded from data:, or read).
DEFAULT_MAX_BYTES: Mapping[str, int] = {
    "image": 32 << 20,
    "video": 256 << 20,
    "audio": 64 << 20,
}
MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_CHUNK = 64 << 10

_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
# ipaddress's is_global misses these (3.11): refused explicitly.
_NOT_PUBLIC_V4 = (
    ipaddress.ip_network("0.0.0.0/8"),
    ipaddress.ip_network("100.64.0.0/10"),
    ipaddress.ip_network("192.0.0.0/24"),
    ipaddress.ip_network("198.18.0.0/15"),
    ipaddress.ip_network("240.0.0.0/4"),
)


class MediaFetchError(KvrunError):
    """A medium that could not be fetched or was refused; the message is safe to show."""


@dataclass(frozen=True)
class MediaPolicy:
    """Where media may come from and how long/large they may be.

    ``allowed_domains`` empty: any host whose addresses are all public. ``allowed_local_path``
    is a real directory (symlinks resolved) or None: ``file:`` URLs refused. ``offline``:
    the policy of an ``LLM`` (refusals name its arguments), else of a server (its flags).
    """

    allowed_domains: frozenset[str] = frozenset()
    allowed_local_path: str | None = None
    timeouts: Mapping[str, float] = field(
        default_factory=lambda: {"image": 5.0, "video": 30.0, "audio": 10.0}
    )
    max_bytes: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_MAX_BYTES))
    max_redirects: int = MAX_REDIRECTS
    cache: AssetCache | None = None  # downloads kept by URL (VLLM_ASSETS_CACHE)
    # the CAs https media servers are checked against; None: certifi's (httpx's default)
    ssl_context: ssl.SSLContext | None = None
    offline: bool = False

    @classmethod
    def from_env(
        cls,
        env: EnvSnapshot,
        *,
        allowed_domains: list[str] | tuple[str, ...] | None = None,
        allowed_local_path: str | None = None,
        cache: AssetCache | None = None,
        offline: bool = False,
    ) -> MediaPolicy:
        """The policy of a server (or with ``offline``, of an ``LLM``): timeouts from
        VLLM_*_FETCH_TIMEOUT, the flags' (arguments') values."""
        return cls(
            allowed_domains=frozenset(_host_key(d) for d in allowed_domains or ()),
            allowed_local_path=check_allowed_local_path(allowed_local_path),
            timeouts={
                "image": float(env.VLLM_IMAGE_FETCH_TIMEOUT),
                "video": float(env.VLLM_VIDEO_FETCH_TIMEOUT),
                "audio": float(env.VLLM_AUDIO_FETCH_TIMEOUT),
            },
            cache=cache,
            offline=offline,
        )

    def setting(self, name: str) -> str:
        """How a refusal names the setting ``name`` (``allowed_local_media_path``): the
        server's flag, or the ``LLM`` argument offline, where the caller can change it."""
        if self.offline:
            return f"LLM({name}=...)"
        return "this server's --" + name.replace("_", "-")

    def domain_allowed(self, host: str) -> bool:
        return _host_key(host) in self.allowed_domains


def check_allowed_local_path(path: str | None) -> str | None:
    """``--allowed-local-media-path``: an existing directory, as its real path."""
    if path is None:
        return None
    if not path:
        raise ConfigError("--allowed-local-media-path is empty; give a directory")
    real = os.path.realpath(path)
    if not os.path.isdir(real):
        raise ConfigError(f"--allowed-local-media-path {path!r} is not a directory")
    return real


def _host_key(host: str) -> str:
    return host.strip().rstrip(".").lower()


# --- the address classifier --------------------------------------------------------


def address_refusal(address: str) -> str | None:
    """Why a resolved address may not be fetched from, or None for a public one."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "an address that is not an IP address"
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = None
        if ip.ipv4_mapped is not None:
            embedded = ip.ipv4_mapped
        elif ip.sixtofour is not None:
            embedded = ip.sixtofour
        elif ip.teredo is not None:
            embedded = ip.teredo[1]  # the client's address
        elif any(ip in net for net in _NAT64):
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_refusal(str(embedded))
            if inner is not None:
                return f"{inner} (inside an IPv6 address)"
    for name, flag in (
        ("a loopback", ip.is_loopback),
        ("an unspecified", ip.is_unspecified),
        ("a link-local (or cloud metadata)", ip.is_link_local),
        ("a multicast", ip.is_multicast),
        ("a private", ip.is_private),
        ("a reserved", ip.is_reserved),
    ):
        if flag:
            return f"{name} address"
    if isinstance(ip, ipaddress.IPv4Address) and any(ip in net for net in _NOT_PUBLIC_V4):
        return "a non-public address"
    if not ip.is_global:
        return "a non-public address"
    return None


async def _checked_addresses(host: str, port: int, policy: MediaPolicy) -> list[str]:
    """The addresses of ``host``, all of them checked; the fetch connects to these only."""
    if policy.allowed_domains and not policy.domain_allowed(host):
        where = policy.setting("allowed_media_domains")
        raise MediaFetchError(f"the host {host!r} is not in {where}")
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise MediaFetchError(f"the host {host!r} could not be resolved") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise MediaFetchError(f"the host {host!r} could not be resolved")
    if not policy.domain_allowed(host):
        for address in addresses:
            reason = address_refusal(address)
            if reason is not None:
                raise MediaFetchError(
                    f"the host {host!r} resolves to {reason}, which media URLs may not "
                    f"reach (list it in {policy.setting('allowed_media_domains')} to allow it)"
                )
    return addresses


# --- the fetch ---------------------------------------------------------------------


async def fetch_media(url: str, kind: MediaKind, policy: MediaPolicy) -> bytes:
    """The bytes at ``url``; raises MediaFetchError (refused, failed, too slow, too big).

    The whole fetch is bounded by the kind's timeout; nothing here blocks the event loop
    (DNS and file reads run in worker threads).
    """
    timeout = policy.timeouts[kind]
    cap = policy.max_bytes[kind]
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return _decode_data_url(url, cap)
    if scheme not in ("http", "https", "file"):
        raise MediaFetchError(
            f"URLs of scheme {scheme or '(none)'!r} are not accepted; use http, https, "
            f"data (base64) or file (under {policy.setting('allowed_local_media_path')})"
        )
    try:
        if scheme == "file":
            return await asyncio.wait_for(_read_local(url, policy, cap), timeout)
        return await asyncio.wait_for(_download(url, policy, cap), timeout)
    except asyncio.TimeoutError:
        raise MediaFetchError(
            f"fetching the {kind} took longer than {timeout:g} s "
            f"(VLLM_{kind.upper()}_FETCH_TIMEOUT)"
        ) from None


def _decode_data_url(url: str, cap: int) -> bytes:
    head, sep, payload = url[5:].partition(",")
    if not sep:
        raise MediaFetchError("the data: URL has no ',' before its data")
    if not head.lower().endswith(";base64"):
        raise MediaFetchError("data: URLs must be base64 (data:<type>;base64,<data>)")
    if len(payload) > (cap // 3 + 1) * 4:
        raise MediaFetchError(f"the data: URL holds more than {cap} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaFetchError("the data: URL's payload is not valid base64") from None


async def _read_local(url: str, policy: MediaPolicy, cap: int) -> bytes:
    root = policy.allowed_local_path
    if root is None:
        if policy.offline:
            raise MediaFetchError(
                "file: URLs are refused: this LLM was made without allowed_local_media_path "
                "(LLM(allowed_local_media_path=...) names the directory they may read)"
            )
        raise MediaFetchError(
            "file: URLs are refused: this server was not started with --allowed-local-media-path"
        )
    parts = urllib.parse.urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise MediaFetchError("file: URLs must name a local path (file:///...)")
    path = urllib.parse.unquote(parts.path)
    where = policy.setting("allowed_local_media_path")
    return await asyncio.to_thread(_read_under, root, path, cap, where)


def _read_under(root: str, path: str, cap: int, where: str) -> bytes:
    """The file at ``path`` if its real path is inside ``root``; never names the path.
    ``where``: how the refusal names the setting that holds ``root``."""
    outside = MediaFetchError(f"the file: URL is not inside {where}")
    if not os.path.isabs(path):
        raise outside
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise outside
    try:
        # O_NONBLOCK: a FIFO must not hold the worker thread (a regular file ignores it)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(real, flags)
    except OSError:
        raise MediaFetchError("the file: URL names no readable file") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise MediaFetchError("the file: URL names no regular file")
        data = f.read(cap + 1)
    if len(data) > cap:
        raise MediaFetchError(f"the file is larger than {cap} bytes")
    return data


_SSL_CONTEXT: ssl.SSLContext | None = None


def _ssl_context() -> ssl.SSLContext:
    global _SSL_CONTEXT
    if _SSL_CONTEXT is None:
        _SSL_CONTEXT = httpx.create_ssl_context()
    return _SSL_CONTEXT


def _split_http(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path with query) of an http(s) URL, or MediaFetchError."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError:
        raise MediaFetchError("the URL is malformed") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise MediaFetchError(f"a redirect to a URL of scheme {scheme!r} is not followed")
    host = parts.hostname
    if not host:
        raise MediaFetchError("the URL has no host")
    if parts.username is not None or parts.password is not None:
        raise MediaFetchError("URLs with credentials (user:password@) are not accepted")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return scheme, host, port or (443 if scheme == "https" else 80), target


async def _download(url: str, policy: MediaPolicy, cap: int) -> bytes:
    """Follow redirects (each checked) to the body. The asset cache is keyed by the URL
    the client gave, looked up once that URL's host has passed the checks."""
    current = url
    for hop in range(policy.max_redirects + 1):
        scheme, host, port, target = _split_http(current)
        addresses = await _checked_addresses(host, port, policy)
        if hop == 0 and policy.cache is not None:
            cached = await asyncio.to_thread(policy.cache.get, url, cap)
            if cached is not None:
                return cached
        tls = policy.ssl_context or _ssl_context()
        status, location, body = await _get(scheme, host, port, target, addresses, cap, tls)
        if status in _REDIRECTS and location is not None:
            current = urllib.parse.urljoin(current, location)
            continue
        if status != 200:
            raise MediaFetchError(f"the media server answered HTTP {status}")
        assert body is not None
        if policy.cache is not None:
            await asyncio.to_thread(policy.cache.put, url, body)
        return body
    raise MediaFetchError(f"more than {policy.max_redirects} redirects")


async def _get(
    scheme: str,
    host: str,
    port: int,
    target: str,
    addresses: list[str],
    cap: int,
    tls: ssl.SSLContext,
) -> tuple[int, str | None, bytes | None]:
    """GET ``target`` from the first of ``addresses`` that accepts a connection:
    (status, redirect location, body read up to ``cap``)."""
    default_port = 443 if scheme == "https" else 80
    host_header = host if ":" not in host else f"[{host}]"
    if port != default_port:
        host_header += f":{port}"
    headers = {"Host": host_header, "Accept-Encoding": "identity", "User-Agent": "kvrun"}
    extensions = {"sni_hostname": host} if scheme == "https" else {}
    last_error = "no address accepted the connection"
    async with httpx.AsyncClient(
        verify=tls, trust_env=False, follow_redirects=False, timeout=None
    ) as client:
        for address in addresses:
            ip_host = f"[{address.split('%', 1)[0]}]" if ":" in address else address
            request = client.build_request(
                "GET",
                f"{scheme}://{ip_host}:{port}{target}",
                headers=headers,
                extensions=extensions,
            )
            try:
                response = await client.send(request, stream=True)
            except httpx.ConnectError as exc:
                last_error = "could not connect to the media server"
                if _is_tls_failure(exc):
                    last_error += f" (its TLS certificate could not be verified for {host!r})"
                continue
            except httpx.HTTPError as exc:
                raise MediaFetchError(f"the media request failed ({type(exc).__name__})") from None
            try:
                return await _read_response(response, cap)
            finally:
                await response.aclose()
    raise MediaFetchError(last_error)


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


async def _read_response(
    response: httpx.Response, cap: int
) -> tuple[int, str | None, bytes | None]:
    status = response.status_code
    if status in _REDIRECTS:
        return status, response.headers.get("location"), None
    if status != 200:
        return status, None, None
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise MediaFetchError(
            f"the media server sent a {encoding!r}-encoded body; only identity is accepted"
        )
    length = response.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise MediaFetchError(f"the media is larger than {cap} bytes")
    body = bytearray()
    try:
        async for chunk in response.aiter_raw(_CHUNK):
            body += chunk
            if len(body) > cap:
                raise MediaFetchError(f"the media is larger than {cap} bytes")
    except httpx.HTTPError as exc:
        raise MediaFetchError(f"reading the media failed ({type(exc).__name__})") from None
    return status, None, bytes(body)
