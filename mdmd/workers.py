"""Worker processes: one CPython reactor per core on the device listeners.

One Python process serves from one core.  With ``[mdmd] workers = N`` the
main process (``twistd mdmd``) opens the enrollment and management
listening sockets as usual, serves them itself, and starts N - 1 workers
(``python -m mdmd.workers``) that inherit both sockets and accept
connections on them too: whichever process is idle takes the next
connection.  Each worker loads the same configuration and key material,
opens the same SQLite database (WAL: many processes can share it; each has
its own store thread and group commit) and serves the same sites.

What stays in the main process: bootstrap, the database check and
migrations, the admin listener (and so the metrics: every process writes
its own to ``state_dir/metrics``, see :mod:`mdmd.metrics`), systemd
notifications (``READY=1`` once every worker serves, the watchdog), the
state_dir lock and the workers' supervision:

- a worker writes ``R`` on its status pipe once it serves, then ``.`` every
  :data:`HEARTBEAT` seconds from its reactor; one silent for
  :data:`SILENCE` seconds has a blocked reactor and is killed.  The check
  is scheduled for the moment a worker's silence would reach the bound (a
  periodic check would let it run up to a period longer), reads the
  heartbeats waiting in the pipes before it judges (after the main process
  itself stalled, they are there but not yet read), and measures with the
  monotonic clock (the reactor's clock is the wall clock, which steps);
- a worker that exits is started again after :data:`RESTART_MIN` seconds;
  while it keeps dying before it serves (a crash loop must not spin) the
  delay doubles up to :data:`RESTART_MAX`; once a worker serves, the delay
  is back to :data:`RESTART_MIN`;
- a worker stops when the main process tells it to (SIGTERM, sent on
  shutdown), and dies with the main process: it asks the kernel for
  SIGKILL when its parent dies (``PR_SET_PDEATHSIG``), which works even
  when its reactor is blocked or the process is stopped, so an orphan never
  keeps the listening sockets from a new main process.  Where that is not
  available, EOF on its stdin (a pipe from the main process) stops it.
  Nothing is lost by the SIGKILL: what a worker acknowledged is committed,
  and its log observer flushes every line as it writes it;
- ``systemctl reload`` (SIGHUP to the main process) is passed on: each
  worker reads the TLS certificates again.

The environment variable ``MDMD_WORKER_SILENCE`` (seconds) replaces
:data:`SILENCE` in the main process.  It exists for the tests, which stop
processes and cannot wait 30 s for every verdict; production leaves it unset.

A device's SyncML session can therefore be advanced by two processes at
once (a retransmission on a new connection, say); the store's
compare-and-swap on ``session_seq`` makes that safe (see
:mod:`mdmd.management_endpoint`).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet import fdesc
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.error import ConnectionDone, ProcessDone
from twisted.internet.interfaces import IDelayedCall, IListeningPort, IReactorCore, IReadDescriptor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    Logger,
    formatEventAsClassicLogText,
    globalLogBeginner,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mdmd.config import ConfigError, MdmdConfig, load_config

__all__ = ["HEARTBEAT", "RESTART_MAX", "RESTART_MIN", "SILENCE", "WorkerPool", "main"]

log = Logger(namespace="mdmd.workers")

HEARTBEAT = 1.0
SILENCE = 30.0
RESTART_MIN, RESTART_MAX = 0.5, 30.0
# The worker's end of the pipes and sockets it is started with.
_STDIN, _STATUS = 0, 5
_FIRST_LISTENER_FD = 3
_STOP_GRACE = 15.0
_SILENCE_ENV = "MDMD_WORKER_SILENCE"
# prctl(2): the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


def _silence_from_env() -> float:
    value = os.environ.get(_SILENCE_ENV)
    if not value:
        return SILENCE
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 2 * HEARTBEAT <= seconds <= 3600:
        log.warn(
            "ignoring {name}={value!r}: not a number of seconds from 2 to 3600",
            name=_SILENCE_ENV,
            value=value,
        )
        return SILENCE
    return seconds


# --------------------------------------------------------------------------
# The main process side
# --------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    protocol: _WorkerProtocol | None = None
    started_at: float = 0.0
    heard_at: float = 0.0  # the pool's monotonic clock
    serving: bool = False
    killed: bool = False  # for silence: said once, not again every check
    restart_delay: float = RESTART_MIN
    restart_call: IDelayedCall | None = None
    kill_call: IDelayedCall | None = None
    ended: list[Deferred[None]] = field(default_factory=list)


class _WorkerProtocol(ProcessProtocol):
    def __init__(self, pool: WorkerPool, worker: _Worker) -> None:
        self.pool = pool
        self.worker = worker
        self.pid: int | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.pid = self.transport.pid

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        if childFD == _STATUS:
            self.pool._heard(self.worker, self, data)

    def processEnded(self, reason: Failure) -> None:
        self.pool._ended(self.worker, self, reason)


class WorkerPool(Service):
    """Starts and supervises ``workers - 1`` worker processes sharing the
    enrollment and management listening sockets of this process."""

    name = "workers"

    def __init__(
        self,
        config: MdmdConfig,
        reactor: IReactorCore,
        enrollment: Deferred[IListeningPort],
        management: Deferred[IListeningPort],
        *,
        clock: Callable[[], float] = time.monotonic,
        silence: float | None = None,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.ready: Deferred[None] = Deferred()
        self.clock = clock
        self.silence = _silence_from_env() if silence is None else silence
        self._ports = (enrollment, management)
        self._listeners: list[tuple[int, int]] = []  # (fd, address family)
        self._workers = [_Worker(index) for index in range(1, config.workers)]
        self._stopping = False
        self._watch: IDelayedCall | None = None

    # -- life cycle --

    def startService(self) -> None:
        super().startService()
        # gatherResults passes the results on: the listeners' other
        # observers (readiness) still see them.
        gatherResults(list(self._ports)).addCallback(self._start_workers).addErrback(
            lambda f: log.failure("workers not started", f)
        )

    def _start_workers(self, ports: Sequence[IListeningPort]) -> None:
        if self._stopping:
            return
        for port in ports:
            sock: socket.socket = port.socket  # type: ignore[attr-defined]
            self._listeners.append((sock.fileno(), sock.family))
        for worker in self._workers:
            self._spawn(worker)
        self._watch_in(self.silence)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._watch is not None and self._watch.active():
            self._watch.cancel()
        waiting: list[Deferred[None]] = []
        for worker in self._workers:
            if worker.restart_call is not None and worker.restart_call.active():
                worker.restart_call.cancel()
            protocol = worker.protocol
            if protocol is None or protocol.transport is None:
                continue
            ended: Deferred[None] = Deferred()
            worker.ended.append(ended)
            waiting.append(ended)
            self._signal(worker, "TERM")
            worker.kill_call = self.reactor.callLater(  # type: ignore[attr-defined]
                _STOP_GRACE, self._signal, worker, "KILL"
            )
        done: Deferred[Any] = DeferredList(waiting)
        return done.addCallback(lambda _: None)

    # -- one worker --

    def _spawn(self, worker: _Worker) -> None:
        worker.restart_call = None
        if self._stopping:
            return
        child_fds: dict[int, int | str] = {_STDIN: "w", 1: 1, 2: 2, _STATUS: "r"}
        argv = [sys.executable, "-m", "mdmd.workers", "--config", self.config.path]
        argv += ["--index", str(worker.index), "--main-pid", str(os.getpid())]
        for n, (fd, family) in enumerate(self._listeners):
            child_fds[_FIRST_LISTENER_FD + n] = fd
            argv += ["--listener", f"{_FIRST_LISTENER_FD + n}:{int(family)}"]
        protocol = _WorkerProtocol(self, worker)
        worker.protocol = protocol
        worker.serving = worker.killed = False
        worker.started_at = worker.heard_at = self.clock()
        # Only the main process speaks to systemd (NotifyAccess=main).
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
        self.reactor.spawnProcess(  # type: ignore[attr-defined]
            protocol, sys.executable, argv, env=env, childFDs=child_fds
        )
        log.info("worker {index} started (pid {pid})", index=worker.index, pid=protocol.pid)

    def _heard(self, worker: _Worker, protocol: _WorkerProtocol, data: bytes) -> None:
        if worker.protocol is not protocol:
            return
        worker.heard_at = self.clock()
        if b"R" in data and not worker.serving:
            worker.serving = True
            # It started and served: whatever ends it next is no crash loop.
            worker.restart_delay = RESTART_MIN
            log.info("worker {index} (pid {pid}) serving", index=worker.index, pid=protocol.pid)
            if not self.ready.called and all(w.serving for w in self._workers):
                self.ready.callback(None)

    def _watch_in(self, seconds: float) -> None:
        self._watch = self.reactor.callLater(  # type: ignore[attr-defined]
            max(seconds, 0.01), self._check_heartbeats
        )

    def _read_pending(self, worker: _Worker, protocol: _WorkerProtocol) -> None:
        """Take in the heartbeats already in the worker's status pipe.

        After the main process itself was stopped or starved, they wait
        there, and the reactor may run this check before it reads them
        (epoll_wait returns nothing when a stopped process resumes after its
        timeout passed): judging then would kill a healthy worker.
        """
        pipes: dict[int, Any] = getattr(protocol.transport, "pipes", {})
        reader = pipes.get(_STATUS)
        if reader is None:
            return
        while True:
            try:
                # Non-blocking (Twisted's pipe reader made it so).  EOF
                # (b"") is left for that reader, which ends the process.
                data = os.read(reader.fileno(), 4096)
            except OSError:  # BlockingIOError: nothing pending
                return
            if not data:
                return
            self._heard(worker, protocol, data)

    def _check_heartbeats(self) -> None:
        self._watch = None
        next_check = self.silence
        for worker in self._workers:
            protocol = worker.protocol
            if protocol is None or protocol.transport is None or worker.killed:
                continue
            self._read_pending(worker, protocol)
            silent = self.clock() - worker.heard_at
            if silent < self.silence:
                next_check = min(next_check, self.silence - silent)
                continue
            worker.killed = True
            log.error(
                "worker {index} (pid {pid}) silent for {silent:.1f}s, its reactor is blocked: killing it",
                index=worker.index,
                pid=protocol.pid,
                silent=silent,
            )
            self._signal(worker, "KILL")
        if not self._stopping:
            # When the first worker's silence would reach the bound, and not
            # later: a heartbeat in between only moves that moment on.
            self._watch_in(next_check)

    def signal_workers(self, name: str) -> None:
        """Send signal *name* ("HUP") to every running worker."""
        for worker in self._workers:
            self._signal(worker, name)

    async def problem(self) -> str | None:
        """Readiness: every worker runs, serves and has been heard from."""
        now = self.clock()
        down = [
            str(w.index)
            for w in self._workers
            if w.protocol is None
            or w.protocol.transport is None
            or not w.serving
            or now - w.heard_at > self.silence
        ]
        if down:
            return f"worker(s) {', '.join(down)} not serving"
        return None

    @staticmethod
    def _signal(worker: _Worker, name: str) -> None:
        protocol = worker.protocol
        if protocol is not None and protocol.transport is not None:
            # ProcessExitedAlready: it has just ended; _ended will follow.
            with contextlib.suppress(Exception):
                protocol.transport.signalProcess(name)

    def _ended(self, worker: _Worker, protocol: _WorkerProtocol, reason: Failure) -> None:
        if worker.protocol is protocol:
            worker.protocol = None
        if worker.kill_call is not None and worker.kill_call.active():
            worker.kill_call.cancel()
        ended, worker.ended = worker.ended, []
        for d in ended:
            d.callback(None)
        if self._stopping:
            log.info("worker {index} (pid {pid}) stopped", index=worker.index, pid=protocol.pid)
            return
        lived = self.clock() - worker.started_at
        delay = worker.restart_delay
        # Reset when the next one serves (see _heard).
        worker.restart_delay = min(RESTART_MAX, delay * 2)
        how = "exited normally" if reason.check(ProcessDone) else str(reason.value)
        log.warn(
            "worker {index} (pid {pid}) ended after {lived:.1f}s: {how}; starting it again in {delay:.1f}s",
            index=worker.index,
            pid=protocol.pid,
            lived=lived,
            how=how,
            delay=delay,
        )
        worker.restart_call = self.reactor.callLater(delay, self._spawn, worker)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------
# The worker process side: python -m mdmd.workers
# --------------------------------------------------------------------------


class _AdoptedListener(Service):
    """Serves a device listener on a socket inherited from the main process."""

    def __init__(self, reactor: Any, fd: int, family: int, factory: Any, name: str) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.setName(name)
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        fdesc.setNonBlocking(self.fd)
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, self.factory)
        # adoptStreamPort works on a duplicate; ours is not needed any more.
        os.close(self.fd)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        return self.port.stopListening()


@implementer(IReadDescriptor)
class _MainProcessWatch:
    """Reads the worker's stdin, a pipe from the main process: EOF means the
    main process is gone, and the worker stops."""

    def __init__(self, reactor: Any, gone: Callable[[], None]) -> None:
        self.reactor = reactor
        self.gone = gone
        fdesc.setNonBlocking(_STDIN)

    def fileno(self) -> int:
        return _STDIN

    def logPrefix(self) -> str:
        return "main-process-watch"

    def doRead(self) -> Failure | None:
        try:
            data = os.read(_STDIN, 4096)
        except BlockingIOError:
            return None
        except OSError:
            data = b""
        if not data:
            self.connectionLost(Failure(ConnectionDone()))
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.reactor.removeReader(self)
        self.gone()


def _write_status(data: bytes, stop: Callable[[], None]) -> None:
    try:
        os.write(_STATUS, data)
    except OSError:  # the main process is gone
        stop()


def _tagged_observer(index: int) -> ILogObserver:
    """Log lines like the main process's, with ``worker N`` in the system."""

    def format_event(event: dict[str, Any]) -> str | None:
        level = event.get("log_level")
        system = event.get("log_system") or f"{event.get('log_namespace', '-')}#{getattr(level, 'name', '-')}"
        return formatEventAsClassicLogText({**event, "log_system": f"{system} worker {index}"})

    return FileLogObserver(sys.stdout, format_event)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mdmd.workers", description="an mdmd worker process")
    p.add_argument("--config", required=True)
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--main-pid", type=int, required=True, help="the main process, this worker's parent")
    p.add_argument("--listener", action="append", default=[], help="FD:ADDRESS_FAMILY, in listener order")
    return p.parse_args(argv)


