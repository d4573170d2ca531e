"""The S3 client kvrun uses: settings from the environment snapshot, bounded timeouts
and retries, listings, and boto3's errors as one clear ModelLoadError each.

boto3 is the optional extra ``kvrun[s3]``, imported only when an ``s3://`` model is
loaded. Credentials are kept out of every repr, log line and message.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from kvrun.errors import ModelLoadError

if TYPE_CHECKING:
    from kvrun.envs import EnvSnapshot

__all__ = ["S3Object", "S3Settings", "list_objects", "make_client", "translated"]

_AUTH_CODES = frozenset(
    {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
)


@dataclass(frozen=True)
class S3Settings:
    """Where and how to fetch; the credentials are kept out of repr (and so of logs)."""

    cache_dir: Path  # mirrors live under cache_dir/<bucket>/<prefix>/
    access_key_id: str | None = field(default=None, repr=False)  # None: boto3's own chain
    secret_access_key: str | None = field(default=None, repr=False)
    endpoint_url: str | None = None  # None: AWS S3; set: an S3-compatible store, path-style
    part_size: int = 64 << 20  # bytes per ranged GET of a large object
    max_concurrency: int = 8  # ranged GETs in flight at once
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    max_attempts: int = 3  # per request (boto3's retries) and per part (a cut-off body)

    @classmethod
    def from_env(cls, env: EnvSnapshot) -> S3Settings:
        """From S3_* and VLLM_CACHE_ROOT in an environment snapshot."""
        return cls(
            cache_dir=Path(env.VLLM_CACHE_ROOT) / "s3",
            access_key_id=env.S3_ACCESS_KEY_ID,
            secret_access_key=env.S3_SECRET_ACCESS_KEY,
            endpoint_url=env.S3_ENDPOINT_URL,
        )

    @property
    def endpoint(self) -> str:
        """The endpoint for messages, without any user:password part of its URL."""
        if self.endpoint_url is None:
            return "AWS S3"
        parts = urlsplit(self.endpoint_url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else self.endpoint_url

    def scrub(self, text: str) -> str:
        """``text`` with the credentials replaced, should a library have quoted them."""
        for secret in (self.access_key_id, self.secret_access_key):
            if secret:
                text = text.replace(secret, "***")
        return text


@dataclass(frozen=True)
class S3Object:
    """One object as the listing reports it."""

    key: str
    name: str  # the key below the prefix: the local file's name
    size: int  # the listing's ContentLength, in bytes
    etag: str


def make_client(settings: S3Settings, uri: str) -> Any:
    """A boto3 S3 client with bounded timeouts and retries; ``uri`` names the model in
    the error when boto3 is not installed."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:
        raise ModelLoadError(
            f'model {uri!r} is on S3, which needs boto3: pip install "kvrun[s3]"'
        ) from exc
    config = Config(
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        retries={"total_max_attempts": settings.max_attempts, "mode": "standard"},
        max_pool_connections=max(10, settings.max_concurrency),
        # S3-compatible stores (MinIO, Ceph) serve buckets as paths, not host names.
        s3={"addressing_style": "path"} if settings.endpoint_url else None,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.endpoint_url,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        config=config,
    )


@contextlib.contextmanager
def translated(
    settings: S3Settings, uri: str, bucket: str, key: str | None = None
) -> Iterator[None]:
    """boto3's and botocore's errors as one ModelLoadError each, credentials scrubbed."""
    from botocore import exceptions as bex

    where = f"model {uri!r}" + (f": object {key!r}" if key else "")
    try:
        yield
    except bex.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchBucket",):
            message = f"bucket {bucket!r} does not exist at {settings.endpoint}"
        elif code in _AUTH_CODES or status == 403:
            message = (
                f"{settings.endpoint} refused access to bucket {bucket!r} ({code or status}): "
                "check S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY (when unset, boto3 uses its "
                "own credentials: AWS_* variables, ~/.aws, an instance role) and that they may "
                "list and read the bucket"
            )
        elif code in ("NoSuchKey", "404"):
            message = "the object was deleted while it was being fetched; load again"
        elif code == "PreconditionFailed":
            message = "the object changed while it was being fetched; load again"
        else:
            message = f"S3 error {code or status}: {error.get('Message', '')}"
        raise ModelLoadError(settings.scrub(f"{where}: {message}")) from None
    except (bex.EndpointConnectionError, bex.ConnectTimeoutError, bex.ConnectionClosedError) as exc:
        raise ModelLoadError(
            f"{where}: cannot reach the S3 endpoint {settings.endpoint} "
            f"({type(exc).__name__}, after {settings.max_attempts} attempts of "
            f"{settings.connect_timeout_s:g} s); check S3_ENDPOINT_URL and the network"
        ) from None
    except (bex.NoCredentialsError, bex.PartialCredentialsError):
        raise ModelLoadError(
            f"{where}: no S3 credentials: set S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY"
        ) from None
    except bex.BotoCoreError as exc:
        raise ModelLoadError(settings.scrub(f"{where}: S3 request failed: {exc}")) from None


def list_objects(client: Any, bucket: str, prefix: str, single: bool) -> list[S3Object]:
    """The objects directly under ``prefix`` (or, ``single``, the one key ``prefix``)."""
    base = prefix if single else (f"{prefix}/" if prefix else "")
    kwargs = (
        {"Bucket": bucket, "Prefix": base}
        if single
        else {"Bucket": bucket, "Prefix": base, "Delimiter": "/"}
    )
    objects = []
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
        for item in page.get("Contents", []):
            key = str(item["Key"])
            name = key.rpartition("/")[2] if single else key[len(base) :]
            if not name or name.startswith(".") or "/" in name:
                continue  # "directory" markers, hidden files (the mirror's own are hidden)
            objects.append(S3Object(key, name, int(item["Size"]), str(item["ETag"])))
    return objects
