"""The first code a spawned worker process runs. It ignores a terminal's Ctrl-C (which reaches
every process of the group; the driver stops the workers) before anything else: importing
torch and the worker's modules takes seconds, and an interrupt meanwhile would print a
traceback per worker. So this module imports nothing heavy, and the worker's arguments
travel pickled, to be unpickled (which imports those modules) only after that."""

from __future__ import annotations

import pickle
import signal
from multiprocessing.connection import Connection


def run(arguments: bytes, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from kunserve.worker.worker_process import worker_main

    worker_main(*pickle.loads(arguments), conn)
