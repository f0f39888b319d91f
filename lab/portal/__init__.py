"""The dev portal: a local stand-in for Firezone's portal that gateways connect to (docs/protocol.md §1, §2).

In process::

    async with DevPortal(load_config(DEFAULT_CONFIG), host="127.0.0.1", port=0) as portal:
        # FIREZONE_API_URL=portal.url, FIREZONE_TOKEN=<a token from the config>
        joined = await portal.wait_for(kind="received", event="phx_join")
        payload = await portal.create_authorization(client_id, resource_id)
        reply = await portal.wait_for(kind="received", event="authorization_created", since=joined.seq)

As a process: ``firezone-lab portal --config FILE --listen 127.0.0.1:PORT`` (or ``python -m lab.portal``).
``start(sock=...)`` serves on a listening socket the caller made (e.g. inside a network namespace).

Clients (``python -m lab.client --portal URL --token T``) connect on ``/client/websocket?public_key=<their key>``
with ``X-Authorization: Bearer <clients[].token>`` and join topic ``client``; the portal brokers them to gateways
(docs/protocol.md §2.3)::

    client → create_flow {resource_id, connected_gateway_ids?}
             portal picks a joined gateway of the resource's site (one the client already uses first, else the least
             loaded), derives ICE credentials and the PSK for the client's announced key
    gateway ← create_authorization ... gateway → authorization_created {ref} (within authorization_timeout, 15 s)
    client ← flow_created {resource_id, gateway_id, site_id, gateway_public_key, gateway_ipv4, gateway_ipv6,
             preshared_key, client_ice_credentials, gateway_ice_credentials, relays}
             or flow_creation_failed {resource_id, reason: not_found | offline | too_many_requests}
             (the gateway's no_relays only gets it relays_presence; create_flow again for a resource still pending
             replaces that request and restarts its timeout, with no answer for the earlier one)
    client broadcast_(invalidated_)ice_candidates {gateway_ids, candidates} → gateway (invalidate_)ice_candidates
             {client_id, candidates}; the gateway's {client_ids, candidates} → client {gateway_id, candidates}
             (only between peers the portal brokered)
    client → no_relays {}; client ← relays_presence {disconnected_ids: [], connected: relays for its key}

:meth:`DevPortal.flows`, :meth:`DevPortal.wait_for_flow`, :meth:`DevPortal.clients` and ``wait_for(client=...)`` show
what was brokered.

Admin HTTP API (JSON, same server, under ``/admin``):

=====================================  ===========================================================================
``GET  /admin/gateways``               every gateway seen: ids, name, public key, User-Agent, version, connected
``GET  /admin/clients``                every client seen: id, its announced public key, tunnel IPs, connected
``GET  /admin/flows``                  brokered flows (``client``, ``state``: pending/created/failed/abandoned/superseded)
``GET  /admin/events``                 the log; filters ``since kind event gateway client conn_id``; ``timeout``
``GET  /admin/wait``                   first matching log entry (same filters), 504 after ``timeout`` s
``GET/POST /admin/faults``             read / change :class:`Faults` (reject_remaining, reject_status, reject_code,
                                       reject_retry_after, refuse_connections, answer_heartbeats, join_reply, ...)
``POST /admin/init``                   ``{gateway?}``: push ``init`` again
``POST /admin/create_authorization``   ``{client_id, resource_id, gateway?, expires_at?}`` → the payload pushed
``POST /admin/reject_access``          ``{client_id, resource_id, gateway?}``
``POST /admin/resource_updated``       ``{resource_id, filters?, gateway?}`` (no gateway: every joined gateway)
``POST /admin/relays_presence``        ``{disconnected_ids?, connected? (relay ids), gateway?}``
``POST /admin/disconnect``             ``{reason?, gateway?}``: push ``disconnect`` and stop the channel
``POST /admin/phx_close``              ``{gateway?}``
``POST /admin/drop``                   ``{gateway?, abort?, code?}``: WS close frame, or TCP abort
``POST /admin/push``                   ``{event, payload, topic?, gateway?, joined?}``: any server push
``POST /admin/raw``                    ``{text | json | binary_b64, gateway?, joined?}``: any frame, unchecked
=====================================  ===========================================================================

``gateway`` selects a live connection by portal gateway id, external id, name or conn id; it may be left out
while exactly one gateway is connected. Log entries have a ``kind``: ``rejected`` (upgrade refused, with
``status``), ``refused`` (simulated downtime), ``connected``, ``received`` (a frame from the gateway), ``invalid``
(an undecodable frame from it), ``sent``, ``send_failed``, ``closed``.
"""

from __future__ import annotations

from pathlib import Path

from lab.portal.config import (
    RELAY_CREDENTIALS_EXPIRY,
    PortalConfig,
    ice_credentials,
    load_config,
    preshared_key,
    relay_credentials,
    relay_password,
    relay_salt,
)
from lab.portal.server import AdminError, ClientSession, DevPortal, Faults, Flow, GatewaySession, PortalEvent

DEFAULT_CONFIG = Path(__file__).with_name("dev-config.json")

__all__ = [
    "DEFAULT_CONFIG",
    "RELAY_CREDENTIALS_EXPIRY",
    "AdminError",
    "ClientSession",
    "DevPortal",
    "Faults",
    "Flow",
    "GatewaySession",
    "PortalConfig",
    "PortalEvent",
    "ice_credentials",
    "load_config",
    "preshared_key",
    "relay_credentials",
    "relay_password",
    "relay_salt",
]
