"""Late work (issue 24 item 5, part): a late policy in ``assignment.json`` (key ``late``) and an
extensions list; the gradebook shows the raw score, the penalty and the final score.

    "late": {"due": "2026-12-01T23:59:00+01:00",
             "policy": "none" | "percent_per_day" | "zero_after",
             "percent_per_day": 10,                  # percent_per_day: of the raw score, per started day
             "zero_after": "2026-12-08T23:59:00+01:00",  # after this: 0 (either policy; alone: zero_after)
             "extensions": {"12345": "2026-12-03T23:59:00+01:00", "anna": "+2d"}}

The submission time is Gradescope's ``:created_at``, else the file's modification time; a Canvas
file marked ``LATE`` whose file time is not after the due date counts as one day late (Canvas
says late without saying when), unless the student has an extension. A date without a time zone is UTC.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta, timezone

POLICIES = ("none", "percent_per_day", "zero_after")


class PolicyError(ValueError):
    pass


def _when(text) -> datetime:
    if isinstance(text, datetime):
        d = text
    else:
        t = str(text).strip()
        t = re.sub(r"^(\d{4}-\d\d-\d\d) (\d\d:\d\d(?::\d\d(?:\.\d+)?)?) ?([+-]\d\d):?(\d\d)$", r"\1T\2\3:\4", t)
        m = re.match(r"^(.*\.\d{6})\d+(.*)$", t)  # Gradescope's nanoseconds
        if m:
            t = m[1] + m[2]
        try:
            d = datetime.fromisoformat(t.replace("Z", "+00:00"))
        except ValueError as e:
            raise PolicyError(f"not a date: {text!r}") from e
    return d if d.tzinfo else d.replace(tzinfo=timezone.utc)


def parse_policy(manifest: dict) -> dict | None:
    """The checked ``late`` entry of the manifest, or None (no policy). Raises PolicyError."""
    cfg = manifest.get("late")
    if not cfg:
        return None
    if not isinstance(cfg, dict):
        raise PolicyError("assignment.json 'late' must be an object")
    policy = cfg.get("policy", "none")
    if policy not in POLICIES:
        raise PolicyError(f"late policy {policy!r}: one of {', '.join(POLICIES)}")
    if policy == "none":
        return None
    out = {"policy": policy, "due": _when(cfg["due"]) if "due" in cfg else None,
           "zero_after": _when(cfg["zero_after"]) if cfg.get("zero_after") else None,
           "percent_per_day": float(cfg.get("percent_per_day", 0)), "extensions": {}}
    if out["due"] is None:
        raise PolicyError("a late policy needs 'due'")
    if policy == "zero_after" and out["zero_after"] is None:
        out["zero_after"] = out["due"]
    for student, ext in (cfg.get("extensions") or {}).items():
        m = re.match(r"^\+(\d+(?:\.\d+)?)d$", str(ext).strip())
        out["extensions"][str(student)] = timedelta(days=float(m[1])) if m else _when(ext)
    return out


def assess(policy: dict | None, student: str, submitted_at: str, canvas_late: bool = False) -> tuple[float, float, str]:
    """(days late, share of the raw score taken, why) for one student."""
    if policy is None:
        return 0.0, 0.0, ""
    ext = policy["extensions"].get(student)
    due = policy["due"] + ext if isinstance(ext, timedelta) else ext if ext is not None else policy["due"]
    zero = policy["zero_after"]
    if zero is not None and ext is not None:
        zero = max(zero, due)
    try:
        when = _when(submitted_at) if submitted_at else None
    except PolicyError:
        when = None
    if when is None or when <= due:
        if canvas_late and ext is None:  # Canvas's LATE is against its own due date, not an extension
            days = 1.0
        else:
            return 0.0, 0.0, "" if when is not None else "no submission time: no penalty"
    else:
        days = float(math.ceil((when - due).total_seconds() / 86400))
    if zero is not None and when is not None and when > zero:
        return days, 1.0, f"after {zero.isoformat()}: zero"
    if policy["policy"] == "percent_per_day":
        share = min(1.0, policy["percent_per_day"] * days / 100)
        return days, share, f"{days:g} day(s) late x {policy['percent_per_day']:g}%"
    return days, 0.0, f"{days:g} day(s) late"
