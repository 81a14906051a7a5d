"""Peer discovery over mDNS: advertise `_together._tcp.local.` and browse for peers of one mesh."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from zeroconf import InterfaceChoice, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_together._tcp.local."
NODE_ID_KEY = "node_id"
MESH_KEY = "mesh"
RESOLVE_TIMEOUT_MS = 3000


@dataclass(frozen=True)
class Peer:
    """A peer seen on mDNS: where its gRPC server listens and what its TXT record says."""

    node_id: str
    mesh: str
    instance: str  # full mDNS instance name
    host: str
    port: int
    addresses: tuple[str, ...] = ()
    properties: Mapping[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


OnChange = Callable[[dict[str, Peer]], Awaitable[None]]


def _label(text: str) -> str:
    # DNS labels: keep it readable and within 63 bytes, even with a node-id suffix.
    return re.sub(r"[^A-Za-z0-9-]+", "-", text).strip("-")[:40] or "together"


def is_specific_ip(host: str) -> bool:
    """An address a peer can be reached at (not "", not 0.0.0.0)."""
    try:
        return not ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def lan_addresses(prefer: str | None = None) -> list[str]:
    """This machine's IPv4 addresses other than loopback (`prefer` first), else 127.0.0.1."""
    import ifaddr  # a zeroconf dependency; only needed when bound to every interface

    found = [
        str(ip.ip)
        for adapter in ifaddr.get_adapters()
        for ip in adapter.ips
        if isinstance(ip.ip, str) and not ipaddress.ip_address(ip.ip).is_loopback
    ]
    found = list(dict.fromkeys(found))
    if prefer in found:
        found.remove(prefer)
        found.insert(0, prefer)
    return found or ["127.0.0.1"]


