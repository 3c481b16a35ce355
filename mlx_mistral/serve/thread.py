"""The model thread: the one thread of the process that makes MLX calls.

It is a daemon that lives as long as the process, and the model is freed before the
process exits: with OpenBLAS preloaded, a thread that ran MLX and then ended, or was joined
at exit, or a model still alive at exit, sometimes made the process abort ("terminate
called without an active exception") or hang at exit (seen with MLX 0.32.4 on Linux;
ml-explore/mlx#3126 is alike). MLX streams are thread-local (MLX >= 0.31.2 on Metal), and
BLAS must be called from one thread only: every MLX call runs here.
"""

import gc
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait


class ModelThread:
    """Runs `tick` (the scheduler's step) over and over while `busy()`, otherwise sleeps
    until a job (`call`) or a `wake` arrives; a job runs between two ticks."""

    def __init__(self, tick: Callable[[], None], busy: Callable[[], bool]):
        self._tick, self._busy = tick, busy
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._run, name="mlx", daemon=True).start()

    def call(self, fn: Callable, *args, **kwargs):
        """Run fn on the model thread (between two ticks) and return its result (or raise)."""
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        try:
            return future.result()
        except KeyboardInterrupt:  # Ctrl-C: let the job end and drop its result (a model?) on this thread
            wait([future])
            del future
            self.call(gc.collect)
            raise

    def wake(self) -> None:
        """Tick at once (new work has arrived)."""
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            try:
                job = self._jobs.get(block=not self._busy())
            except queue.Empty:
                job = None
            if job:
                future, fn, args, kwargs = job
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # handed to the caller
                    future.set_exception(e)
            self._tick()
