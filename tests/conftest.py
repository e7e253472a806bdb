"""Fixtures shared by the test files."""

from __future__ import annotations

import pytest

from deepseek_mini.data import make_datasets


@pytest.fixture(scope="module")
def data():
    """A small synthetic corpus (200 documents, seed 0), built once per test module."""
    return make_datasets("synthetic", n_docs=200, seed=0)
