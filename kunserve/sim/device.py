"""A simulated GPU: the device calls of kunserve/worker/protocol.py, answered as a real device
answers them (the same released sub-blocks, the same layout arithmetic) and priced in
simulated seconds (transfers at the cost model's link rates, fixed costs from
SimulatorConfig). Nothing is stored: a simulated device holds no bytes."""

from __future__ import annotations

from kunserve.engine.cost_model import CostModel
from kunserve.layout import ArenaLayout, layers_outside_stage
from kunserve.sim.settings import SimulatorConfig, simulated_host
from kunserve.worker.protocol import DeviceCalls, SamplerStates


class SimulatedDevice(DeviceCalls):
    def __init__(self, layout: ArenaLayout, cost: CostModel, settings: SimulatorConfig, rank: int) -> None:
        self.layout = layout
        self.cost = cost
        self.settings = settings
        self.rank = rank  # global
        self.released: set[int] = set()
        self.group: tuple[int, int] | None = None  # (stage, group size) while a stage of a drop's group
        self.free_at = 0.0  # the calls it was given run one after another
        self._call_s = 0.0  # what the last call costs

    def take_call_seconds(self) -> float:
        """How long the device is busy with the call just made."""
        seconds, self._call_s = self._call_s, 0.0
        return seconds

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
        self._call_s = self.cost.transfer_time(num_blocks * self.sub_block_bytes(), self.link_to(peer))

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
                     next_rank: int | None = None) -> list[int]:
        self.layout.check_split(num_stages)
        self.released.update(layers_outside_stage(self.layout.num_layers, stage, num_stages))
        self.group = (stage, num_stages)
        self._call_s = self.settings.stage_switch_s
        return self.layout.released_sub_blocks_of_stage(stage, num_stages)

    def become_replica(self, refill_from: dict[int, int] | None, over_network: list[int] | None = None) -> None:
        """Each dropped layer comes from the stage that kept it, over the link to that device
        (from the weight source, here timed as the device link, when none is named)."""
        layer_bytes = self.layout.layer_bytes
        links = [self.link_to(refill_from[layer]) if refill_from else self.settings.device_link
                 for layer in sorted(self.released)]
        refill = sum(self.cost.transfer_time(layer_bytes * links.count(link), link) for link in set(links))
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
