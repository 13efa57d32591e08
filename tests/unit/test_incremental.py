"""The nightly job's own checks (the ledger's planning is tests/unit/test_ledger.py)."""

import pytest

from pipeline.config import ConfigError
from pipeline.incremental import check_date


@pytest.mark.parametrize("bad", ["2026-13-01", "26/11/2026", ""])
def test_check_date(bad):
    with pytest.raises(ConfigError):
        check_date(bad)
    assert check_date("2026-11-26") == "2026-11-26"


def test_inputs_whose_urls_differ_only_in_their_query_are_refused():
    """The ledger keys inputs by their redacted URI: two thumbnails ``thumb.jpg?id=1`` and
    ``?id=2`` were one key, and one of them was never done, night after night."""
    from pipeline.incremental import ledger_keys
    from pipeline.sources import InputError

    ok = ledger_keys(["s3://b/a.tar", "https://h/x.jpg?X-Amz-Signature=s", "https://h/y.jpg"])
    assert ok == {"s3://b/a.tar": "s3://b/a.tar", "https://h/x.jpg?<redacted>": "https://h/x.jpg?X-Amz-Signature=s",
                  "https://h/y.jpg": "https://h/y.jpg"}  # fmt: skip
    with pytest.raises(InputError, match=r"two inputs are both https://h/thumb.jpg\?<redacted>"):
        ledger_keys(["https://h/thumb.jpg?id=1", "https://h/thumb.jpg?id=2"])
