"""`blockera forget`: which snapshots a retention policy keeps, by restic 0.14's rules
(docs/backup-repository.md §19).

Snapshots are grouped (by default by host name and path set, as `restic forget`; also by tags
on request) and the policy applies to each group alone. Within a group, newest first:

* `--keep-last n` keeps the n newest snapshots;
* `--keep-hourly/daily/weekly/monthly/yearly n` keeps, for each of the n newest hours (days,
  ISO weeks, months, years) that have snapshots, the newest snapshot in it; the periods are
  taken in each snapshot's own recorded time zone, as restic does;
* a snapshot is kept when any rule keeps it; the others are removed.

(restic 0.16 and later also keep the oldest snapshot of a group while a rule still has counts
left; 0.14, the version this follows and is tested against, does not.)

Forgetting removes snapshot files only; `prune` then removes the data no snapshot uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from blockera.backup.backend import FileType
from blockera.backup.errors import BackendNotFoundError
from blockera.backup.repository import Repository
from blockera.backup.snapshots import Snapshot
from blockera.errors import UsageError

GROUP_KEYS = ("host", "paths", "tags")


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def empty(self) -> bool:
        return not any((self.last, self.hourly, self.daily, self.weekly, self.monthly,
                        self.yearly))

    def describe(self) -> str:
        parts = [f"{n} {what}" for n, what in ((self.last, "latest"), (self.hourly, "hourly"),
                                                (self.daily, "daily"), (self.weekly, "weekly"),
                                                (self.monthly, "monthly"),
                                                (self.yearly, "yearly")) if n]
        return "keep " + ", ".join(parts) + " snapshots" if parts else "remove"


def _periods(snapshot: Snapshot) -> dict[str, int]:
    t = snapshot.time.to_datetime()
    iso_year, iso_week, _ = t.isocalendar()
    return {"hourly": ((t.year * 100 + t.month) * 100 + t.day) * 100 + t.hour,
            "daily": (t.year * 100 + t.month) * 100 + t.day,
            "weekly": iso_year * 100 + iso_week,
            "monthly": t.year * 100 + t.month,
            "yearly": t.year}


_REASONS = {"last": "last snapshot", "hourly": "hourly snapshot", "daily": "daily snapshot",
            "weekly": "weekly snapshot", "monthly": "monthly snapshot",
            "yearly": "yearly snapshot"}


def apply_policy(snapshots: list[Snapshot], policy: KeepPolicy
                 ) -> tuple[list[Snapshot], list[Snapshot], dict[bytes, list[str]]]:
    """(keep, remove, reasons by snapshot ID) for one group, newest first."""
    ordered = sorted(snapshots, key=lambda s: -s.time.unix_ns)
    if policy.empty():
        return ordered, [], {s.id or b"": ["policy is empty"] for s in ordered}
    counts = {"last": policy.last, "hourly": policy.hourly, "daily": policy.daily,
              "weekly": policy.weekly, "monthly": policy.monthly, "yearly": policy.yearly}
    last_seen: dict[str, int | None] = {k: None for k in counts}
    keep: list[Snapshot] = []
    remove: list[Snapshot] = []
    reasons: dict[bytes, list[str]] = {}
    for nr, snapshot in enumerate(ordered):
        periods = _periods(snapshot)
        matched = []
        for rule, left in counts.items():
            if left <= 0:
                continue
            value = nr if rule == "last" else periods[rule]
            if value != last_seen[rule]:
                last_seen[rule] = value
                counts[rule] -= 1
                matched.append(_REASONS[rule])
        if matched:
            keep.append(snapshot)
            reasons[snapshot.id or b""] = matched
        else:
            remove.append(snapshot)
    return keep, remove, reasons


@dataclass
class ForgetGroup:
    hostname: str | None
    paths: list[str] | None
    tags: list[str] | None
    keep: list[Snapshot] = field(default_factory=list)
    remove: list[Snapshot] = field(default_factory=list)
    reasons: dict[bytes, list[str]] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        def brief(s: Snapshot) -> dict[str, object]:
            return {"id": s.id.hex() if s.id else None, "short_id": s.short_id,
                    "time": s.time.format(), "hostname": s.hostname, "paths": s.paths,
                    "tags": s.tags}
        return {"host": self.hostname or "", "paths": self.paths, "tags": self.tags,
                "keep": [brief(s) for s in self.keep], "remove": [brief(s) for s in self.remove],
                "reasons": [{"snapshot": s.short_id, "matches": self.reasons.get(s.id or b"", [])}
                            for s in self.keep]}


def parse_group_by(text: str) -> set[str]:
    keys = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        name = {"hosts": "host", "path": "paths", "tag": "tags"}.get(part, part)
        if name not in GROUP_KEYS:
            raise UsageError(f"--group-by: unknown key {part!r} (use host, paths and/or tags)")
        keys.add(name)
    return keys


def plan_forget(snapshots: list[Snapshot], policy: KeepPolicy, *, group_by: set[str],
                hosts: list[str] | None = None,
                paths: list[str] | None = None) -> list[ForgetGroup]:
    """The groups and what the policy keeps and removes in each."""
    chosen = [s for s in snapshots
              if (not hosts or s.hostname in hosts) and (not paths or set(paths) <= set(s.paths))]
    groups: dict[tuple, ForgetGroup] = {}
    for s in chosen:
        key = (s.hostname if "host" in group_by else None,
               tuple(sorted(s.paths)) if "paths" in group_by else None,
               tuple(sorted(s.tags)) if "tags" in group_by else None)
        if key not in groups:
            groups[key] = ForgetGroup(key[0], list(key[1]) if key[1] is not None else None,
                                      list(key[2]) if key[2] is not None else None)
        groups[key].keep.append(s)
    for group in groups.values():
        group.keep, group.remove, group.reasons = apply_policy(group.keep, policy)
    return [groups[k] for k in sorted(groups, key=lambda k: tuple(str(x) for x in k))]


def remove_snapshots(repo: Repository, snapshots: list[Snapshot]) -> int:
    """Delete snapshot files (the caller holds an exclusive lock); how many were removed."""
    removed = 0
    for s in snapshots:
        if s.id is None:
            continue
        try:
            repo.backend.remove(FileType.SNAPSHOT, s.id.hex())
            removed += 1
        except BackendNotFoundError:
            continue
    return removed
