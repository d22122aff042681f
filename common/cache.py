"""Things built once and then reused: tiny models, their warm starts, synthetic data.

A build is named by a key over everything it is built from, and goes into a scratch folder beside its
destination that is renamed when the build is complete: a build killed halfway leaves nothing that looks
finished, and of two processes building the same thing, the first to finish wins.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache"


def config_key(content) -> str:
    """12 hex digits naming a build by everything it is built from (any JSON-serialisable value)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def build_once(out_dir: Path, build: Callable[[Path], object]) -> Path:
    """`out_dir`, written by `build(folder)` into an empty scratch folder and renamed when complete; as it is
    when it already exists."""
    out_dir = Path(out_dir)
    if out_dir.is_dir():
        return out_dir
    scratch = out_dir.with_name(f".building-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    build(scratch)
    try:
        scratch.rename(out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(scratch)
    return out_dir
