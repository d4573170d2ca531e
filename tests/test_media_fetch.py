"""kvrun.multimodal.fetch, media and assets: fetching media safely and decoding it.

Media come from a server on 127.0.0.1 that the tests start (tests/support/media_server.py),
allow-listed explicitly. Every case that names a non-loopback address runs in a network
namespace of its own (tests/support/media_guard_probe.py under ``unshare -n``), so a
broken guard cannot send a packet anywhere.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from kvrun.multimodal.assets import AssetCache
from kvrun.multimodal.fetch import MediaFetchError, MediaPolicy, address_refusal, fetch_media
from kvrun.multimodal.media import (
    MediaDecodeError,
    content_hash,
    decode_audio,
    decode_image,
    decode_video,
)
from tests.support.media_server import MediaServer, media_server, png_bytes

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 1.0
MARGIN_S = 2.0  # the refusal must come within the timeout plus this


def _policy(**kw: object) -> MediaPolicy:
    base: dict[str, object] = {
        "allowed_domains": frozenset({"127.0.0.1"}),
        "timeouts": {"image": TIMEOUT_S, "video": TIMEOUT_S, "audio": TIMEOUT_S},
        "max_bytes": {"image": 256 << 10, "video": 1 << 20, "audio": 1 << 20},
    }
    base.update(kw)
    return MediaPolicy(**base)  # type: ignore[arg-type]


def _fetch(url: str, policy: MediaPolicy) -> bytes:
    return asyncio.run(fetch_media(url, "image", policy))


@pytest.fixture(scope="module")
def server() -> Iterator[MediaServer]:
    with media_server() as s:
        yield s


# --- the address classifier (no connection) -------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",
        "0.0.0.0",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:10.0.0.1",
        "2002:7f00:0001::1",  # 6to4 of 127.0.0.1
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "fe80::1%lo",
    ],
)
def test_non_public_addresses_are_refused(address: str) -> None:
    assert address_refusal(address) is not None


@pytest.mark.parametrize("address", ["93.184.216.34", "8.8.8.8", "2606:4700::1111"])
def test_public_addresses_pass(address: str) -> None:
    assert address_refusal(address) is None


# --- fetching from the local server (allow-listed) ---------------------------------


def test_image_fetched_and_decoded_alike_from_http_and_data_url(server: MediaServer) -> None:
    fetched = _fetch(server.url("/image.png"), _policy())
    assert fetched == server.image
    data_url = "data:image/png;base64," + base64.b64encode(server.image).decode()
    inline = _fetch(data_url, _policy())
    a, b = decode_image(fetched), decode_image(inline)
    assert a.hash == b.hash == content_hash(a.image)
    assert a.image.size == (48, 32) and a.image.mode == "RGB"
    other = decode_image(png_bytes(seed=1))
    assert other.hash != a.hash


def test_slow_server_is_refused_within_the_timeout(server: MediaServer) -> None:
    start = time.monotonic()
    with pytest.raises(MediaFetchError, match="took longer than 1 s"):
        _fetch(server.url("/slow"), _policy())
    assert time.monotonic() - start < TIMEOUT_S + MARGIN_S


def test_oversized_body_is_refused_and_the_download_stopped(server: MediaServer) -> None:
    server.big_done.clear()
    server.big_sent = 0
    with pytest.raises(MediaFetchError, match="larger than 262144 bytes"):
        _fetch(server.url("/big"), _policy())
    assert server.big_done.wait(30), "the server kept writing after the client stopped"
    # the server would send 256 MiB; the client hung up after 256 KiB (plus what the
    # sockets' buffers absorbed)
    assert server.big_sent < 64 << 20, server.big_sent


def test_redirect_to_a_host_not_allowed_is_refused(server: MediaServer) -> None:
    before = server.hits["/image.png"]
    target = f"http://localhost:{server.port}/image.png"
    with pytest.raises(MediaFetchError, match="'localhost' is not in this server's"):
        _fetch(server.url(f"/redirect?to={target}"), _policy())
    assert server.hits["/image.png"] == before


def test_redirect_within_the_allow_list_is_followed(server: MediaServer) -> None:
    assert _fetch(server.url("/redirect?to=/image.png"), _policy()) == server.image


def test_redirect_loop_is_refused_after_the_limit(server: MediaServer) -> None:
    before = server.hits["/loop"]
    with pytest.raises(MediaFetchError, match="more than 3 redirects"):
        _fetch(server.url("/loop"), _policy(max_redirects=3))
    assert server.hits["/loop"] - before == 4


def test_http_error_status_is_refused(server: MediaServer) -> None:
    with pytest.raises(MediaFetchError, match="answered HTTP 404"):
        _fetch(server.url("/missing.png"), _policy())


def test_allow_list_refuses_other_hosts_before_resolving(server: MediaServer) -> None:
    policy = _policy(allowed_domains=frozenset({"media.example"}))
    with pytest.raises(MediaFetchError, match="not in this server's --allowed-media-domains"):
        _fetch(server.url("/image.png"), policy)


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("data:image/png;base64,@@@not-base64", "not valid base64"),
        ("data:image/png,rawbytes", "must be base64"),
        ("data:image/png;base64", "no ','"),
        ("gopher://127.0.0.1/", "scheme 'gopher'"),
        ("http://user:pw@127.0.0.1/", "credentials"),
    ],
)
def test_malformed_urls_are_refused(url: str, reason: str) -> None:
    with pytest.raises(MediaFetchError, match=reason):
        _fetch(url, _policy())


def test_data_url_over_the_cap_is_refused_before_decoding() -> None:
    big = "data:image/png;base64," + "A" * (400 << 10)
    with pytest.raises(MediaFetchError, match="more than 262144 bytes"):
        _fetch(big, _policy())


def test_https_connects_to_the_checked_address_with_the_host_s_name(tmp_path: Path) -> None:
    """The connection goes to the resolved address, but TLS still names and verifies the
    URL's host: a certificate for localhost is accepted only by a client that trusts it."""
    import ssl

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))
    listed = frozenset({"localhost"})
    with media_server(server_tls) as tls_server:
        url = tls_server.url("/image.png", host="localhost")
        policy = _policy(allowed_domains=listed, ssl_context=trusting)
        assert _fetch(url, policy) == tls_server.image
        assert tls_server.server_names == ["localhost"]
        with pytest.raises(MediaFetchError, match="certificate could not be verified"):
            _fetch(url, _policy(allowed_domains=listed))  # certifi's CAs: not trusted
        listed_ip = _policy(allowed_domains=frozenset({"127.0.0.1"}), ssl_context=trusting)
        with pytest.raises(MediaFetchError, match="certificate could not be verified"):
            _fetch(tls_server.url("/image.png"), listed_ip)  # the name does not match


