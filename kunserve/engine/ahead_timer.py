"""When a replica forms the step it schedules ahead: just in time, not as the step before starts.

Scheduling ahead (kunserve/engine/scheduler.py) forms step k+1 while step k runs, so that the
host's work overlaps the device's. Formed as soon as step k starts, step k+1 misses every
request that arrives while k runs, which then waits a whole step more than it would without
scheduling ahead: at low load, most of a request's time to first token. Formed shortly before
k's predicted end instead (less the driver's time to form and send a step, less a slack for
the prediction's error), step k+1 takes those requests too and still reaches the device
before k ends.

A step's time is the cost model's prediction scaled by what steps took here: the smallest
ratio of a step's observed time (from its start on the device to its tokens back) to its
prediction among the last few. The smallest errs early, which costs only what scheduling
ahead cost before; late would idle the device. A step formed late is observed to take as long
as the wait plus its own forming, so the ratios that follow fall: the timing corrects itself.

Only decode steps are timed. Their predictions hold within a few percent, while a step with a
prompt chunk can take half its prediction or three times it (measured on an H200,
docs/benchmarks.md): waiting on such a prediction could leave the device idle for tens of
milliseconds, and its ratio would throw the decode steps' timing off. So the step ahead of a
step with a prompt chunk is formed at once, and such steps' ratios and forming times are not
kept.
"""

from __future__ import annotations

from collections import deque

# Steps whose observed/predicted ratios (and forming times) are kept: a few dozen milliseconds
# of a GPU's steps, enough to ride out a slow one, few enough to follow a change of load.
RECENT_STEPS = 16


def lead_s(predicted_s: float, form_s: float, slack: float) -> float:
    """How long before the running step's end (of `predicted_s`) the next is formed: the
    driver's time to form and send it, and `slack` of the prediction."""
    return form_s + slack * predicted_s


class AheadTimer:
    """The device's step timeline as a replica's driver sees it, and when the next step is due."""

    def __init__(self, slack: float) -> None:
        self.slack = slack
        # (start, predicted seconds or None where not timed) of the step on the device
        self._running: tuple[float, float | None] | None = None
        self._queued = False  # a step was submitted behind it
        self._queued_s: float | None = None  # its predicted seconds (None: not timed)
        self._ratios: deque[float] = deque(maxlen=RECENT_STEPS)
        self._form_s: deque[float] = deque(maxlen=RECENT_STEPS)

    def submitted(self, now: float, predicted_s: float | None, form_s: float) -> None:
        """A step predicted to take `predicted_s` (None: a step with a prompt chunk, not timed)
        was sent at `now` after `form_s` of the driver's time: it runs at once on an idle
        device, else after the running step."""
        if predicted_s is not None:
            self._form_s.append(form_s)
        if self._running is None:
            self._running = (now, predicted_s)
        else:
            self._queued, self._queued_s = True, predicted_s

    def collected(self, now: float) -> None:
        """The running step's tokens came back at `now`; the queued step (if any) starts."""
        if self._running is None:
            return
        start, predicted_s = self._running
        if predicted_s is not None and predicted_s > 0:
            self._ratios.append((now - start) / predicted_s)
        self._running = (now, self._queued_s) if self._queued else None
        self._queued, self._queued_s = False, None

    def due_at(self) -> float | None:
        """When to form the next step (the clock of `submitted`); None: at once (no step runs
        alone on the device, the running one is not timed, or nothing has been observed yet)."""
        if self._running is None or self._queued or not self._ratios:
            return None
        start, predicted_s = self._running
        if predicted_s is None:
            return None
        expected_s = min(self._ratios) * predicted_s
        return start + expected_s - lead_s(expected_s, max(self._form_s), self.slack)
