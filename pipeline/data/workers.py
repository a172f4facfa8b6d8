"""Forked worker processes that a Ctrl-C or a SIGTERM always stops: the data stages' process pool.

``multiprocessing.Pool`` can hang for good when a signal reaches its workers (a Ctrl-C in a terminal
signals the whole process group): idle workers wait for a task holding a lock they share, a worker
killed there never releases it, and ``Pool.terminate`` waits on that lock forever. Here each worker
has its own pipe and shares no lock; workers ignore SIGINT and SIGTERM, the parent alone turns a
signal into ``StageKilled``, and leaving the pool early for any reason SIGKILLs and reaps the
workers. A worker that dies on its own (the OOM killer) fails the call, naming its exit code,
instead of hanging it.
"""
from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import traceback
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterable, Iterator, List, Tuple

_STOP_S = 10  # how long a finished pool waits for its workers to exit before killing them


class RemoteTraceback(Exception):
    """The traceback of an exception raised in a worker, chained to it in the parent."""

    def __str__(self) -> str:
        return self.args[0]


def _die_with(parent: int) -> None:
    """Have the kernel SIGKILL this worker when ``parent`` dies (Linux; a kill -9 or the OOM killer), so no
    worker outlives the stage and holds its lock."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the worker ends at its next recv() instead
        pass
    if os.getppid() != parent:  # the parent died before the request
        os._exit(1)


def _serve(conn: Connection, parent: int) -> None:
    """A worker: run (fn, index, item) jobs until told to stop or the parent goes away."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)  # the parent decides; it kills us when it stops
    _die_with(parent)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        fn, index, item = job
        try:
            reply = (index, True, fn(item), None)
        except Exception as e:
            reply = (index, False, _portable(e), traceback.format_exc())
        try:
            conn.send(reply)
        except Exception as e:  # an unpicklable result or exception
            conn.send((index, False, RuntimeError(f"a worker's reply cannot be sent back: {e!r}"),
                       traceback.format_exc()))


def _portable(error: Exception) -> Exception:
    """``error`` if the parent can unpickle it (BadInput can), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class WorkerPool:
    """``processes`` forked workers; use as a context manager. Globals set before it is created are shared."""

    def __init__(self, processes: int):
        assert processes >= 1, processes
        ctx = multiprocessing.get_context("fork")
        self.workers: List[Tuple[Any, Connection]] = []
        try:
            for _ in range(processes):
                mine, theirs = ctx.Pipe()
                process = ctx.Process(target=_serve, args=(theirs, os.getpid()), daemon=True)
                process.start()
                theirs.close()
                self.workers.append((process, mine))
        except BaseException:
            self.close(kill=True)
            raise

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, kind, value, tb) -> None:
        self.close(kill=kind is not None)

    def imap_unordered(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> Iterator[Any]:
        """``fn(item)`` for every item, yielded as the workers finish them."""
        for _, result in self._run(fn, items):
            yield result

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> List[Any]:
        """``[fn(item) for item in items]``, computed by the workers."""
        return [result for _, result in sorted(self._run(fn, items), key=lambda pair: pair[0])]

    def _run(self, fn, items) -> Iterator[Tuple[int, Any]]:
        todo = iter(enumerate(items))
        busy = {}  # connection -> its process

        def give(process, conn) -> None:
            job = next(todo, None)
            if job is not None:
                conn.send((fn, *job))
                busy[conn] = process

        for process, conn in self.workers:
            give(process, conn)
        while busy:
            for conn in wait(list(busy)):
                process = busy.pop(conn)
                try:
                    index, ok, value, remote = conn.recv()
                except (EOFError, OSError):
                    process.join(1)
                    raise RuntimeError(f"worker process {process.pid} died (exit code {process.exitcode}"
                                       f"{'; killed, perhaps for lack of memory' if process.exitcode == -9 else ''})"
                                       ) from None
                if not ok:
                    raise value from RemoteTraceback(remote)
                give(process, conn)  # before the caller sees the result, so the worker keeps busy
                yield index, value

    def close(self, kill: bool = False) -> None:
        """Stop the workers: ask them to exit (kill=False), or SIGKILL them; then reap them."""
        if not kill:
            for _, conn in self.workers:
                try:
                    conn.send(None)
                except OSError:
                    pass
            for process, _ in self.workers:
                process.join(_STOP_S)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # a second Ctrl-C
        try:  # cannot leave workers unreaped; it is acted on right after
            for process, conn in self.workers:
                if process.exitcode is None:
                    try:
                        os.kill(process.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                process.join()
                conn.close()
            self.workers = []
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
