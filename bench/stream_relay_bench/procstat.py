"""CPU time and resident memory of process trees, read from /proc (Linux only).

A scenario's process (Envoy, nginx's master, pushpin's runner) may fork workers; every figure
here covers a process and its live descendants, so a peer's workers count as the peer. A role
may have several roots (pushpin + zurl, or every relay node of a scale-out stack): its figure
is that of the union of their trees.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Sample:
    cpu_s: float  # user + system CPU seconds of the tree
    rss_bytes: int  # resident memory of the tree


def _table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, cpu ticks, rss pages) for every live process."""
    table: dict[int, tuple[int, int, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:  # fields after "(comm)": state ppid ... utime(12th) stime(13th) ... rss(22nd)
            fields = Path("/proc", name, "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        table[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[21]))
    return table


def descendants(roots: Iterable[int], table: dict[int, tuple[int, int, int]]) -> set[int]:
    tree = set(roots)
    frontier = set(tree)
    while frontier:
        frontier = {p for p, row in table.items() if row[0] in frontier} - tree
        tree |= frontier
    return tree


def sample(pids: Mapping[str, Sequence[int]]) -> dict[str, Sample]:
    """One Sample per role: the union of its roots' trees (a tree that is gone counts as zero;
    a union, so a root inside another's tree is not counted twice)."""
    table = _table()
    out = {}
    for name, roots in pids.items():
        rows = [table[p] for p in descendants(roots, table) if p in table]
        ticks, pages = sum(r[1] for r in rows), sum(r[2] for r in rows)
        out[name] = Sample(ticks / _CLK_TCK, pages * _PAGE)
    return out


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (not its tree): what the relay node itself holds."""
    try:
        for line in Path("/proc", str(pid), "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