def _die_with_parent() -> bool:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux
    ``prctl(PR_SET_PDEATHSIG)``); False where that is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    # Until the reactor runs, a reload must not kill this process.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    args = _parse(argv)
    # First of all, before this worker can hold anything: the main process
    # may already have died between starting us and here, which the kernel
    # would not report any more, hence the parent check after the request.
    dies_with_parent = _die_with_parent()
    if os.getppid() != args.main_pid:
        raise SystemExit(0)
    from twisted.internet import reactor

    from mdmd.app import Mdmd, clock_offset_for_tests
    from mdmd.listeners import device_listeners, reload_tls
    from mdmd.logs import json_observer
    from mdmd.material import load_material
    from mdmd.metrics import observe_commit
    from mdmd.store.service import DatabaseUnavailable, StoreService, open_store
    from mdmd.tls import tls_server_factory

    try:
        config = load_config(args.config)
    except ConfigError as e:
        config = None
        error: ConfigError | None = e
    else:
        error = None
    json_logs = config is not None and config.log_format == "json"
    observer = json_observer(sys.stdout, args.index) if json_logs else _tagged_observer(args.index)
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        if config is None:
            assert error is not None
            raise error
        material = load_material(config)
        store = open_store(config, reactor, check=False)
    except ConfigError as e:
        log.critical("cannot start: {error}", error=str(e))
        raise SystemExit(78) from None
    except DatabaseUnavailable as e:
        log.critical("cannot start: {error}", error=str(e))
        raise SystemExit(75) from None  # EX_TEMPFAIL: restarted
    store.on_commit = observe_commit
    if not dies_with_parent:
        log.warn(
            "PR_SET_PDEATHSIG not available: this worker stops with the main process"
            " only while its reactor runs"
        )
    app = Mdmd(
        config=config, material=material, store=store, reactor=reactor, clock_offset=clock_offset_for_tests()
    )

    top = MultiService()
    StoreService(store).setServiceParent(top)
    listeners = device_listeners(app)
    for listener, spec in zip(listeners, args.listener, strict=True):
        fd, family = (int(x) for x in spec.split(":"))
        factory = listener.outermost(tls_server_factory(listener.tls, listener.site, listener.refusals))
        if listener.refusals is not None:
            reactor.addSystemEventTrigger("before", "shutdown", listener.refusals.stop)
        _AdoptedListener(reactor, fd, family, factory, listener.name).setServiceParent(top)

    stopping = False
    heartbeat = LoopingCall(lambda: _write_status(b".", stop_once))

    def stop_once() -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            reactor.stop()

    def on_sigterm(signum: int, frame: object) -> None:
        # systemd signals every process of the unit, and the main process
        # signals its workers too: the second SIGTERM must not make
        # Twisted's handler stop a reactor that is already stopping.
        reactor.callFromThread(stop_once)  # type: ignore[attr-defined]

    def main_process_gone() -> None:
        if not stopping:
            log.warn("the main process is gone; this worker stops")
            stop_once()

    def on_sighup(signum: int, frame: object) -> None:
        reactor.callFromThread(reload_tls, app, listeners)  # type: ignore[attr-defined]

    def start() -> None:
        signal.signal(signal.SIGTERM, on_sigterm)
        signal.signal(signal.SIGINT, on_sigterm)
        signal.signal(signal.SIGHUP, on_sighup)
        top.startService()
        reactor.addReader(_MainProcessWatch(reactor, main_process_gone))
        _write_status(b"R", stop_once)
        heartbeat.start(HEARTBEAT, now=False)

    def stop() -> Deferred[None] | None:
        if heartbeat.running:
            heartbeat.stop()
        return top.stopService()  # type: ignore[no-any-return]

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    reactor.run()


if __name__ == "__main__":
    main()
