"""This process's resident memory: current, peak, and a peak reset (standard library only).

The peak is the kernel's high-water mark of this process's own address space (`VmHWM` in
/proc/self/status on Linux). `getrusage(...).ru_maxrss` is not used where VmHWM exists: Linux
carries it across fork and exec, so a child started by a large parent reports at least the
parent's peak. Measured: a parent that had touched 500 MiB started `python -c ...`, whose
ru_maxrss said 511 MiB while its VmHWM said 11 MiB. That is how the Gradio app (a big process)
starts `sdft-lite train`, and how the benchmark starts each measured run.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")


def proc_status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (e.g. "VmRSS", "VmHWM"); None where there is none."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return None


def peak_rss_mib() -> float:
    """Peak resident set of this process, MiB: VmHWM, else ru_maxrss (KiB on Linux, bytes on macOS)."""
    hwm = proc_status_kib("VmHWM")
    if hwm is not None:
        return hwm / 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def current_rss_mib() -> float | None:
    """Resident set now, MiB (Linux); None elsewhere."""
    rss = proc_status_kib("VmRSS")
    return None if rss is None else rss / 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True
