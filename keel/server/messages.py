"""The messages between the API process and the engine process, and their wire format.

Messages are msgpack with a schema (msgspec): a receiver decodes only the message types it expects,
field by field, into these classes (SamplingParams re-validates itself on decode). Unlike pickle, a
payload from anyone else who reaches a socket can at worst be rejected; it never runs code. Each
message travels as two frames, the server's secret and the payload, so a process that can open the
sockets but does not know the secret (it is handed to the engine through the spawn pipe, never on a
command line) cannot speak for either side.
"""

from __future__ import annotations

import hmac
import logging
from typing import Optional, Union

import msgspec

from keel.disagg.kv_transfer import KVDestination, PeerInfo
from keel.engine.limits import RequestLimits
from keel.engine.outputs import CoreOutput, FinishReason
from keel.sampling_params import SamplingParams

# ---- API process -> engine process


class AddRequest(msgspec.Struct, tag=True, frozen=True):
    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    kv_destination: Optional[KVDestination] = None  # prefill server: where the decode server wants its KV


class Preallocate(msgspec.Struct, tag=True, frozen=True):
    """Decode server: hold this request's prompt KV as soon as it fits (answered by Preallocated)."""

    rid: int
    prompt_ids: list[int]
    params: SamplingParams


class ConnectPeer(msgspec.Struct, tag=True, frozen=True):
    """Prefill server: the bootstrap exchange with a decode server (answered by PeerConnected)."""

    peer: PeerInfo


class SenderDone(msgspec.Struct, tag=True, frozen=True):
    """Decode server: the prefill server writes nothing more for these (aborted) requests."""

    rids: list[int]


class AbortRequests(msgspec.Struct, tag=True, frozen=True):
    """Finish these requests now (all the choices of a response go in one message)."""

    rids: list[int]
    reason: FinishReason = "abort"  # "stop": the API process found a stop string; the KV may be cached


class Shutdown(msgspec.Struct, tag=True, frozen=True):
    pass


# ---- engine process -> API process


class EngineReady(msgspec.Struct, tag=True, frozen=True):
    limits: RequestLimits
    page_size: int
    peer: Optional[PeerInfo] = None  # a disaggregated server's transfer agent


class Preallocated(msgspec.Struct, tag=True, frozen=True):
    rid: int
    destination: KVDestination


class PeerConnected(msgspec.Struct, tag=True, frozen=True):
    name: str
    error: Optional[str]  # why the peer cannot be used (another pool geometry, unreachable)


class EngineStats(msgspec.Struct, tag=True, frozen=True):
    running: int
    waiting: int
    pages_total: int
    pages_free: int
    pages_cached: int  # held by the prefix cache (evictable or locked)
    pages_cached_locked: int
    pages_held: int  # held by requests themselves
    # disaggregated servers: requests waiting for room (decode), holding KV while it moves, and transfers so far
    # (prefill: sent, timed from the write's start; decode: received, timed from the preallocation)
    waiting_preallocation: int = 0
    transferring: int = 0
    transfers_done: int = 0
    transfers_failed: int = 0
    transfer_bytes: int = 0
    transfer_seconds: float = 0.0


class EngineOutputs(msgspec.Struct, tag=True, frozen=True):
    """One engine step's outputs; also sent empty, with fresh stats, at least every STATS_INTERVAL_S."""

    outputs: list[CoreOutput]
    stats: Optional[EngineStats]


class EngineFailed(msgspec.Struct, tag=True, frozen=True):
    error: str  # the engine process is going down: why


class Heartbeat(msgspec.Struct, tag=True, frozen=True):
    """Sent by the engine process's heartbeat thread on a channel of its own: the process is running."""

    pid: int


ToEngine = Union[AddRequest, AbortRequests, Preallocate, ConnectPeer, SenderDone, Shutdown]
FromEngine = Union[EngineReady, EngineOutputs, Preallocated, PeerConnected, EngineFailed]

logger = logging.getLogger(__name__)
_encoder = msgspec.msgpack.Encoder()


def ipc_addresses(ipc_dir: str) -> dict[str, str]:
    """The three channels in the server's private folder: requests and aborts, outputs, heartbeats."""
    return {name: f"ipc://{ipc_dir}/{name}" for name in ("requests", "outputs", "heartbeat")}


def pack(secret: bytes, message: Union[ToEngine, FromEngine, Heartbeat]) -> list[bytes]:
    """The frames that carry `message`."""
    return [secret, _encoder.encode(message)]


class MessageError(ValueError):
    """Frames that are not one of the expected messages, or lack the secret."""


class Decoder:
    """Decodes one direction's messages; anything else raises MessageError."""

    def __init__(self, kind: object, secret: bytes) -> None:
        self._decoder = msgspec.msgpack.Decoder(kind)
        self._secret = secret

    def unpack(self, frames: list[bytes]):  # -> the union given at construction
        if len(frames) != 2 or not hmac.compare_digest(frames[0], self._secret):
            raise MessageError(f"dropped a message without the server's secret ({len(frames)} frames)")
        try:
            return self._decoder.decode(frames[1])
        except (msgspec.DecodeError, ValueError, TypeError) as e:
            raise MessageError(f"dropped a malformed message ({len(frames[1])} bytes): {e}") from e

    def receive(self, frames: list[bytes]):  # -> the union given at construction, or None
        """`unpack`, but a rejected message is logged (one warning line) and dropped: returns None."""
        try:
            return self.unpack(frames)
        except MessageError as e:
            logger.warning("%s", e)
            return None


def to_engine_decoder(secret: bytes) -> Decoder:
    return Decoder(ToEngine, secret)


def from_engine_decoder(secret: bytes) -> Decoder:
    return Decoder(FromEngine, secret)


def heartbeat_decoder(secret: bytes) -> Decoder:
    return Decoder(Heartbeat, secret)
