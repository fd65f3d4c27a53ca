"""`up`'s watch over its children: a child that exits is started again after a backoff, and
`up` itself ends only on Ctrl-C/SIGTERM or when a child keeps crashing.

While a relay node is down, Envoy keeps serving: ext_proc fails open (requests reach the LLM
untagged, counted in Envoy's `http.relay.ext_proc.failure_mode_allowed`) and readers get 503
until the node is back. While Envoy is down, nothing is served; it comes back on the same
ports. A child that exits CRASH_LOOP_EXITS times within CRASH_WINDOW_S is in a crash loop:
`up` says which child and how it last exited, stops everything and exits 1.

Stopping on a signal drains: the relay nodes get SIGTERM and finish running work for up to
their --drain-timeout while Envoy still serves it; a second Ctrl-C stops them at once. `up`
holds the stop signals blocked for its whole life (`stop_signals_held`): one that comes while
the stack starts stops what started and removes its directories, as a stop does later.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from extproc.ops.supervisor import READY_TIMEOUT_S, STOP_SIGNALS, STOP_TIMEOUT_S, Child, Stack

BACKOFF_FIRST_S = 0.25  # the first restart's delay; doubled per recent exit
BACKOFF_MAX_S = 8.0
CRASH_WINDOW_S = 60.0
CRASH_LOOP_EXITS = 5  # this many exits of one child within CRASH_WINDOW_S: give up
TICK_S = 0.2  # how often restarts due and restarted children's readiness are looked at

_WATCHED = {*STOP_SIGNALS, signal.SIGCHLD}


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM blocked: while the stack starts, start_stack notices one between
    steps (StopRequested) instead of SIGTERM ending `up` on the spot and leaving its work and
    socket directories behind; then `Supervisor.run` takes them. Any still pending at the end
    (a third Ctrl-C during the final stop) are dropped, not delivered as a traceback."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        while signal.sigtimedwait(STOP_SIGNALS, 0) is not None:
            pass
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def describe_exit(status: int) -> str:
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exited with status {status}"


@dataclass
class Restarts:
    """One child's recent exits and its pending restart."""

    exits: list[float] = field(default_factory=list)  # monotonic times within the window
    due: float | None = None  # when to start it again
    started: float | None = None  # when it was started again, until it is ready

    def exited(self, now: float) -> int:
        """Record an exit; how many fell within the crash window."""
        self.exits = [t for t in self.exits if now - t < CRASH_WINDOW_S] + [now]
        return len(self.exits)

    def backoff(self) -> float:
        return min(BACKOFF_MAX_S, BACKOFF_FIRST_S * 2.0 ** (len(self.exits) - 1))


class CrashLoop(Exception):
    """A child keeps crashing; the message says which and how."""


class Supervisor:
    def __init__(
        self,
        stack: Stack,
        *,
        drain_timeout: float,
        print_fn: Callable[[str], None] = print,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stack = stack
        self.drain_timeout = drain_timeout  # the relay nodes' --drain-timeout
        self._print = print_fn
        self._on_change = on_change  # a restarted child is ready (its URLs may have changed)
        self._clock = clock
        self.restarts: dict[str, Restarts] = {c.name: Restarts() for c in stack.children}

    def check(self) -> None:
        """Notice exits, start children whose backoff is over, see restarted ones ready."""
        now = self._clock()
        for child in self.stack.children:
            state = self.restarts[child.name]
            status = child.process.poll()
            if status is not None and state.due is None:
                self._exited(child, state, status, now)
            elif state.due is not None and now >= state.due:
                state.due, state.started = None, now
                self.stack.respawn(child)
            elif state.started is not None and status is None:
                self._maybe_ready(child, state, now)

    def _exited(self, child: Child, state: Restarts, status: int, now: float) -> None:
        recent = state.exited(now)
        state.started = None
        how = describe_exit(status)
        if recent >= CRASH_LOOP_EXITS:
            raise CrashLoop(
                f"{child.name} keeps crashing: {recent} exits within {CRASH_WINDOW_S:g}s, "
                f"the last {how}; stopping everything\n{child.tail()}"
            )
        state.due = now + state.backoff()
        effect = (
            "; meanwhile Envoy sends requests straight to the LLM, untagged (fail open)"
            if child.is_relay
            else ""
        )
        self._print(
            f"stream-relay: {child.name} {how}; restarting it in {state.backoff():g}s "
            f"(exit {recent} within {CRASH_WINDOW_S:g}s){effect}"
        )

    def _maybe_ready(self, child: Child, state: Restarts, now: float) -> None:
        if child.ready():
            state.started = None
            child.became_ready()
            self._on_change()
            self._print(f"stream-relay: {child.name} is back (pid {child.process.pid})")
        elif state.started is not None and now - state.started > READY_TIMEOUT_S:
            child.process.kill()  # never became ready: counted as an exit next check

    def run(self) -> int:
        """Until a stop signal (0) or a crash loop (1); then stop everything."""
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        stopped = False
        try:
            while True:
                self.check()
                info = signal.sigtimedwait(_WATCHED, TICK_S)
                if info is not None and info.si_signo in STOP_SIGNALS:
                    self.stop_draining()
                    stopped = True
                    return 0
        except CrashLoop as exc:
            self._print(f"stream-relay: {exc}")
            return 1
        finally:
            if not stopped:
                self.stack.stop()
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            self._print("stream-relay: stopped")

    def stop_draining(self) -> None:
        """SIGTERM the relay nodes (they drain) while Envoy keeps serving; a second stop
        signal makes them stop at once (SIGINT). Then stop the rest."""
        relays = [c for c in self.stack.children if c.is_relay and c.process.poll() is None]
        for child in relays:
            child.process.send_signal(signal.SIGTERM)
        if relays:
            self._print(
                "stream-relay: stopping; running generations and readers may finish "
                f"for up to {self.drain_timeout:g}s (Ctrl-C again stops now)"
            )
        deadline = self._clock() + self.drain_timeout + STOP_TIMEOUT_S
        hurried = False
        while any(c.process.poll() is None for c in relays) and self._clock() < deadline:
            info = signal.sigtimedwait(_WATCHED, TICK_S)
            if info is not None and info.si_signo in STOP_SIGNALS and not hurried:
                hurried = True
                for child in relays:
                    if child.process.poll() is None:
                        child.process.send_signal(signal.SIGINT)
        self.stack.stop()  # SIGKILLs a relay still running, stops Envoy and the upstream