def primary_address() -> str:
    """The address other machines most likely reach this one at: the source address of the default
    route, else the first LAN address. A UDP connect only looks the route up; nothing is sent."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed anywhere real
            addr = str(s.getsockname()[0])
        except OSError:
            addr = ""
    lan = lan_addresses()
    return addr if addr in lan else lan[0]


def _decode_properties(raw: Mapping[bytes, bytes | None]) -> dict[str, str]:
    return {
        k.decode(errors="replace"): (v.decode(errors="replace") if v is not None else "")
        for k, v in raw.items()
    }


class Discovery:
    """Advertises this node on mDNS and tracks the peers of the same mesh.

    `on_change(peers)` is awaited with a fresh dict {node_id: Peer} (this node excluded)
    whenever a peer appears, changes its TXT record or goes away. Call `await start()` once and
    `await stop()` once.
    """

    def __init__(
        self,
        node_id: str,
        mesh: str,
        host: str,
        port: int,
        properties: Mapping[str, object] | None = None,
        *,
        interfaces: list[str] | None = None,
        on_change: OnChange | None = None,
        name: str | None = None,
        prefer: str | None = None,
        advertise: bool = True,
    ) -> None:
        self.node_id = node_id
        self._advertise = advertise  # False: browse only (a peer looking for its model before it can serve)
        self.mesh = mesh
        self.host = host
        self.port = port
        self._properties = dict(properties or {})
        self._on_change = on_change
        if interfaces is not None:
            self._interfaces: list[str] | InterfaceChoice = list(interfaces)
        elif is_specific_ip(host):
            self._interfaces = [host]
        else:
            self._interfaces = InterfaceChoice.All
        # bound to every interface: advertise every LAN address, the one others most likely reach first
        self._addresses = [host] if is_specific_ip(host) else lan_addresses(prefer)
        label = _label(name or socket.gethostname().split(".")[0])
        self.instance = f"{label}-{node_id[:8]}.{SERVICE_TYPE}"
        self._server = f"together-{_label(node_id)[:16]}.local."

        self._peers: dict[str, Peer] = {}
        self._by_instance: dict[str, str] = {}  # instance name -> node id
        # Bumped on every browser event for an instance, so a slow resolve started before a
        # removal cannot resurrect the peer afterwards.
        self._generation: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._notify_lock = asyncio.Lock()
        self._aiozc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._info: AsyncServiceInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def peers(self) -> dict[str, Peer]:
        return dict(self._peers)

    def _ip_version(self) -> IPVersion:
        if isinstance(self._interfaces, list) and any(":" in i for i in self._interfaces):
            return IPVersion.All
        return IPVersion.V4Only

    def _service_info(self) -> AsyncServiceInfo:
        props = {k: str(v) for k, v in self._properties.items()}
        props[NODE_ID_KEY] = self.node_id
        props[MESH_KEY] = self.mesh
        return AsyncServiceInfo(
            SERVICE_TYPE,
            self.instance,
            parsed_addresses=self._addresses,
            port=self.port,
            properties=props,
            server=self._server,
        )

    async def start(self) -> None:
        """Register this node's service and start browsing."""
        if self._aiozc is not None:
            raise RuntimeError("Discovery already started")
        self._loop = asyncio.get_running_loop()
        self._aiozc = AsyncZeroconf(interfaces=self._interfaces, ip_version=self._ip_version())
        if self._advertise:
            self._info = self._service_info()
            # allow_name_change: two nodes whose ids share a prefix still both get advertised.
            await self._aiozc.async_register_service(self._info, allow_name_change=True)
            self.instance = self._info.name
        self._browser = AsyncServiceBrowser(self._aiozc.zeroconf, SERVICE_TYPE, handlers=[self._on_service_state_change])

    async def update(self, properties: Mapping[str, object]) -> None:
        """Re-advertise with changed TXT properties (merged into the current ones)."""
        self._properties.update(properties)
        if self._aiozc is None or self._info is None:
            return
        self._info = self._service_info()
        await self._aiozc.async_update_service(self._info)

    async def stop(self) -> None:
        """Say goodbye on mDNS, stop browsing and close zeroconf."""
        aiozc, self._aiozc = self._aiozc, None
        if aiozc is None:
            return
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._info is not None:
            # Wait for the goodbye packets so peers notice at once instead of at TTL expiry.
            await (await aiozc.async_unregister_service(self._info))
            self._info = None
        await aiozc.async_close()
        self._peers.clear()
        self._by_instance.clear()

    def _on_service_state_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf calls handlers synchronously from its loop; the work happens in a task.
        if name == self.instance or self._loop is None or self._aiozc is None:
            return
        gen = self._generation.get(name, 0) + 1
        self._generation[name] = gen
        if state_change is ServiceStateChange.Removed:
            coro = self._remove(name)
        else:
            coro = self._resolve(name, gen)
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, name: str, gen: int) -> None:
        aiozc = self._aiozc
        if aiozc is None:
            return
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(aiozc.zeroconf, RESOLVE_TIMEOUT_MS):
            log.debug("could not resolve %s", name)
            return
        if self._generation.get(name) != gen:
            return
        props = _decode_properties(info.properties)
        node_id = props.get(NODE_ID_KEY, "")
        if props.get(MESH_KEY) != self.mesh or not node_id or node_id == self.node_id:
            return
        addresses = tuple(info.parsed_scoped_addresses(IPVersion.V4Only)) or tuple(info.parsed_scoped_addresses())
        if not addresses or info.port is None:
            return
        peer = Peer(
            node_id=node_id,
            mesh=self.mesh,
            instance=name,
            host=addresses[0],
            port=info.port,
            addresses=addresses,
            properties=props,
        )
        if self._peers.get(node_id) == peer:
            return
        # A node that re-registered under another instance name replaces its old entry.
        self._by_instance = {i: n for i, n in self._by_instance.items() if n != node_id}
        self._by_instance[name] = node_id
        self._peers[node_id] = peer
        await self._notify()

    async def _remove(self, name: str) -> None:
        node_id = self._by_instance.pop(name, None)
        if node_id is None or self._peers.pop(node_id, None) is None:
            return
        await self._notify()

    async def _notify(self) -> None:
        if self._on_change is None:
            return
        async with self._notify_lock:  # callbacks see changes in order, one at a time
            try:
                await self._on_change(dict(self._peers))
            except Exception:
                log.exception("discovery on_change callback failed")
