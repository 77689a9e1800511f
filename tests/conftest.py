"""Shared test fixtures: where the real data in ../shared lives (tests that need it skip when it is absent)."""

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def shared_path(*parts: str) -> Path:
    """A path under ../shared; the calling test is skipped when it is not there."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is not available (real data lives in ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def coco128() -> Path:
    """../shared/data/coco128: 128 real COCO train2017 photos with their original annotations."""
    return shared_path("data", "coco128")
