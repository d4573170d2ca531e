"""The CPU platform's attention backends over the paged KV cache."""

from kvrun_cpu.attention.ipex import IpexAttention
from kvrun_cpu.attention.sdpa import TorchSdpaAttention

__all__ = ["IpexAttention", "TorchSdpaAttention"]
