"""The hub process: broker backend, stream controller, built-in gateway.

``Hub(data_dir, settings)`` -> ``await start()`` -> ``endpoints`` -> ``await stop()``.
Tests and ``devstreams hub up`` use the same class.

The broker is embedded (amqtt behind the gate, the default) or external
(``broker_url``: any broker that asks this hub's auth hook); broker/backends.py
hides which.  On an external broker several hubs may share one data dir: each has
its own controller (its own client id, requests shared between them), and none of
them marks devices offline when it stops -- presence is the broker's.
"""

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from devstreams.transport.tls import client_context
from devstreams.wire.frontdoor import ALPN_MQTT, MQTT_WS_PATH, MQTT_WS_SUBPROTOCOL, Route
from devstreams.wire.streamproto import STREAM_PATH_PREFIX
from devstreams.wire import connstr
from devstreams.wire.events import StreamClosed
from devstreams.wire.throttle import EveryInterval

from . import datadir, pki
from .auth import Authenticator
from .backends import EmbeddedBroker, ExternalBroker
from .controller import StreamController
from .dashboard import HubWeb
from .frontdoor import serve_front_door
from .limits import refresh_after
from .memory import FreezeRule, TrimRule, release_free_memory
from .registry import ADMIN_OPERATOR, OPEN_STREAMS_STALE_AFTER, Registry, open_registry
from .settings import HubSettings, gateway_kwargs, settings_dict, validate
from .wsmqtt import MqttWebSocketEndpoint

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, data_dir: Path, settings: HubSettings | None = None):
        self.data_dir = datadir.ensure(Path(data_dir))
        self.settings = validate(settings or HubSettings())
        self.registry: Registry | None = None
        self.gateway = None
        self.broker: EmbeddedBroker | ExternalBroker | None = None
        self.controller: StreamController | None = None
        self._watcher: asyncio.Task | None = None
        self.tls: pki.TlsFiles | None = None
        self._lock: datadir.HubLock | None = None
        # The single port (settings.port): its listener, the endpoints it routes to, MQTT over WebSocket.
        self.front_door: asyncio.AbstractServer | None = None
        self._routes: dict[Route, Callable] = {}
        self._mqtt_ws: MqttWebSocketEndpoint | None = None
        self.web = HubWeb(self)  # /metrics and the dashboard (broker/dashboard.py)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        # First, before any port, file or registry row is touched: one hub per data dir.
        self._lock = datadir.lock_hub(self.data_dir, shared=self.external)
        try:
            self.tls = pki.ensure_tls(self.data_dir / "tls", s.hosts)
            self.registry = open_registry(self.data_dir)
            self.registry.ensure_admin()
            if not self.external:  # on an external broker, presence is the broker's (retained status)
                self.registry.mark_all_offline()
            self.registry.prune_activity(s.activity_retention_days)
            signing_key = datadir.secret_key(self.data_dir, "stream-signing.key")
            controller_key = datadir.secret_key(self.data_dir, "controller.key")
            server_ssl = pki.server_context(self.tls)
            authenticator = Authenticator(self.registry, controller_key, gateway_key=signing_key)
            if s.port >= 0:  # one TLS port for everything (validate() refused it with an external broker)
                self.front_door = await serve_front_door(
                    s.bind, s.port, pki.server_context(self.tls), self._routes,
                    decide_timeout=s.connect_packet_timeout, backlog=s.listen_backlog)
            self.broker = (ExternalBroker(s, authenticator, self.data_dir) if self.external
                           else EmbeddedBroker(s, authenticator, server_ssl, listener=self.front_door))
            await self.broker.start()
            if self.front_door is not None:
                gate = self.broker.gate
                self._mqtt_ws = MqttWebSocketEndpoint(gate.app_protocol, max_message_bytes=s.max_packet_bytes,
                                                      open_timeout=s.connect_packet_timeout)
                self._mqtt_ws.attach(self.front_door)
                self._routes.update({Route.MQTT: gate.app_protocol, Route.MQTT_WS: self._mqtt_ws.protocol_factory})
            if not s.gateway_urls:
                await self._start_gateway(signing_key, server_ssl)
            self.web.attach(self._routes)
            if self.front_door is not None:
                await self.front_door.start_serving()
            host, port = self.broker.controller_address
            self.controller = StreamController(
                s, self.registry, controller_key=controller_key, signing_key=signing_key,
                mqtt_host=host, mqtt_port=port, ssl_context=client_context(s.broker_ca_file or self.tls.ca_cert),
                gateways=self.gateway_urls, shared=self.broker.shared, peer=self.broker.peer)
            self.web.start()
            if self.external:
                self.broker.publish = self.controller.publish
                await self.controller.start(timeout=None)  # the broker may come later: logged and retried
            else:
                await self.controller.start()
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch_registry())
        datadir.write_endpoints(self.data_dir, self.endpoints | {"pid": os.getpid(), "started": time.time(),
                                                                 "settings": self.effective_settings()})
        log.info("hub up: MQTT on %s%s, gateway %s", self.mqtt_url,
                 f" (external broker {s.broker_url})" if self.external else "", ", ".join(self.gateway_urls()))

    @property
    def external(self) -> bool:
        return bool(self.settings.broker_url)

    def effective_settings(self) -> dict:
        """The settings in force, with the ports actually bound (for 'hub show --settings')."""
        gateway_port = self.gateway.port if self.gateway is not None else self.settings.gateway_port
        mqtt_port = self.broker.port if isinstance(self.broker, EmbeddedBroker) else self.settings.mqtt_port
        return settings_dict(self.settings.replace(mqtt_port=mqtt_port, gateway_port=gateway_port))

    @property
    def _hub_name(self) -> str:
        """Whose rows in the shared registry's open_streams: '' for the one embedded hub."""
        return self.controller.instance if self.external and self.controller else ""

    async def _start_gateway(self, signing_key: bytes, server_ssl) -> None:
        from streamgw import Gateway, GatewaySettings  # the hub runs one gateway in-process
        s = self.settings
        # Every gateway limit comes from HubSettings (max_concurrent_streams included), none from defaults.
        settings = GatewaySettings(**gateway_kwargs(s),
                                   public_url=f"wss://{s.advertised_host()}:{{port}}")  # port filled in at bind
        self.gateway = Gateway(settings, signing_key, server_ssl)
        self.gateway.events.subscribe(self._on_gateway_event)
        await self.gateway.start(listener=self.front_door)
        if self.front_door is not None:
            self._routes[Route.STREAMS] = self.gateway.protocol_factory

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        await self.web.stop()
        if self.controller is not None:
            await self.controller.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self.broker is not None:
            await self.broker.stop()
        if self._mqtt_ws is not None:
            await self._mqtt_ws.stop()
        if self.front_door is not None:
            self.front_door.close()
        if self.registry is not None:
            if not self.external:  # another hub may still serve these devices through the broker
                self.registry.mark_all_offline()
            self.registry.close()
            self.registry = None
        if self._lock is not None and self._lock.held:  # hub.json is ours only while we hold the data dir
            self._lock.release()
            if datadir.last_hub(self._lock):
                try:
                    (self.data_dir / "hub.json").unlink()
                except OSError:
                    pass

    # -- what clients need to know ---------------------------------------------------------------

    @property
    def mqtt_port(self) -> int:
        """The port clients are told about (connection strings, hub show), not necessarily the one bound."""
        if self.settings.advertised_mqtt_port:
            return self.settings.advertised_mqtt_port
        return self.broker.port if self.broker else self.settings.mqtt_port

    @property
    def mqtt_url(self) -> str:
        return f"mqtts://{self.settings.advertised_host()}:{self.mqtt_port}"

    def gateway_urls(self) -> list[str]:
        if self.settings.gateway_urls:
            return list(self.settings.gateway_urls)
        return [self.gateway.public_url] if self.gateway is not None else []

    @property
    def endpoints(self) -> dict:
        return {"hostName": self.settings.advertised_host(), "mqttEndpoint": self.mqtt_url,
                "mqttPort": self.mqtt_port, "streamingEndpoints": self.gateway_urls(),
                "caFile": str(self.tls.ca_cert) if self.tls else None, "dataDir": str(self.data_dir),
                "broker": self.settings.broker_url or "embedded", "authHook": self._hook_url(),
                "singlePort": self._single_port()} | self.web.endpoints()

    def _single_port(self) -> dict | None:
        """With ``--port``: the one endpoint and what it serves (docs/protocol.md, 'One port')."""
        if self.front_door is None:
            return None
        host, port = self.settings.advertised_host(), self.front_door.sockets[0].getsockname()[1]
        return {"endpoint": f"{host}:{port}", "mqtt": f"mqtts://{host}:{port} (ALPN {ALPN_MQTT})",
                "mqttOverWebSocket": f"wss://{host}:{port}{MQTT_WS_PATH} (subprotocol {MQTT_WS_SUBPROTOCOL})",
                "streams": f"wss://{host}:{port}{STREAM_PATH_PREFIX}<id>"}

    def _hook_url(self) -> str | None:
        hook = getattr(self.broker, "hook", None)
        return f"http://{self.settings.auth_hook_bind}:{hook.port}" if hook is not None else None

    def service_connection_string(self) -> str:
        admin = self.registry.ensure_admin()
        return str(connstr.for_hub(self.settings.advertised_host(), self.mqtt_port, admin.key,
                                   single_port=self.front_door is not None, policy=ADMIN_OPERATOR))

    def device_connection_string(self, device_id: str) -> str:
        device = self.registry.require(device_id)
        return str(connstr.for_hub(self.settings.advertised_host(), self.mqtt_port, device.key,
                                   single_port=self.front_door is not None, device_id=device.id))

    # -- background ------------------------------------------------------------------------------

    async def _watch_registry(self) -> None:
        """Apply CLI changes to live connections and streams; publish the open streams.

        - a registry change (``device disable/remove/rotate-key``, ``operator
          remove/disable/rotate-key``, a narrower scope, ``hub connection-string --rotate``),
          or an operator's expiry passing: drop the MQTT sessions whose credentials no
          longer admit them and end the streams of those identities
          (``StreamController.check_revocations``);
        - ``streams close``: end the streams an operator named;
        - every ``session_expiry_check_interval``: drop sessions whose SAS token ran out;
        - every ``open_streams_refresh`` (less often when writing them would take more than
          ``open_streams_cpu_share`` of a core): write the open streams for ``streams list``.
        """
        s = self.settings
        if self.gateway is not None and self.controller is not None:
            self.controller.on_gateway_control = self.gateway.apply_control
            self.controller.gateway_capacity(self.gateway.public_url, self.gateway.settings.max_streams)
        version = self.registry.data_version()
        expiries = self._operator_expiries()
        errors = EveryInterval(s.disk_error_log_interval)
        trim = TrimRule(s.memory_trim_interval)
        freeze = FreezeRule(s.memory_full_collect_interval)
        if self.controller is not None:
            self.controller.events.subscribe(lambda event: trim.freed() if isinstance(event, StreamClosed) else None)
        next_expiry = next_publish = 0.0
        accepted = 0  # TLS connections the gate accepted: their handshakes left freed memory behind
        published = True  # clear a list left by a hub that did not stop cleanly
        try:
            while True:
                await asyncio.sleep(s.registry_poll_interval)
                now = time.monotonic()
                try:
                    current = self.registry.data_version()
                    if current != version or (expiries and time.time() >= expiries[0]):
                        version = current
                        self._apply_registry_changes()
                        expiries = self._operator_expiries()
                    if now >= next_expiry:
                        next_expiry = now + s.session_expiry_check_interval
                        self.broker.expire(time.time())
                    gate = getattr(self.broker, "gate", None)
                    if gate is not None and gate.accepted != accepted:
                        trim.freed(gate.accepted - accepted)
                        accepted = gate.accepted
                    if trim.due(now):
                        release_free_memory(freeze)
                    if now >= next_publish:
                        spent = time.thread_time()
                        rows = self.open_streams()
                        if rows or published:  # an empty list is written once, then left alone
                            ok = self.registry.replace_open_streams(rows, hub=self._hub_name)
                            published = bool(rows) or not ok
                        # 5,000 open streams take ~40 ms to write: not every second (issue 10)
                        next_publish = refresh_after(now, s.open_streams_refresh, time.thread_time() - spent,
                                                     s.open_streams_cpu_share, OPEN_STREAMS_STALE_AFTER / 3)
                except Exception:
                    ready, suppressed = errors.ready(now)
                    if ready:
                        log.exception("registry watch failed (%d more failures not shown)", suppressed)
        finally:
            if self.registry is not None:
                self.registry.replace_open_streams([], hub=self._hub_name)

    def _operator_expiries(self) -> list[float]:
        """When operators still valid now will expire (wall clock, soonest first)."""
        now = time.time()
        return sorted(o.expires for o in self.registry.operators() if o.expires is not None and o.expires > now)

    def _apply_registry_changes(self) -> None:
        devices = self.broker.revoke(self.registry)
        if self.controller is None:
            return
        self.controller.check_revocations(devices)
        for stream_id in self.registry.take_close_requests():
            self.controller.close_stream(stream_id)  # unknown ids still go to every gateway

    def open_streams(self) -> list[dict]:
        """Streams the controller knows, with live byte counts from the built-in gateway."""
        live = {row["stream_id"]: row for row in (self.gateway.open_streams() if self.gateway else [])}
        now = time.time()
        rows = []
        for known in self.controller.known_streams() if self.controller else []:
            row = live.pop(known.stream_id, None)
            state = "open" if known.opened else "accepted" if known.accepted else "pending"
            counts = (row["bytes_to_device"], row["bytes_to_service"]) if row else known.bytes or (None, None)
            rows.append({"stream_id": known.stream_id, "device": known.device, "name": known.name, "state": state,
                         "created": known.created, "gateway": known.gateway, "service": str(known.service),
                         "operator": known.operator,
                         "bytes_to_device": counts[0], "bytes_to_service": counts[1], "updated": now})
        for row in live.values():  # open here but unknown to the controller: should not happen
            rows.append({**row, "state": "open", "created": now - row["age_s"], "service": None, "updated": now})
        return rows

    def _on_gateway_event(self, event) -> None:
        """The built-in gateway's sink subscriber: its opened/closed events go to the controller."""
        if self.controller is not None:
            self.controller.on_gateway_event(event)
