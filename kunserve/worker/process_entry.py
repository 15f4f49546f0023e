"""The first code a worker process runs. It ignores a terminal's Ctrl-C (which reaches every
process of the group; the driver stops the workers) before anything else: importing the
worker's modules takes time, and an interrupt meanwhile would print a traceback per worker.
So this module imports nothing heavy, and the worker's arguments travel pickled, to be
unpickled (which imports those modules) only after that. A worker is forked from a server
process started earlier (kunserve/executor/multiproc.py), so it takes the driver's
environment as it is now (log level, compiler, cache and device settings) before that."""

from __future__ import annotations

import os
import pickle
import signal
from multiprocessing.connection import Connection


def run(arguments: bytes, environment: dict[str, str], conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.clear()
    os.environ.update(environment)
    from kunserve.worker.worker_process import worker_main

    worker_main(*pickle.loads(arguments), conn)
