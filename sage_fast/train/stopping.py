"""Stopping a run on request: Ctrl-C (SIGINT) or SIGTERM, what cluster schedulers send before
pre-empting a job. During training the request is taken at the end of a step, so the run can
checkpoint; outside it (data, teacher, the teacher's outputs) SIGTERM stops as Ctrl-C does."""
from __future__ import annotations

import contextlib
import signal


class Stopped(KeyboardInterrupt):
    """A stop signal, Ctrl-C's SIGINT or SIGTERM (``signum`` says which), that ended the run where
    it was: nothing was saved beyond the last checkpoint."""

    def __init__(self, *args, signum: int = signal.SIGINT):
        super().__init__(*args)
        self.signum = signum


class TrainingInterrupted(Stopped):
    """Ctrl-C or SIGTERM during training, at the end of a step: a checkpoint was written; the
    message says how to resume."""



class StopRequest:
    """First Ctrl-C or SIGTERM: finish the current step, checkpoint, stop. A second Ctrl-C stops at
    once (a person who does not want to wait); a second SIGTERM does not, since it is no one's
    impatience: under a scheduler that signals every process of a job, each torchrun worker gets the
    scheduler's SIGTERM and then torchrun's own, and must still checkpoint (SIGKILL is the hard stop)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def __enter__(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals cannot reach us anyway
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise Stopped(signum=signum)
        if not self.requested:
            self.requested, self.signum = True, signum

    def __exit__(self, exc_type, exc, tb):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        if isinstance(exc, TrainingInterrupted) and self.signum is not None:
            exc.signum = self.signum
        return False


@contextlib.contextmanager
def sigterm_stops():
    """Outside the training steps (data, teacher, the teacher's outputs), SIGTERM stops the run as
    Ctrl-C does, with a message, instead of ending the process without one."""
    def stop(signum, frame):
        raise Stopped(signum=signum)

    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

