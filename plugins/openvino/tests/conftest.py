"""Fixtures the openvino tests share with the core's engine tests.

This directory runs on its own too (`pytest plugins/openvino/tests`), where the core's
tests/conftest.py is not loaded, so the fixtures are imported here.
"""

from __future__ import annotations

from tests.engine.test_parity_smollm2 import prompts, reference
from tests.support.checkpoints import random_checkpoint, smollm2_gguf_path, smollm2_hf_dir

__all__ = ["prompts", "random_checkpoint", "reference", "smollm2_gguf_path", "smollm2_hf_dir"]
