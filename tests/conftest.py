import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of a script (minutes on 2 cores)")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data samples beside the checkout; CI always has them, a user's clone may not."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI") == "true":
            raise FileNotFoundError(f"CI=true but the shared data folder {SHARED_DATA} is missing")
        pytest.skip(f"real data samples not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny Qwen2 and its tokenizer, written to disk and loaded by path."""
    from common.models import build_tiny_model
    from tasks.arithmetic import tiny_corpus

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", tiny_corpus())