# --- the reliability cases, each in a network namespace of its own ----------------


def _in_namespace() -> dict[str, object]:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("unshare/ip are not installed: cannot isolate the network")
    command = "ip link set lo up && exec " + f"{sys.executable} -m tests.support.media_guard_probe"
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"no network namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def test_reliability_cases_are_refused_in_a_network_namespace() -> None:
    out = _in_namespace()
    results: dict[str, dict[str, object]] = out["results"]  # type: ignore[assignment]
    expected = {
        "metadata": "link-local (or cloud metadata) address",
        "private": "a private address",
        "mapped": "a loopback address (inside an IPv6 address)",
        "localhost": "'localhost' resolves to a loopback address",
        "loopback": "a loopback address",
        "ipv6_loopback": "a loopback address",
        "decimal": "a loopback address",
        "passwd": "not started with --allowed-local-media-path",
        "ftp": "scheme 'ftp' are not accepted",
        "redirect_metadata": "'169.254.169.254' is not in this server's",
        "redirect_private": "'10.0.0.1' is not in this server's",
    }
    assert set(results) == set(expected)
    for name, text in expected.items():
        error = results[name]["error"]
        assert isinstance(error, str) and text in error, (name, error)
        assert float(results[name]["seconds"]) < 3.0 + MARGIN_S, name  # type: ignore[arg-type]
        assert "root:" not in error and "/etc/passwd" not in error
    # nothing reached the media server but the two allow-listed redirects
    assert out["hits"] == {"/redirect": 2}


# --- file: URLs ----------------------------------------------------------------------


def test_file_urls_only_under_the_allowed_directory(tmp_path: Path) -> None:
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png_bytes())
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret contents")
    os.symlink(secret, allowed / "link.png")
    policy = _policy(allowed_local_path=str(allowed.resolve()))
    assert _fetch(f"file://{allowed}/a.png", policy) == png_bytes()
    for url in (
        f"file://{allowed}/link.png",  # a symlink out
        f"file://{allowed}/../secret.png",
        f"file://{secret}",
        "file:///etc/passwd",
    ):
        with pytest.raises(MediaFetchError, match="not inside") as info:
            _fetch(url, policy)
        assert str(tmp_path) not in str(info.value) and "secret contents" not in str(info.value)
    with pytest.raises(MediaFetchError, match="no readable file"):
        _fetch(f"file://{allowed}/missing.png", policy)
    os.mkfifo(allowed / "pipe")  # opening it for reading must not wait for a writer
    with pytest.raises(MediaFetchError, match="no regular file"):
        _fetch(f"file://{allowed}/pipe", policy)
    with pytest.raises(MediaFetchError, match="local path"):
        _fetch(f"file://otherhost{allowed}/a.png", policy)


