"""Things built once and then reused: the tiny base models shipped in models/, and what is cached in .cache/
(random tiny models, warm starts of other configs, synthetic data).

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

ROOT = Path(__file__).resolve().parent.parent
CACHE_DIR = ROOT / ".cache"
MODELS_DIR = ROOT / "models"

# The tiny base models shipped in models/, and the command (run from the repository root) that rebuilds each.
REBUILD_COMMANDS = {
    "tiny-arithmetic": "python -m tasks.arithmetic --rebuild",
    "tiny-arithmetic-quick": "python -m tasks.arithmetic --rebuild --quick",
    "tiny-tool-use": "python -m tasks.tiny_tool_use --rebuild",
    "tiny-textcraft": "python -m tasks.tiny_textcraft --rebuild",
    "tiny-chains": "python -m tasks.chains --rebuild",
    "tiny-chains-orm": "python -m tasks.tiny_chains_orm --rebuild",
}


def config_key(content) -> str:
    """12 hex digits naming a build by everything it is built from (any JSON-serialisable value)."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:12]


def build_once(out_dir: Path, build: Callable[[Path], object], replace: bool = False) -> Path:
    """`out_dir`, written by `build(folder)` into an empty scratch folder and renamed when complete; as it is
    when it already exists, unless `replace` (the new build then takes the old one's place once complete)."""
    out_dir = Path(out_dir)
    if out_dir.is_dir() and not replace:
        return out_dir
    scratch = out_dir.with_name(f".building-{out_dir.name}-{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        build(scratch)
    except BaseException:
        shutil.rmtree(scratch)
        raise
    if replace:
        shutil.rmtree(out_dir, ignore_errors=True)
    try:
        scratch.rename(out_dir)
    except OSError:  # another process finished the same build first
        shutil.rmtree(scratch)
    return out_dir


def shipped_model(name: str) -> str:
    """The directory of a tiny base model shipped in models/; if it is missing, the error names the command
    that rebuilds it."""
    path = MODELS_DIR / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the tiny base model {name} is missing from {path}; rebuild it (from the "
                                f"repository root) with `{REBUILD_COMMANDS[name]}`")
    return str(path)


def rebuild_shipped(name: str, build: Callable[[Path], str], description: str, config: dict,
                    models_dir: Path = MODELS_DIR) -> Path:
    """Rebuild models/NAME: `build(folder)` writes the model and returns what it measured (a line of the card);
    CARD.md is written beside it, and the new folder replaces the old one once complete."""
    def build_with_card(folder: Path) -> None:
        measured = build(folder)
        write_card(folder, name, description, config, measured)

    return build_once(models_dir / name, build_with_card, replace=True)


def write_card(folder: Path, name: str, description: str, config: dict, measured: str) -> None:
    """CARD.md: what the model is, the command that rebuilds it, what its build measured, the checksum of its
    weights, and its config."""
    import textwrap

    import torch
    from safetensors.torch import load_file

    weights = folder / "model.safetensors"
    parameters = sum(tensor.numel() for tensor in load_file(weights).values())
    threads = torch.get_num_threads()
    items = [
        f"**Rebuild** (from the repository root): `{REBUILD_COMMANDS[name]}`. It writes this folder, this card "
        f"included, and replaces the old one once the build is complete.",
        f"**Measured by the build:** {measured}.",
        f"**Weights:** `model.safetensors`, {parameters:,} parameters in float32, sha256 "
        f"`{hashlib.sha256(weights.read_bytes()).hexdigest()}`.",
        f"**Built** on CPU with torch {torch.__version__}, {threads} thread{'s' * (threads > 1)}. A rebuild on "
        f"the same machine with as many threads gives the same files; on another CPU the last bits of the "
        f"arithmetic differ, and the build may differ with them, so the files shipped here are the reference that "
        f"every machine uses.",
    ]
    bullets = "\n".join(textwrap.fill(item, 110, initial_indent="- ", subsequent_indent="  ") for item in items)
    card = "\n\n".join([f"# {name}", textwrap.fill(description, 110), bullets,
                         f"## Config\n\n```json\n{json.dumps(config, indent=2)}\n```"])
    (folder / "CARD.md").write_text(card + "\n")
