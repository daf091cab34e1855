"""The lab's Save runs / Load runs: runs kept in a JSON file across kernel restarts.

Both functions take the text of the lab's *file* box and return ``(message, level, result)``
for the lab's message box; neither raises for a bad path or a bad file.

* :func:`save_runs` *adds* the ended runs to the file: the runs already in it are kept, a run
  saved before is updated (not repeated), and a file that is not a bnviz history file is never
  overwritten (:func:`bnviz.history.save_histories` refuses it before writing).
* :func:`load_runs` reads the runs of a file and returns those not shown yet.
"""
from __future__ import annotations

from pathlib import Path

from .history import History, load_histories, save_histories

__all__ = ["save_runs", "load_runs", "parse_path"]


def parse_path(text: str) -> Path | None:
    """The path in the file box, or None if it is empty."""
    text = text.strip()
    return Path(text).expanduser() if text else None


NO_PATH = ("Enter a file name in the file box, e.g. bnviz_runs.json.", "error")


def save_runs(text: str, histories: list[History], running: bool) -> tuple[str, str, Path | None]:
    """Add the ended runs among ``histories`` to the file named by ``text``."""
    path = parse_path(text)
    if path is None:
        return (*NO_PATH, None)
    runs = [h for h in histories if h.status not in ("running", "pending")]
    if not runs:
        return "Nothing to save yet: no run has ended.", "warning", None
    try:
        before = {h.uid for h in load_histories(path)} if path.is_file() else set()
        save_histories(runs, path, mode="merge")  # raises ValueError before writing a foreign file
        total = len(load_histories(path))
    except ValueError as err:  # a foreign or corrupt file: not written
        return f"Not saved: {err}. The file was left as it was; choose another file name.", "error", None
    except OSError as err:
        return f"Could not save to {path}: {err}. Enter a writable file path, e.g. bnviz_runs.json.", "error", None
    added = sum(h.uid not in before for h in runs)
    again = len(runs) - added
    note = f" ({again} run(s) saved before were updated)" if again else ""
    going = " The current run is still going: save again when it ends." if running else ""
    return f"Added {added} run(s) to {path.resolve()}{note}, which now holds {total} run(s).{going}", "info", path


def load_runs(text: str, shown: list[History]) -> tuple[str, str, list[History]]:
    """The runs saved in the file named by ``text`` that are not among ``shown``."""
    path = parse_path(text)
    if path is None:
        return (*NO_PATH, [])
    if not path.is_file():
        return f"No such file: {path}. Enter the path of a file written by Save runs.", "error", []
    try:
        loaded = load_histories(path)
    except ValueError as err:
        return str(err), "error", []
    except OSError as err:
        return f"Could not read {path}: {err}.", "error", []
    uids = {h.uid for h in shown}
    runs = [h for h in loaded if h.uid not in uids]
    skipped = f" ({len(loaded) - len(runs)} already shown)" if len(runs) < len(loaded) else ""
    return f"Loaded {len(runs)} run(s) from {path}{skipped}.", "info", runs
