import asyncio
import uuid
from collections.abc import Callable

import pytest

from mesh.discovery import Discovery, Peer

LOOPBACK = ["127.0.0.1"]


def run(coro):
    return asyncio.run(coro)


class Watcher:
    """Records every on_change snapshot of one Discovery."""

    def __init__(self) -> None:
        self.peers: dict[str, Peer] = {}
        self.calls = 0
        self.changed = asyncio.Event()

    async def __call__(self, peers: dict[str, Peer]) -> None:
        self.peers = peers
        self.calls += 1
        self.changed.set()

    async def wait_for(self, predicate: Callable[[dict[str, Peer]], bool], timeout: float = 8.0) -> None:
        async def loop() -> None:
            while not predicate(self.peers):
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(loop(), timeout)


def _node(mesh: str, i: int, watcher: Watcher, **props: str) -> Discovery:
    node_id = uuid.uuid4().hex
    return Discovery(
        node_id,
        mesh,
        "127.0.0.1",
        50000 + i,
        {"backend": "torch", "free_memory": str(1 << 30), "version": "0.1.0", **props},
        interfaces=LOOPBACK,
        on_change=watcher,
        name=f"test{i}",
    )


@pytest.mark.slow  # keeps make test-fast under 3 minutes; CI runs it
def test_three_peers_find_each_other_other_mesh_ignored_and_removal_seen() -> None:
    async def main() -> None:
        mesh = f"m-{uuid.uuid4().hex[:10]}"
        other_mesh = f"o-{uuid.uuid4().hex[:10]}"
        watchers = [Watcher() for _ in range(4)]
        nodes = [_node(mesh, i, watchers[i], model="smollm2") for i in range(3)]
        stranger = _node(other_mesh, 3, watchers[3])
        started: list[Discovery] = []
        try:
            for d in [*nodes, stranger]:
                await d.start()
                started.append(d)
            ids = {d.node_id for d in nodes}
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.gather(
                *(w.wait_for(lambda p, me=d.node_id: set(p) == ids - {me}) for w, d in zip(watchers, nodes))
            )
            assert loop.time() - t0 < 5
            a, b = nodes[0], watchers[0].peers[nodes[1].node_id]
            assert b.address == f"127.0.0.1:{nodes[1].port}"
            assert b.properties["model"] == "smollm2" and b.properties["mesh"] == mesh
            assert b.properties["backend"] == "torch"

            # the stranger in another mesh sees none of them and none of them sees it
            await asyncio.sleep(1.0)
            assert watchers[3].peers == {}
            assert all(stranger.node_id not in w.peers for w in watchers[:3])

            # TXT updates are re-advertised
            await nodes[2].update({"free_memory": "123"})
            await watchers[0].wait_for(
                lambda p: p.get(nodes[2].node_id) is not None and p[nodes[2].node_id].properties["free_memory"] == "123"
            )

            # stop() says goodbye and the others notice
            await nodes[1].stop()
            started.remove(nodes[1])
            gone = nodes[1].node_id
            # a loaded machine can hold the goodbye packets back for a while
            await asyncio.gather(*(w.wait_for(lambda p: gone not in p, timeout=20)
                                   for w in (watchers[0], watchers[2])))
            assert set(watchers[0].peers) == {nodes[2].node_id}
            assert a.peers == watchers[0].peers
        finally:
            for d in started:
                await d.stop()

    run(main())


def test_stop_is_idempotent_and_start_twice_refused() -> None:
    async def main() -> None:
        d = _node(f"m-{uuid.uuid4().hex[:10]}", 9, Watcher())
        await d.start()
        try:
            try:
                await d.start()
            except RuntimeError:
                pass
            else:
                raise AssertionError("second start() should fail")
        finally:
            await d.stop()
        await d.stop()

    run(main())


def test_a_peer_bound_to_every_interface_advertises_its_lan_addresses_preferred_first() -> None:
    """The default of `together join` (no --host): others must see addresses they can reach, never
    0.0.0.0 or loopback (unless the machine has nothing else). mDNS itself stays on loopback here."""
    from mesh.discovery import lan_addresses, primary_address

    lan = lan_addresses()
    primary = primary_address()
    assert primary in lan and "0.0.0.0" not in lan
    assert lan == ["127.0.0.1"] or "127.0.0.1" not in lan
    prefer = lan[-1]

    async def main() -> None:
        mesh = f"m-{uuid.uuid4().hex[:10]}"
        seen = Watcher()
        wide = Discovery(uuid.uuid4().hex, mesh, "0.0.0.0", 50100, {}, interfaces=LOOPBACK, name="wide",
                         prefer=prefer)
        watcher = _node(mesh, 1, seen)
        try:
            await wide.start()
            await watcher.start()
            await seen.wait_for(lambda p: wide.node_id in p)
            peer = seen.peers[wide.node_id]
            # every LAN address (mDNS does not keep their order: a peer tries each, see Membership)
            assert sorted(peer.addresses) == sorted(lan), (peer, lan)
            assert lan_addresses(prefer=prefer)[0] == prefer and peer.port == 50100
        finally:
            await watcher.stop()
            await wide.stop()

    run(main())
