"""Models on S3 or an S3-compatible store (MinIO, Ceph, R2, ...): ``s3://bucket/prefix``.

The objects directly under the prefix that a load needs (config, tokenizer and the load
format's weight files; "subdirectories" are not fetched) are mirrored into
``$VLLM_CACHE_ROOT/s3/<bucket>/<prefix>/``, which is then loaded as a local Hugging Face
directory; ``s3://bucket/path/model.gguf`` mirrors that one file. A manifest there
records each object's ETag and size: an object whose ETag and size are unchanged (and
whose local copy has that size) is not downloaded again, a changed one is. Each object
is written to a temporary file and renamed into place only once complete and of the
listed size, so no half file is ever loaded; objects are fetched in byte ranges of at
most ``part_size`` (each streamed to its place in the file, never whole in memory,
several at once), all with ``If-Match`` on the listed ETag so parts of two versions
never mix.
One process at a time updates a directory (a lock file), so a server's frontend and
engine loading the same model download it once.

Credentials and endpoint come from S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY and
S3_ENDPOINT_URL (unset: boto3's own chain, e.g. AWS_* variables or an instance role);
they are never logged or put in a message. boto3 is the optional extra ``kvrun[s3]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from kvrun.errors import ModelLoadError
from kvrun.loader.s3_client import S3Object, S3Settings, list_objects, make_client, translated

__all__ = ["S3Object", "S3Settings", "fetch_s3_model", "is_s3_uri", "parse_s3_uri"]

logger = logging.getLogger(__name__)

_MANIFEST = ".kvrun-s3-manifest.json"
_LOCK = ".kvrun-s3.lock"
_PART_SUFFIX = ".kvrun-part"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.\-_]{1,253}[a-z0-9]")
_CHUNK = 1 << 20  # bytes per read from a response body
# Which remote names a load wants: (names under the prefix, the URI for messages) -> subset.
Select = Callable[[list[str], str], list[str]]


def is_s3_uri(source: str) -> bool:
    return source.startswith("s3://")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """(bucket, key prefix without a trailing "/") of ``s3://bucket/prefix``."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    prefix = prefix.strip("/")
    if not _BUCKET.fullmatch(bucket):
        raise ModelLoadError(
            f"model {uri!r}: {bucket!r} is not an S3 bucket name; give s3://<bucket>/<prefix>, "
            "e.g. s3://my-models/SmolLM2-135M-Instruct"
        )
    if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
        raise ModelLoadError(
            f"model {uri!r}: the key prefix {prefix!r} has an empty, '.' or '..' part"
        )
    return bucket, prefix


