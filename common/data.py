"""Datasets from a hub id or a local file, with rows checked as they are read.

A malformed row stops the run with an error that names the row and the field, instead of surfacing
later as a shape error or a silent zero reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class DataError(ValueError):
    """A dataset row lacks a field it needs, or has one of the wrong type."""


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows of a dataset given as a local .jsonl/.json/.parquet file or directory, or a hub id."""
    import datasets

    path = Path(source).expanduser()
    if path.exists():
        files = sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.suffix in _FORMATS)
        if not files:
            raise DataError(f"{source}: no .jsonl, .json or .parquet file found there")
        builder = _FORMATS[files[0].suffix]
        dataset = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    else:
        try:
            dataset = datasets.load_dataset(source, split=split)
        except Exception as error:  # the hub client raises many types for "unreachable" / "no such repo"
            raise DataError(
                f"Could not load the dataset '{source}': it is not a local file or directory, and loading it "
                f"from the Hugging Face Hub failed ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
                f"Offline, download it elsewhere and pass the local .parquet or .jsonl path instead."
            ) from error
    return [dict(row) for row in dataset]


_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def require(row: dict, index: int, source: str, field: str, kind: type | tuple = object) -> Any:
    """`row[field]` (a dotted path such as "reward_model.ground_truth"), or a DataError naming both."""
    value: Any = row
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value or value[part] is None:
            raise DataError(f"{source}: row {index} has no field '{field}' (its fields: {sorted(row)})")
        value = value[part]
    if not isinstance(value, kind):
        raise DataError(f"{source}: row {index} field '{field}' should be {kind}, got {type(value).__name__}")
    return value

