"""How many CPU cores this process may use: its affinity mask, capped by its cgroup's CPU quota.

`os.cpu_count()` counts the machine's cores, not the ones a process may run on: a container limited
to 2 CPUs on a 64-core host (cgroup quota), or a process started under `taskset`, would otherwise
start 64 compute threads that take turns on 2 cores, spinning in the OpenMP runtime while they wait.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(root: Path | str = "/") -> int:
    """Cores this process may use: len(os.sched_getaffinity(0)), capped by the CPU quota of its
    cgroup and of that cgroup's ancestors (a fractional quota rounds up), at least 1. `root`: where
    /proc and the cgroup mounts are read from (tests point it at a fake tree)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cgroup_cpu_quota(root)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cgroup_cpu_quota(root: Path | str = "/") -> float | None:
    """The tightest CPU quota (in cores: quota / period) on this process's cgroup or its ancestors,
    cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`); None when unlimited or
    unknown (not Linux, no cgroup mount)."""
    root = Path(root)
    try:
        mountinfo = (root / "proc/self/mountinfo").read_text(encoding="utf-8")
        membership = (root / "proc/self/cgroup").read_text(encoding="utf-8")
    except OSError:
        return None
    quotas = [q for d in _cgroup_dirs(root, mountinfo, membership) if (q := _quota_in(d)) is not None]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: Path, mountinfo: str, membership: str) -> list[Path]:
    """The process's cgroup directories that hold CPU limits and every ancestor up to each mount."""
    paths: dict[str, str] = {}  # "v2" or "v1" -> the process's cgroup path in that hierarchy
    for line in membership.splitlines():
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":
            paths["v2"] = path
        elif "cpu" in controllers.split(","):
            paths["v1"] = path
    dirs = []
    for line in mountinfo.splitlines():
        # "36 35 98:0 /mnt/root /mnt/point rw,noatime master:1 - cgroup cgroup rw,cpu,cpuacct"
        before, _, after = line.partition(" - ")
        fields, super_fields = before.split(), after.split()
        if len(fields) < 5 or len(super_fields) < 3:
            continue
        mount_root, mount_point, fstype = fields[3], fields[4], super_fields[0]
        if fstype == "cgroup2" and "v2" in paths:
            path = paths["v2"]
        elif fstype == "cgroup" and "cpu" in super_fields[2].split(",") and "v1" in paths:
            path = paths["v1"]
        else:
            continue
        # In a container the mount's root is the container's own cgroup: the path below it is what
        # is left of the process's path after that root (nothing when they are the same).
        relative = path[len(mount_root):] if path.startswith(mount_root) else ""
        top = root / mount_point.lstrip("/")
        here = top / relative.strip("/")
        dirs += [here, *[p for p in here.parents if p.is_relative_to(top)]]
    return dirs


def _quota_in(folder: Path) -> float | None:
    """The quota set in one cgroup directory, in cores; None if unlimited or not there."""
    try:
        if (folder / "cpu.max").exists():  # v2: "QUOTA PERIOD" in microseconds, QUOTA "max" if unlimited
            quota, period = (folder / "cpu.max").read_text(encoding="utf-8").split()[:2]
            quota_us, period_us = (-1 if quota == "max" else int(quota)), int(period)
        else:  # v1: quota -1 if unlimited
            quota_us = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
            period_us = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def set_cpu_threads() -> int:
    """Cap torch's compute threads at the usable cores, unless OMP_NUM_THREADS says otherwise (the
    user's choice, or the pool executor's share per worker); returns the thread count in force.
    torch's own default follows the affinity mask but not a cgroup quota. Only ever lowers the
    count: a caller that chose fewer threads (torch.set_num_threads) keeps its choice."""
    import torch

    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable_cpus():
        torch.set_num_threads(usable_cpus())
    return torch.get_num_threads()
