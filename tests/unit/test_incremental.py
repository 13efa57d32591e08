"""The nightly job's own checks (the ledger's planning is tests/unit/test_ledger.py)."""

import pytest

from pipeline.config import ConfigError
from pipeline.incremental import check_date


@pytest.mark.parametrize("bad", ["2026-13-01", "26/11/2026", ""])
def test_check_date(bad):
    with pytest.raises(ConfigError):
        check_date(bad)
    assert check_date("2026-11-26") == "2026-11-26"
