"""mdmd.workers.WorkerPool in process: the supervision rules on a memory
reactor, a fake clock and fake processes (tests/test_workers.py checks the
same rules by stopping and killing real processes)."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pytest
from twisted.internet.base import DelayedCall
from twisted.internet.defer import succeed
from twisted.internet.error import ProcessTerminated
from twisted.internet.interfaces import IListeningPort
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from mdmd.config import MdmdConfig
from mdmd.workers import RESTART_MAX, RESTART_MIN, WorkerPool

SILENCE = 30.0
STATUS_FD = 5


class _Pipe:
    """The main process's end of a worker's status pipe (non-blocking, as
    Twisted's reader leaves it)."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)

    def fileno(self) -> int:
        return self.read_fd

    def close(self) -> None:
        os.close(self.read_fd)
        os.close(self.write_fd)


@dataclass
class _Process:
    pid: int
    protocol: Any
    pipes: dict[int, _Pipe] = field(default_factory=lambda: {STATUS_FD: _Pipe()})
    signals: list[str] = field(default_factory=list)

    def signalProcess(self, name: str) -> None:
        self.signals.append(name)

    def say(self, data: bytes) -> None:
        """What the worker's reactor writes; the main process reads it when
        its reactor gets round to it (deliver)."""
        os.write(self.pipes[STATUS_FD].write_fd, data)

    def deliver(self) -> None:
        try:
            data = os.read(self.pipes[STATUS_FD].read_fd, 4096)
        except BlockingIOError:
            return
        self.protocol.childDataReceived(STATUS_FD, data)

    def end(self) -> None:
        self.protocol.processEnded(Failure(ProcessTerminated(signal=9)))


class _Reactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.processes: list[_Process] = []

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], **kw: Any) -> _Process:
        process = _Process(1000 + len(self.processes), protocol)
        self.processes.append(process)
        protocol.makeConnection(process)
        return process


@pytest.fixture
def reactor() -> Iterator[_Reactor]:
    r = _Reactor()
    yield r
    for process in r.processes:
        process.pipes[STATUS_FD].close()


def start_pool(reactor: _Reactor) -> WorkerPool:
    config = cast(MdmdConfig, SimpleNamespace(workers=2, path="/nonexistent/mdmd.ini"))
    ports = [SimpleNamespace(socket=socket.socket()) for _ in range(2)]
    # One clock for both: the reactor's timers and the pool's monotonic clock.
    listening = [succeed(cast(IListeningPort, port)) for port in ports]
    pool = WorkerPool(config, reactor, *listening, clock=reactor.seconds, silence=SILENCE)
    pool.startService()
    for port in ports:
        port.socket.close()
    return pool


def test_a_silent_worker_is_killed_when_its_silence_reaches_the_bound(reactor: _Reactor) -> None:
    start_pool(reactor)
    (worker,) = reactor.processes
    worker.say(b"R")
    reactor.advance(7.5)
    worker.deliver()  # its last heartbeat, at 7.5 s
    reactor.advance(SILENCE - 0.25)
    assert worker.signals == []
    reactor.advance(0.25)  # 30 s after the last heartbeat, not at the next period
    assert worker.signals == ["KILL"]
    reactor.advance(SILENCE * 3)
    assert worker.signals == ["KILL"]  # once


def test_heartbeats_waiting_in_the_pipe_are_read_before_the_verdict(reactor: _Reactor) -> None:
    start_pool(reactor)
    (worker,) = reactor.processes
    worker.say(b"R")
    worker.deliver()
    # The main process is stopped for 40 s: the worker's heartbeats pile up
    # unread, and the check is the first thing its reactor runs.
    for _ in range(40):
        worker.say(b".")
    reactor.advance(40)
    assert worker.signals == []
    reactor.advance(SILENCE - 0.25)
    assert worker.signals == []
    reactor.advance(0.25)
    assert worker.signals == ["KILL"]


def restart_in(reactor: _Reactor) -> float:
    """How long until the pending restart."""
    (restart,) = [
        call
        for call in reactor.getDelayedCalls()
        if isinstance(call, DelayedCall) and getattr(call.func, "__name__", "") == "_spawn"
    ]
    return restart.getTime() - reactor.seconds()


def test_restart_delay_doubles_while_workers_die_before_serving(reactor: _Reactor) -> None:
    start_pool(reactor)
    seen = []
    for _ in range(9):
        reactor.processes[-1].end()
        seen.append(restart_in(reactor))
        reactor.advance(seen[-1])
    assert seen == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, RESTART_MAX, RESTART_MAX, RESTART_MAX]


def test_restart_delay_is_reset_once_a_worker_serves(reactor: _Reactor) -> None:
    start_pool(reactor)
    for _ in range(3):  # three that never served: 0.5, 1, 2
        reactor.processes[-1].end()
        reactor.advance(RESTART_MAX)
    worker = reactor.processes[-1]
    worker.say(b"R")
    worker.deliver()
    worker.end()  # a few seconds after it started: no matter, it served
    assert restart_in(reactor) == RESTART_MIN
