"""A small process pool: results in submission order, bounded read-ahead, and it always stops.

Why not `multiprocessing.Pool`: `Pool.imap` reads its whole input ahead when the workers are
slower than the reader, and `Pool.terminate()` can hang for good when its feeder thread is in
the middle of sending a large task (a race we hit on Ctrl-C about once in thirty runs); a
worker killed by the kernel (out of memory) leaves `Pool` waiting forever.

Here the parent talks to each worker over its own pipe, from its main thread only. A worker
gets a task only when it is idle, so no send waits on a busy worker; stopping means killing
the workers; a dead worker is an error, not a hang; and when the parent is killed, each
worker sees its pipe close and exits.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterable, Iterator
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess


class OrderedPool:
    def __init__(self, context, processes: int, initializer: Callable, initargs: tuple = ()):
        self._processes: dict[Connection, BaseProcess] = {}
        for _ in range(processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=_serve, args=(child_end, parent_end, initializer, initargs), daemon=True)
            process.start()
            child_end.close()
            self._processes[parent_end] = process

    def __enter__(self) -> OrderedPool:
        return self

    def __exit__(self, *exc_info) -> None:
        """Workers keep no state worth saving, so stopping them is always a kill: immediate
        after Ctrl-C or an error, and harmless when they are idle."""
        for connection, process in self._processes.items():
            process.kill()
            process.join()
            connection.close()

    def imap(self, function: Callable, tagged_arguments: Iterable[tuple[tuple, object]], window: int) -> Iterator:
        """(function(*arguments), tag) for each (arguments, tag), in order. The tags stay in
        this process; at most `window` tasks are taken beyond the oldest result not returned."""
        tasks = iter(tagged_arguments)
        idle = list(self._processes)
        running: dict[Connection, int] = {}  # worker -> index of its task
        tags: dict[int, object] = {}
        finished: dict[int, object] = {}  # index -> result, waiting for the ones before it
        submitted = returned = 0
        more = True
        while True:
            while more and idle and submitted - returned < window:
                task = next(tasks, None)
                if task is None:
                    more = False
                    break
                arguments, tags[submitted] = task
                worker = idle.pop()
                worker.send((function, arguments))
                running[worker] = submitted
                submitted += 1
            if returned in finished:
                yield finished.pop(returned), tags.pop(returned)
                returned += 1
            elif running:
                for worker in wait(list(running)):
                    finished[running.pop(worker)] = self._receive(worker)
                    idle.append(worker)
            else:
                return

    def _receive(self, worker: Connection) -> object:
        try:
            ok, value = worker.recv()
        except EOFError:
            process = self._processes[worker]
            process.join()
            raise RuntimeError(
                f"a worker process died (exit code {process.exitcode}); if the kernel killed it "
                "for lack of memory, use fewer --workers"
            ) from None
        if not ok:
            raise RuntimeError(f"a worker process failed:\n{value}")
        return value


def _serve(connection: Connection, parent_end: Connection, initializer: Callable, initargs: tuple) -> None:
    parent_end.close()  # so that the pipe closes when the parent dies
    initializer(*initargs)
    while True:
        try:
            task = connection.recv()
        except EOFError:  # the parent is gone
            return
        function, arguments = task
        try:
            reply = (True, function(*arguments))
        except Exception:
            reply = (False, traceback.format_exc())
        connection.send(reply)
