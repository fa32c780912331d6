"""Once started, the task server keeps what start-up made out of the garbage collector's passes
and runs them less often (S5: with Python's defaults they took a third of its CPU)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import gc
from tickle.taskserver.service import GC_THRESHOLD, settle_gc
before = gc.get_freeze_count()
settle_gc()
print(before, gc.get_freeze_count() > before, gc.get_threshold() == GC_THRESHOLD)
"""


def test_settling_freezes_what_start_up_made_and_raises_the_thresholds() -> None:
    # in a process of its own: the test process's collector stays as it is
    done = subprocess.run(
        [sys.executable, "-c", CHECK], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.split() == ["0", "True", "True"]
