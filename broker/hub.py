"""The hub process: broker (amqtt behind the gate), stream controller, built-in gateway.

``Hub(data_dir, settings)`` -> ``await start()`` -> ``endpoints`` -> ``await stop()``.
Tests and ``devstreams hub up`` use the same class.
"""

import asyncio
import logging
import os
import time
from pathlib import Path

from wire.connstr import ConnectionString
from wire.tls import client_context

from . import datadir, pki
from .amqtt_fixes import HubBroker
from .auth import Authenticator
from .controller import StreamController
from .gate import LISTENER, Gate
from .registry import SERVICE_POLICY, Registry, open_registry
from .settings import HubSettings, validate

log = logging.getLogger(__name__)


class Hub:
    def __init__(self, data_dir: Path, settings: HubSettings | None = None):
        self.data_dir = datadir.ensure(Path(data_dir))
        self.settings = validate(settings or HubSettings())
        self.registry: Registry | None = None
        self.gateway = None
        self._broker: HubBroker | None = None
        self._gate: Gate | None = None
        self.controller: StreamController | None = None
        self._watcher: asyncio.Task | None = None
        self.tls: pki.TlsFiles | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self.tls = pki.ensure_tls(self.data_dir / "tls", s.hosts)
        self.registry = open_registry(self.data_dir)
        self.registry.policy_key(create=True)
        self.registry.mark_all_offline()
        self.registry.prune_activity(s.activity_retention_days)
        signing_key = datadir.secret_key(self.data_dir, "stream-signing.key")
        controller_key = datadir.secret_key(self.data_dir, "controller.key")
        server_ssl = pki.server_context(self.tls)
        authenticator = Authenticator(self.registry, controller_key, gateway_key=signing_key)
        try:
            await self._start_broker(authenticator, server_ssl)
            if not s.gateway_urls:
                await self._start_gateway(signing_key, server_ssl)
            self.controller = StreamController(
                s, self.registry, controller_key=controller_key, signing_key=signing_key,
                mqtt_host="localhost", mqtt_port=self._gate.port,
                ssl_context=client_context(self.tls.ca_cert), gateways=self.gateway_urls)
            await self.controller.start()
        except BaseException:
            await self.stop()
            raise
        self._watcher = asyncio.create_task(self._watch_registry())
        datadir.write_endpoints(self.data_dir, self.endpoints | {"pid": os.getpid(), "started": time.time()})
        log.info("hub up: MQTT on %s, gateway %s", self.mqtt_url, ", ".join(self.gateway_urls()))

    async def _start_broker(self, authenticator: Authenticator, server_ssl) -> None:
        s = self.settings
        config = {
            "listeners": {LISTENER: {"type": "external", "bind": "127.0.0.1:0",
                                     "max_connections": s.max_connections}},
            "plugins": {"broker.plugins.HubAuthPlugin": {"authenticator": authenticator},
                        "broker.plugins.HubAclPlugin": {}},
        }
        self._broker = HubBroker(config)
        await self._broker.start()
        self._gate = Gate(self._broker, authenticator, max_connect_bytes=s.max_connect_packet_bytes,
                          connect_timeout=s.connect_packet_timeout, max_connections=s.max_connections,
                          max_packet_bytes=s.max_packet_bytes, max_retained_bytes=s.max_retained_payload_bytes,
                          takeover_timeout=s.takeover_timeout, max_unauthenticated=s.max_unauthenticated_connections)
        await self._gate.start(s.bind, s.mqtt_port, server_ssl)

    async def _start_gateway(self, signing_key: bytes, server_ssl) -> None:
        from streamgw import Gateway, GatewaySettings  # the hub runs one gateway in-process
        s = self.settings
        settings = GatewaySettings(host=s.bind, port=s.gateway_port, connect_timeout=s.gateway_peer_timeout,
                                   ping_interval=s.gateway_ping_interval, ping_timeout=s.gateway_ping_timeout,
                                   close_timeout=s.gateway_close_timeout,
                                   max_lifetime=s.max_stream_lifetime,
                                   public_url=f"wss://{s.advertised_host()}:{{port}}")  # port filled in at bind
        self.gateway = Gateway(settings, signing_key, server_ssl, on_stream_closed=self._on_stream_closed,
                               on_stream_opened=self._on_stream_opened)
        await self.gateway.start()

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        if self.controller is not None:
            await self.controller.stop()
        if self.gateway is not None:
            await self.gateway.stop()
        if self._gate is not None:
            await self._gate.stop()
        if self._broker is not None:
            try:
                await self._broker.shutdown()
            except Exception:
                log.exception("broker shutdown failed")
        if self.registry is not None:
            self.registry.mark_all_offline()
            self.registry.close()
            self.registry = None
        try:
            (self.data_dir / "hub.json").unlink()
        except OSError:
            pass

    # -- what clients need to know ---------------------------------------------------------------

    @property
    def mqtt_port(self) -> int:
        return self._gate.port if self._gate else self.settings.mqtt_port

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
                "caFile": str(self.tls.ca_cert) if self.tls else None, "dataDir": str(self.data_dir)}

    def service_connection_string(self) -> str:
        return str(ConnectionString(host=self.settings.advertised_host(), port=self.mqtt_port,
                                    policy=SERVICE_POLICY, key=self.registry.policy_key()))

    def device_connection_string(self, device_id: str) -> str:
        device = self.registry.require(device_id)
        return str(ConnectionString(host=self.settings.advertised_host(), port=self.mqtt_port,
                                    device_id=device.id, key=device.key))

    # -- background ------------------------------------------------------------------------------

    async def _watch_registry(self) -> None:
        """Apply CLI changes (disable, remove, rotate-key) to live connections."""
        version = self.registry.data_version()
        while True:
            await asyncio.sleep(self.settings.registry_poll_interval)
            try:
                current = self.registry.data_version()
                if current != version:
                    version = current
                    self._gate.kick_invalid_devices()
            except Exception:
                log.exception("registry watch failed")

    def _on_stream_opened(self, stream_id: str) -> None:
        if self.controller is not None:
            self.controller.stream_opened(stream_id)

    def _on_stream_closed(self, record) -> None:
        if self.controller is not None:
            self.controller.stream_ended(stream_id=record.stream_id, device=record.device_id,
                                         name=record.stream_name, reason=record.close_reason,
                                         bytes_to_device=record.bytes_to_device,
                                         bytes_to_service=record.bytes_to_service, duration=record.duration)
