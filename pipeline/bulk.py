"""``@bulk``: driver code that builds a Python object per input runs with the cyclic GC paused.

The driver holds an object or more per input (the listing, the shards, the read tasks,
ledger rows); none of them form reference cycles, and reference counting frees them as
ever. But while a step builds a million of them, CPython's cyclic collector runs again and
again over every object alive, so the step grew faster than linearly: at 100k inputs,
building the read tasks took 0.63 s with it and 0.13 s without, the nightly bookkeeping
1.43 s and 0.60 s (``make bench-scale``, bench/README.md). Pausing it during such steps
(as ``json.loads`` or pickle users commonly do) keeps them linear; it runs again after.

Only for steps that compute: not around network I/O (the listing of a bucket), whose
client libraries make cyclic garbage per request that would pile up meanwhile.
"""

from __future__ import annotations

import functools
import gc


def bulk(fn):
    """Runs ``fn`` with the cyclic garbage collector paused (nested calls are fine)."""

    @functools.wraps(fn)
    def paused(*args, **kwargs):
        was = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if was:
                gc.enable()

    return paused
