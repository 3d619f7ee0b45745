"""Whether the compiled kernels (``edropout._C``) fit the torch that is running: setup.py writes what they
were built against into ``_built_with.json`` beside them, and ``import edropout`` compares it with the
running torch before loading them, so that a mismatch is one line naming both, not an undefined symbol."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

REBUILD = "pip install --no-build-isolation --no-deps --force-reinstall . (in edropout's source folder)"
BUILT_WITH = Path(__file__).with_name("_built_with.json")


def running() -> dict:
    """What a build must match: the torch version with its local tag, its CUDA and its C++ ABI."""
    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI)}


def _describe(versions: dict) -> str:
    return (f"torch {versions.get('torch')} (CUDA {versions.get('cuda') or 'none'}, "
            f"C++11 ABI {int(bool(versions.get('cxx11_abi')))})")


def mismatch(built: dict, now: dict) -> Optional[str]:
    """The one-line message for kernels ``built`` against another torch than ``now``; None when they fit."""
    if all(built.get(key) == value for key, value in now.items()):
        return None
    return (f"edropout's kernels were built against {_describe(built)}, but this is {_describe(now)}; rebuild "
            f"them against the running torch: {REBUILD}")


def check() -> None:
    """ImportError (one line) when the kernels were built against another torch than the running one."""
    if not BUILT_WITH.is_file():  # a build from before the file existed: loading the kernels tells
        return
    message = mismatch(json.loads(BUILT_WITH.read_text()), running())
    if message is not None:
        raise ImportError(message)


def load_failed(error: BaseException) -> ImportError:
    """The one-line ImportError for kernels that would not load (not built, or built for another torch)."""
    package = Path(__file__).parent
    if (package.parent / "setup.py").is_file() and not any(package.glob("_C*.so")):
        return ImportError(f"this is edropout's source folder ({package.parent}), whose kernels are not built: "
                           f"import edropout from another folder, or build them here with "
                           f"pip install --no-build-isolation --no-deps -e .")
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ImportError(f"edropout's kernels could not be loaded ({first}); build them against the running "
                       f"{_describe(running())}: {REBUILD}")
