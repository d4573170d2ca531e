"""Finding NCCL and the CUDA runtime on disk, in the order vLLM's variables promise.

NCCL: ``VLLM_NCCL_SO_PATH`` (a file, used as given), else every directory of
``LD_LIBRARY_PATH``, else ``CUDA_HOME``'s library directories. The CUDA runtime
follows ``VLLM_CUDART_SO_PATH`` the same way. A path set explicitly that does not
exist is an error, never a reason to look elsewhere; when nothing is found the error
lists every place that was searched. Pure file-system code: tested on CPU with real
files in a temporary directory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from kvrun.errors import ConfigError

__all__ = ["CUDART", "NCCL", "FoundLibrary", "LibrarySpec", "find_library"]


@dataclass(frozen=True)
class LibrarySpec:
    """A shared library and the variable that names it directly."""

    what: str  # how messages name it
    file_names: tuple[str, ...]  # candidates in each directory, in order of preference
    path_variable: str  # the VLLM_* variable holding a full path to the file


@dataclass(frozen=True)
class FoundLibrary:
    """Where a library was found and which rule found it."""

    path: Path
    source: str  # e.g. "VLLM_NCCL_SO_PATH", "LD_LIBRARY_PATH", "CUDA_HOME"


NCCL = LibrarySpec("NCCL", ("libnccl.so.2", "libnccl.so"), "VLLM_NCCL_SO_PATH")
CUDART = LibrarySpec(
    "the CUDA runtime",
    ("libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so"),
    "VLLM_CUDART_SO_PATH",
)
# Where toolkits put their libraries under CUDA_HOME (the last: NVIDIA's x86-64 layout).
_CUDA_HOME_DIRS = ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"))


def find_library(
    spec: LibrarySpec,
    explicit: str | None,
    ld_library_path: str | None,
    cuda_home: str | None,
) -> FoundLibrary:
    """The library's path, or a ConfigError naming every place that was looked at."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(
                f"{spec.path_variable}={explicit!r} does not name an existing file; set it "
                f"to the full path of {spec.what} (e.g. .../{spec.file_names[0]}) or unset it "
                "to search LD_LIBRARY_PATH and CUDA_HOME"
            )
        return FoundLibrary(path, spec.path_variable)
    searched: list[str] = []
    groups = (
        ("LD_LIBRARY_PATH", [d for d in (ld_library_path or "").split(os.pathsep) if d]),
        ("CUDA_HOME", [os.path.join(cuda_home, d) for d in _CUDA_HOME_DIRS] if cuda_home else []),
    )
    for source, directories in groups:
        for directory in directories:
            for name in spec.file_names:
                candidate = Path(directory) / name
                if candidate.is_file():
                    return FoundLibrary(candidate, source)
            searched.append(directory)
    where = ", ".join(searched) if searched else "nowhere: LD_LIBRARY_PATH and CUDA_HOME are unset"
    raise ConfigError(
        f"{spec.what} ({' or '.join(spec.file_names)}) was not found; searched {where}; set "
        f"{spec.path_variable} to the library file, or add its directory to LD_LIBRARY_PATH"
    )
