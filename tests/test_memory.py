"""sdft_lite.memory: a process's own peak RSS, not the peak of the process that started it."""

import subprocess
import sys
from pathlib import Path

import pytest

from sdft_lite.memory import current_rss_mib, peak_rss_mib, proc_status_kib

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(proc_status_kib("VmHWM") is None, reason="needs /proc/self/status")


def run_python(code: str) -> list[float]:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    return [float(x) for x in out.split()]


@linux_only
def test_a_child_does_not_report_its_parents_peak():
    # The parent touches 300 MiB, frees it, then starts a small child (as the app starts
    # `sdft-lite train`). ru_maxrss in the child still says >= 300 MiB; peak_rss_mib does not.
    child = (
        "import resource; from sdft_lite.memory import peak_rss_mib; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, peak_rss_mib())"
    )
    parent = (
        "import subprocess, sys\n"
        "x = bytearray(300 * 2**20)\n"
        "for i in range(0, len(x), 4096): x[i] = 1\n"
        "del x\n"
        f"subprocess.run([sys.executable, '-c', {child!r}], check=True)\n"
    )
    inherited, own = run_python(parent)
    assert inherited >= 300  # what the old measurement reported
    assert own < 100, own  # a bare interpreter + this module


@linux_only
def test_peak_sees_a_touched_allocation_and_reset_lowers_it():
    code = (
        "from sdft_lite.memory import current_rss_mib, peak_rss_mib, reset_peak_rss\n"
        "base = peak_rss_mib()\n"
        "x = bytearray(200 * 2**20)\n"
        "for i in range(0, len(x), 4096): x[i] = 1\n"
        "during = peak_rss_mib()\n"
        "del x\n"
        "ok = reset_peak_rss()\n"
        "print(base, during, peak_rss_mib(), current_rss_mib(), float(ok))\n"
    )
    base, during, after_reset, now, ok = run_python(code)
    assert during >= base + 195
    if ok:  # Linux >= 4.0 lets a process reset its own VmHWM
        assert after_reset < during - 150
        assert after_reset >= now - 1


def test_readings_are_positive_here():
    assert peak_rss_mib() > 0
    now = current_rss_mib()
    assert now is None or 0 < now <= peak_rss_mib() + 1