def fetch_s3_model(
    uri: str, settings: S3Settings, select: Select, *, progress: bool = True
) -> Path:
    """Mirror what ``select`` picks of ``uri`` into the cache; the local directory (or,
    for a ``.gguf`` key, the local file). ModelLoadError for every failure, naming the
    bucket, prefix or object and never a credential."""
    bucket, prefix = parse_s3_uri(uri)
    single = prefix.endswith(".gguf")
    folder = prefix.rpartition("/")[0] if single else prefix
    directory = settings.cache_dir / bucket / folder if folder else settings.cache_dir / bucket
    client = make_client(settings, uri)
    with translated(settings, uri, bucket):
        listed = list_objects(client, bucket, prefix, single)
    if single:
        listed = [o for o in listed if o.key == prefix]
        if not listed:
            raise ModelLoadError(
                f"model {uri!r}: there is no object {prefix!r} in bucket {bucket!r}"
            )
        wanted = listed
    else:
        if not listed:
            under = f"s3://{bucket}/{prefix}/" if prefix else f"s3://{bucket}/"
            raise ModelLoadError(
                f"model {uri!r}: there are no objects under {under} at {settings.endpoint}; "
                "give the prefix that holds config.json"
            )
        names = [o.name for o in listed]
        if "config.json" not in names:
            shown = ", ".join(sorted(names)[:8]) + (", ..." if len(names) > 8 else "")
            raise ModelLoadError(
                f"model {uri!r}: the objects under it ({shown}) include no config.json, so it "
                "is not a Hugging Face checkpoint; give the prefix that holds config.json"
            )
        chosen = set(select(names, uri))
        wanted = [o for o in listed if o.name in chosen]
    directory.mkdir(parents=True, exist_ok=True)
    with _locked(directory / _LOCK):
        _sync(
            client,
            settings,
            uri,
            bucket,
            directory,
            wanted,
            listed if not single else None,
            progress,
        )
    return directory / wanted[0].name if single else directory


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _read_manifest(directory: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads((directory / _MANIFEST).read_text(encoding="utf-8"))
        return {str(k): dict(v) for k, v in data["objects"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # none yet, or unreadable: every object is fetched again


def _write_manifest(directory: Path, objects: dict[str, dict[str, Any]]) -> None:
    scratch = directory / f"{_MANIFEST}.{uuid.uuid4().hex}"
    scratch.write_text(json.dumps({"objects": objects}, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(scratch, directory / _MANIFEST)


def _current(directory: Path, manifest: dict[str, dict[str, Any]], obj: S3Object) -> bool:
    """The local copy is this version of the object (same ETag, listed size on disk)."""
    entry = manifest.get(obj.name)
    local = directory / obj.name
    return (
        entry == {"etag": obj.etag, "size": obj.size}
        and local.is_file()
        and local.stat().st_size == obj.size
    )


def _sync(
    client: Any,
    settings: S3Settings,
    uri: str,
    bucket: str,
    directory: Path,
    wanted: list[S3Object],
    listed: list[S3Object] | None,
    progress: bool,
) -> None:
    """Make ``directory`` hold the current version of every ``wanted`` object; with the
    full ``listed`` set, drop local copies of objects deleted from the store."""
    from tqdm.auto import tqdm

    for leftover in directory.glob(f".*{_PART_SUFFIX}"):
        leftover.unlink(missing_ok=True)  # an interrupted earlier download
    manifest = _read_manifest(directory)
    deleted = [] if listed is None else sorted(set(manifest) - {o.name for o in listed})
    for name in deleted:
        (directory / name).unlink(missing_ok=True)
        del manifest[name]
    if deleted:
        _write_manifest(directory, manifest)
    stale = [o for o in wanted if not _current(directory, manifest, o)]
    total = sum(o.size for o in stale)
    bar = tqdm(
        total=total,
        desc=f"Downloading {uri}",
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress or not stale,
        leave=False,
    )
    with bar, ThreadPoolExecutor(max_workers=settings.max_concurrency) as pool:
        for obj in stale:
            manifest.pop(obj.name, None)
            _download(client, settings, uri, bucket, obj, directory, pool, bar)
            manifest[obj.name] = {"etag": obj.etag, "size": obj.size}
            # After each object, so an interrupted load keeps what it completed.
            _write_manifest(directory, manifest)
    logger.info(
        "%s: downloaded %d of %d objects (%.1f MiB) into %s; %d unchanged since the last load",
        uri,
        len(stale),
        len(wanted),
        total / (1 << 20),
        directory,
        len(wanted) - len(stale),
    )


def _download(
    client: Any,
    settings: S3Settings,
    uri: str,
    bucket: str,
    obj: S3Object,
    directory: Path,
    pool: ThreadPoolExecutor,
    bar: Any,
) -> None:
    """``obj`` into ``directory``, through a temporary file renamed once it is whole."""
    scratch = directory / f".{obj.name}.{uuid.uuid4().hex[:8]}{_PART_SUFFIX}"
    lock = threading.Lock()

    def advance(n: int) -> None:
        with lock:
            bar.update(n)

    fd = os.open(scratch, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        try:
            ranges = [
                (start, min(start + settings.part_size, obj.size) - 1)
                for start in range(0, obj.size, settings.part_size)
            ]
            futures = [
                pool.submit(_fetch_part, client, settings, uri, bucket, obj, fd, a, b, advance)
                for a, b in ranges
            ]
            wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:
                future.cancel()  # after a failure, parts not yet started do not start
            wait(futures)  # none may write to fd once it is closed
            for future in futures:
                if not future.cancelled():
                    future.result()
        finally:
            os.close(fd)
        size = scratch.stat().st_size
        if size != obj.size:
            raise ModelLoadError(
                f"model {uri!r}: object {obj.key!r} arrived as {size} bytes, but the listing "
                f"gives it {obj.size} bytes (ContentLength); it was cut short: load again"
            )
        os.replace(scratch, directory / obj.name)
    finally:
        scratch.unlink(missing_ok=True)


def _fetch_part(
    client: Any,
    settings: S3Settings,
    uri: str,
    bucket: str,
    obj: S3Object,
    fd: int,
    first: int,
    last: int,
    advance: Callable[[int], None],
) -> None:
    """Bytes ``first..last`` of ``obj`` into ``fd`` at their offset; a body cut short is
    fetched again, up to ``max_attempts`` times in all."""
    from botocore import exceptions as bex

    want = last - first + 1
    got = 0
    for attempt in range(1, settings.max_attempts + 1):
        got = 0
        with translated(settings, uri, bucket, obj.key):
            response = client.get_object(
                Bucket=bucket, Key=obj.key, Range=f"bytes={first}-{last}", IfMatch=obj.etag
            )
        served = str(response.get("ContentRange") or "")
        if first > 0 and not served.startswith(f"bytes {first}-"):
            response["Body"].close()
            raise ModelLoadError(
                f"model {uri!r}: object {obj.key!r}: asked for bytes {first}-{last}, the store "
                f"answered with {served or 'the whole object'}; kvrun needs a store that serves "
                "byte ranges, as S3 does"
            )
        try:
            for chunk in response["Body"].iter_chunks(_CHUNK):
                chunk = chunk[: want - got]  # never past the part, whatever the store sends
                os.pwrite(fd, chunk, first + got)
                got += len(chunk)
                advance(len(chunk))
        except bex.BotoCoreError as exc:  # cut off: a short body, a reset, a read timeout
            logger.warning(
                "%s: object %s: bytes %d-%d cut short after %d bytes (%s), attempt %d of %d",
                uri, obj.key, first, last, got, type(exc).__name__, attempt, settings.max_attempts,
            )  # fmt: skip
            advance(-got)
            continue
        finally:
            response["Body"].close()
        if got == want:
            return
        advance(-got)
    raise ModelLoadError(
        f"model {uri!r}: object {obj.key!r} is truncated: bytes {first}-{last} of its "
        f"{obj.size} (the listing's ContentLength) arrived as {got} bytes, "
        f"{settings.max_attempts} times; check the store, then load again"
    )
