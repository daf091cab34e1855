"""Building and reading the generic ``call`` probe (``worker.probe_call``) for assignment 2's checkers
(``checker_norms``, ``checker_norms_experiments``): a probe is a list of calls of the student's
functions by name; its result holds each call's output (or the exception it raised)."""

from __future__ import annotations

from .checker import Fail, _probe_result


def _call(pid, phase, *calls):
    return {"id": pid, "kind": "call", "phase": phase, "calls": list(calls)}


def _fn(name, *args, expect_error=False, return_args=False, **kwargs):
    return {"fn": name, "args": list(args), "kwargs": kwargs, "expect_error": expect_error, "return_args": return_args}


def _calls(outputs, pid) -> list:
    calls = _probe_result(outputs, pid).get("calls")
    if not isinstance(calls, list):
        raise Fail("malformed result")
    return calls


def _out(outputs, pid, k=0, n=None, what="the function"):
    """Output of call k (a list of n values when n is given)."""
    calls = _calls(outputs, pid)
    if len(calls) <= k or not isinstance(calls[k], dict) or "out" not in calls[k]:
        raise Fail(f"{what} did not return")
    out = calls[k]["out"]
    if n is not None and (not isinstance(out, list) or len(out) != n):
        raise Fail(f"{what} must return {n} values")
    return out
