"""Finished blocks written to the staging folder on a thread of their own, while the block
loop goes on with the next block.

`BlockWriter.put` hands a block's tensors (on the CPU) and its manifest entry to the writer
thread, which writes them with `Staging.write_block`: the file (temporary name, fsync,
rename), then the manifest, so a block enters the manifest only once its file is durable
and a run killed at any point resumes as before. The queue holds at most `depth` blocks
besides the one being written, so host memory stays flat in depth; a full queue makes `put`
wait (the loop's ``write_wait`` phase). A failed write is raised in the loop's thread, the
same exception, at the next `put` or at `close`; nothing after it is written. Leaving the
``with`` block, whatever happened, waits for the blocks handed over so far: an interrupted
run keeps every block it finished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import torch

from ..checkpoint.staging import Staging

log = logging.getLogger(__name__)


class BlockWriter:
    """Writes finished blocks into `staging` on a thread; ``seconds[i]``: block i's write."""

    def __init__(self, staging: Staging, depth: int = 1):
        self.staging = staging
        self.seconds: dict[int, float] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._error: BaseException | None = None
        self._raised = False
        self._thread = threading.Thread(target=self._run, name="admm-prune-writer", daemon=True)
        self._thread.start()

    def put(self, i: int, tensors: dict[str, torch.Tensor], info: dict):
        """Hand block i over (tensors on the CPU, not changed afterwards); waits while the queue is full."""
        self._raise()
        self._queue.put((i, tensors, info))

    def close(self):
        """Wait for every block handed over; raise the first failed write's error."""
        self._stop()
        self._raise()

    def __enter__(self) -> BlockWriter:
        return self

    def __exit__(self, kind, error, tb):
        if kind is None:
            self.close()
            return
        self._stop()  # the loop failed or was interrupted: its error is the one raised
        if self._error is not None and not self._raised:
            log.error("writing a finished block failed too: %s", self._error)

    def _stop(self):
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _raise(self):
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def _run(self):
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # after a failure: take what is handed over, write nothing more
            i, tensors, info = item
            t0 = time.perf_counter()
            try:
                self.staging.write_block(i, tensors, info)
            except BaseException as error:  # re-raised in the loop's thread
                self._error = error
            self.seconds[i] = time.perf_counter() - t0