@pytest.mark.parametrize(
    ("offline", "setting", "unset"),
    [
        (
            False,
            "this server's --allowed-local-media-path",
            "this server was not started with --allowed-local-media-path",
        ),
        (
            True,
            "LLM(allowed_local_media_path=...)",
            "this LLM was made without allowed_local_media_path",
        ),
    ],
)
def test_refusals_name_the_callers_own_setting(
    tmp_path: Path, offline: bool, setting: str, unset: str
) -> None:
    """A server's refusal names its flag, an LLM's the argument its caller can set."""
    other = "--allowed-local-media-path" if offline else "LLM("
    policy = _policy(allowed_local_path=str(tmp_path.resolve()), offline=offline)
    with pytest.raises(MediaFetchError) as outside:
        _fetch("file:///etc/passwd", policy)
    assert f"not inside {setting}" in str(outside.value)
    with pytest.raises(MediaFetchError) as refused:
        _fetch("file:///etc/passwd", _policy(offline=offline))
    assert unset in str(refused.value)
    domains = setting.replace("local_media_path", "media_domains").replace(
        "local-media-path", "media-domains"
    )
    with pytest.raises(MediaFetchError) as host:
        _fetch("http://localhost:9/x.png", _policy(offline=offline))
    assert f"'localhost' is not in {domains}" in str(host.value)
    with pytest.raises(MediaFetchError) as scheme:
        _fetch("ftp://127.0.0.1/x.png", _policy(offline=offline))
    assert f"file (under {setting})" in str(scheme.value)
    for error in (outside, refused, host, scheme):
        assert other not in str(error.value)


# --- decoding ------------------------------------------------------------------------


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(samples.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return buf.getvalue()


def test_audio_decodes_to_mono_float_at_its_rate() -> None:
    left = (np.sin(np.arange(8000) / 7) * 12000).astype(np.int16)
    right = (np.cos(np.arange(8000) / 5) * 9000).astype(np.int16)
    item = decode_audio(_wav(np.stack([left, right], 1), 16000))
    assert item.sample_rate == 16000 and item.samples.dtype == np.float32
    expected = (left.astype(np.float32) + right.astype(np.float32)) / 2 / 32768
    np.testing.assert_allclose(item.samples, expected, atol=1e-6)
    assert item.hash == content_hash((item.samples, 16000))
    with pytest.raises(MediaDecodeError, match="not audio"):
        decode_audio(b"RIFF....WAVEjunk")


def test_mp3_audio_decodes() -> None:
    import av

    rate = 16000
    tone = (np.sin(np.arange(rate) * 2 * np.pi * 440 / rate) * 0.5).astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(tone[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    item = decode_audio(buf.getvalue())
    assert item.sample_rate == rate
    assert abs(item.samples.size - rate) < rate // 10  # encoder padding aside
    rms = float(np.sqrt(np.mean(item.samples**2)))
    assert abs(rms - 0.5 / np.sqrt(2)) < 0.05  # a 0.5-amplitude tone survives


def test_video_frames_are_sampled_evenly() -> None:
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(40):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), i * 6, np.uint8), "rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    item = decode_video(buf.getvalue(), num_frames=8)
    assert item.frames.shape == (8, 32, 32, 3) and item.frames.dtype == np.uint8
    levels = item.frames[:, 16, 16, 0].astype(int)
    expected = np.linspace(0, 39, 8).round() * 6
    assert np.all(np.abs(levels - expected) <= 8), levels  # lossy codec: near the level
    assert item.hash == content_hash(item.frames)


def test_not_an_image_is_a_decode_error() -> None:
    with pytest.raises(MediaDecodeError, match="not an image"):
        decode_image(b"\x89PNG\r\n\x1a\n garbage")


# --- the asset cache -------------------------------------------------------------------


def test_asset_cache_serves_a_repeat_and_stays_bounded(server: MediaServer, tmp_path: Path) -> None:
    cache = AssetCache(str(tmp_path), max_bytes=len(server.image) * 2 + 10)
    policy = _policy(cache=cache)
    url = server.url("/image.png")
    before = server.hits["/image.png"]
    assert _fetch(url, policy) == server.image
    assert _fetch(url, policy) == server.image
    assert server.hits["/image.png"] - before == 1  # the second came from the cache
    for i in range(3):  # three more entries: the cache keeps at most two
        cache.put(f"http://127.0.0.1/{i}", server.image)
    assert len(os.listdir(cache.directory)) == 2
    assert cache.get(url, 1 << 20) is None  # the least recently used went first
    stale = AssetCache(str(tmp_path), max_age_s=0.0)
    assert stale.get("http://127.0.0.1/2", 1 << 20) is None
