"""Logging for the `kunserve` command and the worker processes it starts: one format, one
level (workers read it from KUNSERVE_LOG_LEVEL, in the driver's environment that a worker takes at its start), each
worker's lines named by its replica, stage and rank, and chatty libraries kept quiet."""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "KUNSERVE_LOG_LEVEL"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
DEFAULT_LOG_LEVEL = "INFO"
# Libraries that log every request at INFO (httpx: each request `kunserve bench` sends).
QUIET_LOGGERS = ("httpx", "httpcore")
FORMAT = "%(asctime)s %(levelname)s {name}: %(message)s"


def configure(level: str = DEFAULT_LOG_LEVEL) -> None:
    """This process's logging at `level`; worker processes it starts from now on follow it."""
    level = level.upper()
    if level not in LOG_LEVELS:
        raise ValueError(f"log level: expected one of {LOG_LEVELS}, got {level!r}")
    os.environ[LOG_LEVEL_ENV] = level
    logging.basicConfig(level=level, format=FORMAT.format(name="%(name)s"))
    quiet = max(logging.WARNING, logging.getLevelName(level))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)


def configure_worker(name: str) -> None:
    """A worker process's logging: the driver's level, every line prefixed with `name`."""
    level = os.environ.get(LOG_LEVEL_ENV, DEFAULT_LOG_LEVEL).upper()
    logging.basicConfig(level=level if level in LOG_LEVELS else DEFAULT_LOG_LEVEL, format=FORMAT.format(name=name))
