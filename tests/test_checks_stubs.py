"""Every exercise check, of every chapter, reports an untouched stub as not implemented (never a crash)."""

from __future__ import annotations

import pytest

from deepseek_mini import checks

ALL_CHECKS = [getattr(checks, name) for name in checks.__all__ if name.startswith("check_")]


@pytest.mark.parametrize("check", ALL_CHECKS, ids=[check.__name__ for check in ALL_CHECKS])
def test_an_unfinished_stub_is_reported_as_not_implemented(check):
    def stub(*args, **kwargs):
        raise NotImplementedError("Exercise x: replace this line with your solution")

    with pytest.raises(checks.CheckFailure, match="not implemented yet"):
        check(stub)
