"""`kvrun serve s3://bucket/prefix`: the frontend (config and tokenizer only) and the
engine process (everything) share one mirror, so each object is downloaded once."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from kvrun import LLM, SamplingParams
from kvrun.envs import read_env
from tests.server.conftest import Server
from tests.support.s3 import MotoServer, S3Proxy, upload_directory


def test_serve_an_s3_model(
    spawn: Callable[..., Server],
    moto: MotoServer,
    s3_proxy: S3Proxy,
    s3_bucket: str,
    random_checkpoint: Callable[..., Path],
) -> None:
    source = random_checkpoint("llama", seed=7, init_std=0.3, num_layers=2)
    keys = upload_directory(moto.client(), s3_bucket, "models/tiny", source)
    uri = f"s3://{s3_bucket}/models/tiny"
    # The real VLLM_CACHE_ROOT (the cpu kernels are built there); this bucket's mirror
    # is new, and removed at the end.
    mirror = Path(read_env().VLLM_CACHE_ROOT) / "s3" / s3_bucket
    try:
        server = spawn(
            args=[uri, "--load-format", "safetensors"],
            env={
                "S3_ENDPOINT_URL": s3_proxy.url,
                "S3_ACCESS_KEY_ID": moto.access_key_id,
                "S3_SECRET_ACCESS_KEY": moto.secret_access_key,
                "AWS_EC2_METADATA_DISABLED": "true",
            },
        )
        assert sorted(r.key for r in s3_proxy.object_gets()) == keys
        assert [m.id for m in server.client().models.list().data] == [uri]
        prompt = [1, 504, 3458, 282, 4649, 314]
        served = server.client().completions.create(
            model=uri, prompt=prompt, max_tokens=8, temperature=0.0
        )
        local = LLM(model=str(source), dtype="float32", max_model_len=256, num_kv_blocks=64)
        expected = local.generate(
            {"prompt_token_ids": prompt},
            SamplingParams(max_tokens=8, temperature=0.0),
            use_tqdm=False,
        )
        assert served.choices[0].text == expected[0].outputs[0].text
        log = server.log()
        assert moto.secret_access_key not in log and moto.access_key_id not in log
    finally:
        shutil.rmtree(mirror, ignore_errors=True)
