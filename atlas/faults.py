"""Fault injection for the crash tests: a build can be made to SIGKILL itself at a chosen point.

Each stage calls ``point(stage, where)`` after every unit of work (a decoded side, a layer
committed, a corpus batch, a rendered block, ...). Two environment variables act on them;
with neither set, ``point`` costs one dictionary lookup.

``ATLAS_FAULT=<stage>:<n>[:<action>]`` or ``ATLAS_FAULT=<stage>:<where>[:<action>]``
    at the n-th point of ``stage`` reached by this process (1-based), or at its first point
    named ``where`` (as the stage names it, e.g. ``render:old site moved aside``), the process sends
    itself ``SIGKILL`` (action ``kill``, the default): a real, uncatchable kill, as from the
    OOM killer or a pulled plug, with no ``finally`` blocks and no flushing. Action ``stop``
    sends ``SIGSTOP`` instead, so a test can hold a build still at a known point (it resumes
    on ``SIGCONT``). Action ``term`` sends ``SIGTERM``, as a service manager or ``kill`` does,
    which the command line turns into a clean stop with one line.
``ATLAS_FAULT_ONCE=<file>``
    the fault fires in the first process that reaches it, which creates ``<file>``; a process
    that finds the file there goes on. A Ray worker that Ray restarts after the kill thus gets
    past the point where its predecessor died (the driver hands its ``ATLAS_FAULT*``
    variables to its Ray workers with every shard).
``ATLAS_FAULT_TRACE=<file>``
    append one line ``<stage> <n> <where>`` per point reached, so that a test learns how
    many points each stage has and can choose among them.

A new stage takes part in the crash tests by calling ``point`` with its own name.
"""

from __future__ import annotations

import os
import signal

_reached: dict[str, int] = {}
_ACTIONS = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}


def _target() -> tuple[str, str, signal.Signals] | None:
    spec = os.environ.get("ATLAS_FAULT")
    if not spec:
        return None
    stage, at = spec.split(":", 1)
    action = "kill"
    if at.rsplit(":", 1)[-1] in _ACTIONS and ":" in at:
        at, action = at.rsplit(":", 1)
    return stage, at, _ACTIONS[action]


def point(stage: str, where: str = "") -> None:
    """Mark that one unit of ``stage``'s work is done (see the module docstring)."""
    if "ATLAS_FAULT" not in os.environ and "ATLAS_FAULT_TRACE" not in os.environ:
        return
    n = _reached[stage] = _reached.get(stage, 0) + 1
    trace = os.environ.get("ATLAS_FAULT_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{stage} {n} {where}\n")
    target = _target()
    if target and target[0] == stage and target[1] in (str(n), where):
        once = os.environ.get("ATLAS_FAULT_ONCE")
        if once:
            try:
                os.close(os.open(once, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                return
        os.kill(os.getpid(), target[2])
