"""SIGINT / SIGTERM during `dsv3 train`: the first asks the loop to stop after the step in progress (it then
writes a checkpoint and exits with 128 + the signal number, 130 / 143); a second aborts at once.

The handler only records the signal: the loop polls `received` at each step's end, and under torchrun the ranks
take the largest value over the world (Layout.agree), so every rank stops after the same step and joins the same
save. torchrun forwards the terminal's Ctrl-C to its workers, which the terminal has already sent it: under
torchrun a repeat within `same_press_s` is that forwarded copy, not a second press.
"""

from __future__ import annotations

import os
import signal
import sys
import time


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the run stopped after a step and saved it; the message says how to resume."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class Aborted(KeyboardInterrupt):
    """A second SIGINT / SIGTERM: the run stops where it is (its last checkpoint stands)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """A context manager (main thread only) that installs the handlers and restores the previous ones."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, announce: bool = True, same_press_s: float | None = None, exit_after_stop: bool = False):
        self.received = 0                  # the first signal's number, 0 while none came
        self.announce = announce           # rank 0 acknowledges; the other ranks stay quiet
        # a command line whose run a signal stopped only shuts down next: later signals exit at once (no window
        # between restoring the previous handlers and installing those)
        self.exit_after_stop = exit_after_stop
        under_torchrun = "TORCHELASTIC_RUN_ID" in os.environ
        self.same_press_s = (2.0 if under_torchrun else 0.0) if same_press_s is None else same_press_s
        self._first_at = 0.0
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        for s in self.SIGNALS:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.exit_after_stop and self.received:
            exit_at_once_on_another(ignore_until=self._first_at + self.same_press_s)
            return
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if not self.received:
            self.received, self._first_at = signum, time.monotonic()
            if self.announce:
                # os.write, not print: the signal may have interrupted a print to the same stream
                os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
                            f"(once more to abort at once)\n".encode())
            return
        if time.monotonic() - self._first_at < self.same_press_s:
            return
        raise Aborted(signum)


def exit_at_once_on_another(ignore_until: float = 0.0) -> None:
    """Once a signal has stopped the run (saved, or aborted), the process only shuts down: a further SIGINT / SIGTERM
    (a second press that came after the step had ended and the save was done, or a third) exits at once with
    128 + its number, instead of raising KeyboardInterrupt inside whichever exit handler it lands in (a traceback
    after the resume line). Before `ignore_until` (time.monotonic) a signal is torchrun's forwarded copy of the
    press that stopped the run: ignored. Main thread only, as signal.signal is."""
    def _exit(signum: int, frame) -> None:
        if time.monotonic() < ignore_until:
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:           # the signal may have interrupted a write to this very stream
                pass
        os._exit(128 + signum)
    for s in StopSignals.SIGNALS:
        signal.signal(s, _exit)
