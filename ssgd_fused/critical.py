"""Critical sections: Python signal handlers wait until a weight move and its bookkeeping are done.

Why. A move is an op that changes the weights in place followed by Python that records where they
are now (the plan's offset, the step counter). Python runs a signal handler (Ctrl-C's
KeyboardInterrupt, a timer, a SIGTERM handler) at the next bytecode boundary, so an exception
raised between the op returning and the record being written leaves the record wrong, and the
clean-up then moves the weights from the wrong place (measured: 8 of 130 timer interrupts did
this before this module existed).

How. Inside `critical()` every signal that has a Python handler gets a handler that only notes the
signal; on leaving, the original handlers come back and the noted signals are delivered to them,
in order, so a KeyboardInterrupt is raised right after the section, with the weights and the
record consistent. A handler runs in the main thread only, so sections in other threads need (and
get) nothing. Sections are short (a move, the fused update, the base optimizer's step), so Ctrl-C
stays responsive; forward and backward passes never run inside one.

Alternatives considered: having each op also write the new offset into a state tensor it owns
makes the kernels' calls atomic, but not the Python around them (reference ops, multi-dtype
Triton launches, BatchNorm flags, the step counter); blocking signals with pthread_sigmask does not
stop the OS from delivering a process-wide signal to another thread, whose C handler still flags
the main thread. What this does not cover: exceptions injected with PyThreadState_SetAsyncExc
(no Python API defers them); they remain possible at any bytecode, inside a section too.
"""

from __future__ import annotations

import _signal  # the signal module's C half: no enum conversions per call (this runs a few times per step)
import signal
import threading

# Signals whose handler may be a Python function (SIGKILL / SIGSTOP cannot have one), as ints.
_SIGNALS = tuple(int(s) for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP))


class critical:
    """``with critical(): ...`` defers Python signal handlers to the end of the block. Re-entrant:
    an inner section inside an outer one does nothing of its own.

    Entering and leaving are themselves safe against one signal at any bytecode: the section is
    marked as the owner before any handler is swapped and unmarked only after all are back, a
    signal whose handler raises while they are being swapped makes entering undo what it did, and
    leaving puts every handler back before raising what a handler raised."""

    _owner = None  # the outermost active section (main thread only)

    def __enter__(self):
        self.saved = {}
        self.pending = []
        self.active = threading.current_thread() is threading.main_thread() and critical._owner is None
        if not self.active:
            return self
        try:
            critical._owner = self
            for s in _SIGNALS:
                h = _signal.getsignal(s)
                if callable(h) and h != self._note:
                    self.saved[s] = h  # first: putting back a handler that was not swapped is harmless
                    _signal.signal(s, self._note)
        except BaseException:  # a signal arrived while the handlers were being swapped: undo, re-raise
            self._restore()
            raise
        return self

    def _note(self, signum, frame):
        self.pending.append((signum, frame))

    def _restore(self):
        """Every saved handler back, even if one of them raises meanwhile (it is re-raised after)."""
        items = list(self.saved.items())
        error = None
        k = 0
        while k < len(items):
            try:
                _signal.signal(*items[k])
                k += 1
            except BaseException as e:  # the handler of a signal already put back ran and raised
                error = error or e
        if critical._owner is self:
            critical._owner = None
        if error is not None:
            raise error

    def __exit__(self, *exc):
        if not self.active:
            return False
        handlers = dict(self.saved)
        self._restore()
        for signum, frame in self.pending:  # as if they arrived now: a handler may raise
            handlers[signum](signum, frame)
        return False
