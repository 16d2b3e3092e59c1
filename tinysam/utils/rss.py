"""This process's resident memory, from Linux's /proc/self/status: now, and its peak.

The peak (VmHWM) can be reset (`reset_peak_rss`), so one call's own peak can be read in a process
that loaded a model first; `resource`'s ru_maxrss cannot be reset, and after an exec it carries
the forking parent's peak.
"""


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key)) << 10


def rss_bytes() -> int:
    """Resident memory now (VmRSS)."""
    return _status_bytes("VmRSS:")


def peak_rss_bytes() -> int:
    """The peak of resident memory (VmHWM) since the process started or `reset_peak_rss`."""
    return _status_bytes("VmHWM:")


def reset_peak_rss() -> None:
    """Start the peak afresh from the resident memory now (Linux 4.0+)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
