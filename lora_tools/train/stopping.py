"""Ctrl-C and SIGTERM (a preempted cloud job) as a request to stop cleanly, not an interruption.

While the context is open, the first SIGINT or SIGTERM only sets ``requested``: the recipe finishes its step,
saves, and leaves. A second Ctrl-C quits at once; a repeated SIGTERM (torchrun sends one per process) waits.
"""

import os
import signal


class StopSignal:
    def __init__(self, announce: bool):
        self.requested = False
        self._announce = announce  # one process of a torchrun job prints the notice
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested:
            if signum == signal.SIGINT:
                os._exit(128 + signum)
            return
        self.requested = True
        if self._announce:  # os.write: a handler must not re-enter a stream tqdm or logging may be using
            name = signal.Signals(signum).name
            message = f"\n{name}: finishing this step, saving the adapter and resume state, then exiting "
            os.write(2, (message + "(press Ctrl-C again to quit at once)\n").encode())
