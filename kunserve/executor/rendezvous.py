"""Where a cluster's workers meet to open links to each other: a TCP store the driver hosts,
so it outlives every worker (a replica whose workers die restarts with new ones, which meet
the survivors there), and the global ranks it hands out, never twice.

There is no torch.distributed world: a world cannot take a new member once formed, and a dead
member can hang the others. Each pair of workers that exchanges tensors opens a link of its
own instead (kunserve/worker/peers.py), named by the two global ranks, with a timeout.
"""

from __future__ import annotations

import itertools
import threading
from datetime import timedelta

import torch.distributed as dist

from kunserve.worker.protocol import WorkerWorld

LOOPBACK = "127.0.0.1"  # where workers of this host reach the driver


class Rendezvous:
    def __init__(self, link_timeout_s: float, host: str = LOOPBACK) -> None:
        """`host`: the driver's address as every worker reaches it (another node's, under Ray)."""
        # Port 0: the store picks a free port itself, so no other process can take it between
        # the choice and the bind.
        self._store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=link_timeout_s))
        self.address = f"{host}:{self._store.port}"
        self.link_timeout_s = link_timeout_s
        self._ranks = itertools.count()
        self._lock = threading.Lock()  # replicas start (and restart) on threads of their own

    def world(self, num_devices: int, replica: int = 0) -> WorkerWorld:
        """A place for an executor of `num_devices` devices serving replica `replica`: global
        ranks no worker had before."""
        with self._lock:
            first = next(self._ranks)
            for _ in range(num_devices - 1):
                next(self._ranks)
        return WorkerWorld(self.address, first, self.link_timeout_s, replica)
