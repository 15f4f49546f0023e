"""A simulated GPU: the device calls of kunserve/worker/protocol.py, answered as a real device
answers them (the same released sub-blocks, the same layout arithmetic) and priced in
simulated seconds (transfers at the cost model's link rates, fixed costs from
SimulatorConfig), copies between devices of a host over their shared NVLink ports (settings.py
Fabric). Nothing is stored: a simulated device holds no bytes."""

from __future__ import annotations

from kunserve.engine.cost_model import CostModel
from kunserve.layout import ArenaLayout, layers_outside_stage, stage_layers
from kunserve.sim.settings import Fabric, SimulatorConfig, device_port, simulated_host
from kunserve.worker.protocol import DeviceCalls, SamplerStates


class SimulatedDevice(DeviceCalls):
    def __init__(self, layout: ArenaLayout, cost: CostModel, settings: SimulatorConfig, rank: int,
                 fabric: Fabric | None = None) -> None:
        self.layout = layout
        self.cost = cost
        self.settings = settings
        self.rank = rank  # global
        self.fabric = fabric or Fabric()  # the links it shares with the cluster's other devices
        self.released: set[int] = set()
        self.group: tuple[int, int] | None = None  # (stage, group size) while a stage of a drop's group
        self.free_at = 0.0  # the calls it was given run one after another
        self._call_s = 0.0  # what the last call costs
        self._call_links: list[str] = []  # and the shared links it holds meanwhile

    def run_call(self, ready: float) -> float:
        """When the call just made ends, started at `ready` (and once its links are free)."""
        seconds, links = self._call_s, self._call_links
        self._call_s, self._call_links = 0.0, []
        return self.fabric.occupy(links, ready, seconds) if links else ready + seconds

    @property
    def host(self) -> str:
        return simulated_host(self.settings, self.rank)

    def link_to(self, peer: int) -> str:
        """The cost model's link between this device and global rank `peer`."""
        same = simulated_host(self.settings, peer) == self.host
        return self.settings.device_link if same else self.settings.network_link

    def sub_block_bytes(self) -> int:
        """Bytes of one (sub-)block as this device addresses its arena now."""
        return self.layout.block_bytes // (1 if self.group is None else self.group[1])

    def _transfer(self, num_blocks: int, peer: int) -> None:
        """A copy with global rank `peer`: within a host over both devices' NVLink ports at
        the measured rate (it waits for copies either holds), across hosts over the network."""
        num_bytes = num_blocks * self.sub_block_bytes()
        link = self.link_to(peer)
        if link == self.settings.network_link:
            self._call_s = self.cost.transfer_time(num_bytes, link)
            return
        self._call_s = self.cost.transfer_time(0, link) + num_bytes / self.settings.device_port_bytes_s
        self._call_links = [device_port(self.rank), device_port(peer)]

    # ---- memory ----------------------------------------------------------------------------

    def release_layer(self, layer: int) -> range:
        if layer in self.released:
            raise ValueError(f"layer {layer} is already released")
        self.released.add(layer)
        return self.layout.released_blocks(layer)

    def reclaim_layer(self, layer: int) -> None:
        self.released.discard(layer)

    # ---- role changes ------------------------------------------------------------------------

    def become_stage(self, stage: int, num_stages: int, prev_rank: int | None = None,
                     next_rank: int | None = None, refill_from: dict[int, int] | None = None) -> list[int]:
        """A widening stage's refills come over the link to the peer holding each layer."""
        self.layout.check_split(num_stages)
        missing = set(stage_layers(self.layout.num_layers, stage, num_stages)) & self.released
        if not missing <= set(refill_from or {}):
            raise RuntimeError(f"stage {stage} of {num_stages} needs layers {sorted(missing)}, released here: "
                               f"name where to refill them from")
        refill = self._refill_time({layer: (refill_from or {})[layer] for layer in missing})
        self.released -= missing
        self.released.update(layers_outside_stage(self.layout.num_layers, stage, num_stages))
        self.group = (stage, num_stages)
        self._call_s = self.settings.stage_switch_s + refill
        return self.layout.released_sub_blocks_of_stage(stage, num_stages)

    def _refill_time(self, refill_from: dict[int, int]) -> float:
        """Copying these layers' weights in, each over the link to the rank that holds it."""
        links = [self.link_to(rank) for rank in refill_from.values()]
        return sum(self.cost.transfer_time(self.layout.layer_bytes * links.count(link), link) for link in set(links))

    def become_replica(self, refill_from: dict[int, int] | None, over_network: list[int] | None = None) -> None:
        """Each dropped layer comes from the stage that kept it, over the link to that device
        (from the weight source, here timed as the device link, when none is named)."""
        if refill_from:
            refill = self._refill_time({layer: refill_from[layer] for layer in self.released})
        else:
            refill = self.cost.transfer_time(self.layout.layer_bytes * len(self.released), self.settings.device_link)
        self.released.clear()
        self.group = None
        self._call_s = self.settings.stage_switch_s + refill

    def prepare_stages(self, group_sizes: list[int]) -> None:
        """Nothing to capture: a simulated stage's steps are priced by the cost model from the first."""

    # ---- links: the measured cost of opening a pair (link_open_s) is paid by its warm-up,
    # which both ends run at once --------------------------------------------------------------

    def export_arena(self) -> bytes:
        return b""  # no arena to map

    def open_peer(self, peer: int, handle: bytes) -> None:
        """Mapping is part of the pair's opening, priced at warm_link."""

    def warm_link(self, peer: int, send: bool) -> None:
        self._call_s = self.settings.link_open_s

    # ---- KV copies ---------------------------------------------------------------------------

    def pull_kv(self, peer: int, src_ids: list[int], dst_ids: list[int], staging_bytes: int | None = None) -> None:
        self._transfer(len(src_ids), peer)

    def send_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        self._transfer(len(ids), peer)  # both ends are busy for the transfer

    def recv_kv(self, peer: int, ids: list[int], staging_bytes: int | None = None) -> None:
        self._transfer(len(ids), peer)

    def move_kv(self, src_ids: list[int], dst_ids: list[int]) -> None:
        self._call_s = len(src_ids) * self.sub_block_bytes() * 2 / self.settings.hbm_copy_bytes_s

    # ---- requests' sampler state: a simulation samples nothing ---------------------------------

    def take_sampler_states(self, request_ids: list[str]) -> SamplerStates:
        return {}

    def give_sampler_states(self, states: SamplerStates) -> None:
        """Nothing to keep."""

    # ---- checks --------------------------------------------------------------------------------

    def kv_digests(self, ids: list[int]) -> list[str]:
        raise NotImplementedError("a simulated device holds no KV bytes to digest")

    def weight_digests(self) -> list[str]:
        raise NotImplementedError("a simulated device holds no weight bytes to digest")
