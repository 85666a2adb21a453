#!/usr/bin/env python3
"""The trainer container's healthcheck: healthy once FILE was written by this container's run.

    and-healthcheck /runs/digits/config.yaml

Exit 0 when FILE exists and was last written after the container's main process (PID 1)
started, 1 otherwise. compose.yaml points it at the run directory's config.yaml, which
``trainer run`` writes once every input check has passed and the store exists, so that
nbr-index starts only then. A config.yaml left by an earlier run on the same volume is older
than this start and does not count (the trainer refuses such a run directory).
Standard library only; Docker runs it inside the container every few seconds.
"""
from __future__ import annotations

import os
import sys


def process_start(pid: int = 1) -> float:
    """Wall-clock time (epoch seconds) at which process ``pid`` started (PID 1: the container's
    main process).

    /proc/PID/stat gives the start in clock ticks after boot and /proc/stat the boot time in
    whole seconds, so the result can be up to one second early.
    """
    with open("/proc/stat") as fh:
        boot = next(int(line.split()[1]) for line in fh if line.startswith("btime "))
    with open(f"/proc/{pid}/stat") as fh:
        after_name = fh.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    start_ticks = int(after_name[19])  # field 22 of proc(5); fields after the name start at 3
    return boot + start_ticks / os.sysconf("SC_CLK_TCK")


def written_since_start(path: str) -> bool:
    try:
        return os.stat(path).st_mtime >= process_start()
    except FileNotFoundError:
        return False


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(f"usage: {os.path.basename(sys.argv[0])} FILE")
    sys.exit(0 if written_since_start(sys.argv[1]) else 1)
