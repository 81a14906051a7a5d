"""The coordinator's layer maps, one per model: several models in one mesh form one ring each, under
one coordinator. A peer's Join and Heartbeat go to the map of its own model, made on that model's first
peer from the shape the peer reports (the coordinator may not have that model); every plan handed out
carries the other models' plans as its `rings`. Part of `CoordinatorRole` (mesh/coordination.py)."""

from __future__ import annotations

from typing import Callable

from backends.errors import RequestError
from mesh.coordinator import LayerMap
from mesh.view import PlanView, plan_for
from protos import together_pb2 as pb

CLASH = "another model under the same name"  # a refused Join's reason says it: the peer stops

class Rings:
    view: PlanView
    model: str  # this peer's model: its map is `layer_map`
    num_layers: int
    hidden_size: int
    kv_reserve: int
    placement: str
    maps: dict[str, LayerMap]  # model -> its ring's layer map, only while this peer coordinates
    _active: bool

    @property
    def active(self) -> bool:
        return self._active

    @property
    def layer_map(self) -> LayerMap | None:
        """The map of this peer's own model, while it coordinates."""
        return self.maps.get(self.model) if self._active else None

    def _map(self, model: str = "") -> LayerMap:
        lm = self.maps.get(model or self.model) if self._active else None
        if lm is None:
            raise RequestError("not the coordinator")
        return lm

    def _stop(self) -> None:
        self.maps, self._active = {}, False

    def _model(self, info: pb.PeerInfo) -> str:
        return info.model or self.model  # (an info without a model: a test's, or this model's)

    def _map_of(self, info: pb.PeerInfo) -> LayerMap | None:
        """The map of the peer's model, made on its first peer from the shape that peer reports;
        None for another model's peer too old to report its model's shape, and for a peer whose model
        has the ring's name but not its shape (see `clash`)."""
        model = self._model(info)
        lm = self.maps.get(model)
        if lm is not None and _clash(lm.num_layers, lm.hidden_size, info):
            return None
        if lm is None:
            if info.num_layers <= 0:
                return None
            lm = self.maps[model] = LayerMap(model, info.num_layers, self.view.node_id, int(info.kv_reserve),
                                             self._last_epoch(model), info.hidden_size, self.placement)
        return lm

    def clash(self, info: pb.PeerInfo) -> str:
        """Why a peer cannot join its model's ring: another model under the same name (two directories
        or files called alike), whose hidden states would not fit the ring's; "" if none."""
        lm = self.maps.get(self._model(info)) if self._active else None
        if lm is None or not _clash(lm.num_layers, lm.hidden_size, info):
            return ""
        return (f"this mesh's {lm.model} has {lm.num_layers} layers of hidden size {lm.hidden_size}, this peer's "
                f"has {info.num_layers} of {info.hidden_size}: {CLASH} (give its "
                f"file or directory a name of its own: the name is the model's label in the mesh)")

    def _last_epoch(self, model: str) -> int:
        """The epoch of `model`'s plan as this peer last heard it (epochs are kept per model)."""
        plan: pb.Plan | None = self.view.plan
        if model == self.model and plan is not None and plan.model in ("", model):
            return int(plan.epoch)
        plan = plan_for(self.view.plan, model) if self.view.plan.model else None
        return int(plan.epoch) if plan is not None else 0

    def _rebuild(self, reports: list[pb.PeerInfo], epoch_of: Callable[[str], int]) -> None:
        """Every model's map from what its peers say they hold."""
        groups: dict[str, list[pb.PeerInfo]] = {self.model: []}
        for r in reports:
            groups.setdefault(self._model(r), []).append(r)
        maps = {}
        for model, infos in groups.items():
            if model == self.model:
                shape = (self.num_layers, self.hidden_size, self.kv_reserve)
            elif infos[0].num_layers > 0:
                infos.sort(key=lambda i: (i.started_at, i.node_id))  # the oldest's shape is the ring's
                shape = (infos[0].num_layers, infos[0].hidden_size, int(infos[0].kv_reserve))
            else:
                continue
            infos = [i for i in infos if not _clash(shape[0], shape[1], i)]
            maps[model] = LayerMap.rebuild(model, shape[0], self.view.node_id, shape[2], infos, epoch_of(model),
                                           shape[1], self.placement)
        self.maps, self._active = maps, True

    def _known(self, model: str) -> dict[str, pb.PeerInfo]:
        return {n: i for n, i in self.view.known.items() if self._model(i) == model}

    def _plan_for(self, model: str) -> pb.Plan:
        """`model`'s plan, carrying the other models' plans as its rings."""
        out = self._one_plan(model)
        out.rings.extend(self._one_plan(m) for m in self.maps if m != model)
        return out

    def _one_plan(self, model: str) -> pb.Plan:
        """One model's plan; it names its coordinator among its peers even when that one serves
        another model (peers check that a pushed plan's coordinator is among its peers)."""
        lm = self.maps[model]
        plan = lm.plan()
        if lm.coordinator not in lm.members:
            boss = next((m.info for x in self.maps.values() for n, m in x.members.items() if n == lm.coordinator),
                        None) or self.view.known.get(lm.coordinator)
            if boss is not None:
                plan.peers.append(boss)
        return plan


def _clash(num_layers: int, hidden_size: int, info: pb.PeerInfo) -> bool:
    """The peer reports a shape (peers too old to report one are taken at their word) other than
    the ring's."""
    return info.num_layers > 0 and (info.num_layers != num_layers
                                    or bool(hidden_size and info.hidden_size and info.hidden_size != hidden_size))
