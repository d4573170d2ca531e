"""Publish the test checkpoints a run built to the bucket VLLM_CI_USE_S3=1 reads.

    python -m tests.support.publish_checkpoints [--bucket NAME]

After an ordinary test run has built its checkpoints under ``$KVRUN_TEST_CACHE``
(default ``~/.cache/kvrun-tests``), every directory there that holds a checkpoint
(a config.json) is uploaded to ``s3://<bucket>/<its directory name>/``, the name the
fixtures fetch under VLLM_CI_USE_S3=1 (``tests.support.checkpoints.cache_name``).
Checkpoints already in the bucket are left alone; transformers' reference outputs and
other cached files are not checkpoints and stay local. S3_ENDPOINT_URL,
S3_ACCESS_KEY_ID and S3_SECRET_ACCESS_KEY say where and how, as for loading.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from kvrun.envs import read_env
from kvrun.loader.s3_client import S3Settings, make_client
from tests.support.checkpoints import DEFAULT_CI_BUCKET, cache_root
from tests.support.s3 import upload_directory

__all__ = ["publish_checkpoints"]


def publish_checkpoints(client: Any, bucket: str, root: Path) -> list[str]:
    """Upload each checkpoint directory under ``root`` the bucket lacks; their names."""
    published = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if directory.name.startswith(".") or not (directory / "config.json").is_file():
            continue  # a build in progress, or not a checkpoint
        listed = client.list_objects_v2(Bucket=bucket, Prefix=f"{directory.name}/", MaxKeys=1)
        if listed.get("KeyCount", 0):
            continue
        upload_directory(client, bucket, directory.name, directory)
        published.append(directory.name)
    return published


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bucket", default=os.environ.get("KVRUN_TEST_S3_BUCKET", DEFAULT_CI_BUCKET)
    )
    args = parser.parse_args()
    env = read_env()
    client = make_client(S3Settings.from_env(env), f"s3://{args.bucket}")
    for name in publish_checkpoints(client, args.bucket, cache_root()):
        print(f"published s3://{args.bucket}/{name}/")


if __name__ == "__main__":
    main()
