"""The engine <-> API wire format: typed msgpack behind a shared secret, which trusts no frame it gets."""

from __future__ import annotations

import pickle
from pathlib import Path

import msgspec
import pytest

from keel.engine.limits import RequestLimits
from keel.engine.outputs import CoreOutput, TokenLogprob
from keel.sampling_params import SamplingParams
from keel.server.messages import (AbortRequests, AddRequest, Decoder, EngineFailed, EngineOutputs, EngineReady,
                                  EngineStats, Heartbeat, MessageError, Shutdown, from_engine_decoder,
                                  heartbeat_decoder, pack, to_engine_decoder)

SECRET = b"0123456789abcdef-the-server-secret"

FULL_PARAMS = SamplingParams(
    max_new_tokens=17, temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, repetition_penalty=1.1,
    frequency_penalty=0.5, presence_penalty=-0.25, seed=2**64 - 1, stop=["\n\n", "END", "é✓"],
    stop_token_ids=[3, 4], ignore_eos=True, logprobs=True, top_logprobs=3, prompt_logprobs=2)

TO_ENGINE = {
    "add_request": AddRequest(7, [1, 2, 3], FULL_PARAMS),
    "add_request_defaults": AddRequest(8, [5], SamplingParams()),
    "abort_requests": AbortRequests([1, 2, 3], reason="stop"),
    "abort_requests_default_reason": AbortRequests([4]),
    "shutdown": Shutdown(),
}

FROM_ENGINE = {
    "engine_ready": EngineReady(RequestLimits(vocab_size=384, context_length=512, kv_capacity_tokens=4096), 4),
    "engine_outputs": EngineOutputs([
        CoreOutput(7, [11], [TokenLogprob(11, -0.125, ((11, -0.125), (12, -2.5), (3, -3.75)))], None,
                   num_cached_tokens=2,
                   prompt_logprobs=[TokenLogprob(2, -1.5, ((9, -0.5), (2, -1.5))), TokenLogprob(3, -0.1)]),
        CoreOutput(8, [], None, "abort", error="request 8 cannot be batched"),
        CoreOutput(9, [1, 2], None, "length"),
    ], None),
    "engine_outputs_with_stats": EngineOutputs([], EngineStats(running=2, waiting=1, pages_total=100, pages_free=60,
                                                               pages_cached=30, pages_cached_locked=5,
                                                               pages_held=10)),
    "engine_failed": EngineFailed("RuntimeError: CUDA error: an illegal memory access was encountered"),
}

HEARTBEAT = {"heartbeat": Heartbeat(pid=4242)}

DECODERS = {"to_engine": to_engine_decoder, "from_engine": from_engine_decoder, "heartbeat": heartbeat_decoder}
# Each message and the one decoder (direction) that must accept it.
ALL = {**{k: (m, "to_engine") for k, m in TO_ENGINE.items()}, **{k: (m, "from_engine") for k, m in FROM_ENGINE.items()},
       **{k: (m, "heartbeat") for k, m in HEARTBEAT.items()}}


@pytest.mark.parametrize("name", ALL.keys())
def test_every_message_round_trips_through_its_decoder(name: str) -> None:
    message, direction = ALL[name]
    frames = pack(SECRET, message)
    assert frames[0] == SECRET and len(frames) == 2
    decoded = DECODERS[direction](SECRET).unpack(frames)
    assert type(decoded) is type(message) and decoded == message


def test_round_trip_keeps_nested_types() -> None:
    # Equality alone would not tell a tuple from a list, or a SamplingParams from a dict.
    add = to_engine_decoder(SECRET).unpack(pack(SECRET, TO_ENGINE["add_request"]))
    assert isinstance(add.params, SamplingParams) and add.params.stop == ["\n\n", "END", "é✓"]
    assert add.params.seed == 2**64 - 1
    outputs = from_engine_decoder(SECRET).unpack(pack(SECRET, FROM_ENGINE["engine_outputs"]))
    first = outputs.outputs[0]
    assert isinstance(first, CoreOutput) and isinstance(first.logprobs[0], TokenLogprob)
    assert first.logprobs[0].top == ((11, -0.125), (12, -2.5), (3, -3.75))
    assert first.prompt_logprobs[1].top == ()


@pytest.mark.parametrize("name, other", [(name, other) for name, (_, direction) in ALL.items()
                                         for other in DECODERS if other != direction])
def test_a_message_for_another_direction_is_rejected(name: str, other: str) -> None:
    message, _ = ALL[name]
    with pytest.raises(MessageError):
        DECODERS[other](SECRET).unpack(pack(SECRET, message))


class _Exploit:
    """Unpickling this creates `marker`: proof that the payload ran code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return Path.touch, (self.marker,)


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
@pytest.mark.parametrize("direction", DECODERS.keys())
def test_a_pickle_payload_is_rejected_without_running(tmp_path: Path, protocol: int, direction: str) -> None:
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"type": "Shutdown", "x": _Exploit(marker)}, protocol=protocol)
    with pytest.raises(MessageError):
        DECODERS[direction](SECRET).unpack([SECRET, payload])
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: had anything unpickled it, the marker would be there
    assert marker.exists()


SHUTDOWN = msgspec.msgpack.encode(Shutdown())


@pytest.mark.parametrize("frames", [
    [SHUTDOWN],  # no secret frame
    [],
    [b"not-the-secret", SHUTDOWN],
    [b"", SHUTDOWN],
    [SECRET[:-1], SHUTDOWN],  # a prefix of the secret
    [SECRET + b"x", SHUTDOWN],
    [SHUTDOWN, SECRET],  # frames swapped
    [SECRET, SHUTDOWN, b""],  # three frames
    [SECRET, SECRET, SHUTDOWN],
], ids=["one_frame", "no_frames", "wrong_secret", "empty_secret", "secret_prefix", "secret_extended", "swapped",
        "three_frames", "secret_twice"])
def test_frames_without_exactly_the_secret_and_one_payload_are_rejected(frames: list[bytes]) -> None:
    for make in DECODERS.values():
        with pytest.raises(MessageError):
            make(SECRET).unpack(frames)
    assert to_engine_decoder(SECRET).unpack([SECRET, SHUTDOWN]) == Shutdown()  # the payload itself is fine


def raw_add_request(params: dict) -> bytes:
    """A well-formed msgpack AddRequest, built by hand as a peer that skips SamplingParams would."""
    return msgspec.msgpack.encode({"type": "AddRequest", "rid": 1, "prompt_ids": [1, 2], "params": params})


def test_a_hand_built_add_request_decodes() -> None:
    # The baseline for the rejections below: only the bad value differs.
    decoded = to_engine_decoder(SECRET).unpack([SECRET, raw_add_request({"temperature": 0.5, "stop": ["x"]})])
    assert decoded == AddRequest(1, [1, 2], SamplingParams(temperature=0.5, stop=["x"]))


@pytest.mark.parametrize("params", [
    {"temperature": -1},
    {"temperature": float("nan")},
    {"temperature": float("inf")},
    {"top_k": 2**63},
    {"top_p": 0.0},
    {"max_new_tokens": 0},
    {"stop": 5},
    {"stop": [""]},
    {"stop": ["x"] * 65},
    {"stop_token_ids": [-1]},
    {"max_new_tokens": 2**31},
    {"seed": "1"},
    {"top_logprobs": 21},
    {"prompt_logprobs": True},
    {"logprobs": 1},
], ids=lambda p: "-".join(f"{k}={str(v)[:12]}" for k, v in p.items()))
def test_invalid_sampling_values_are_rejected_on_decode(params: dict) -> None:
    with pytest.raises(MessageError):
        to_engine_decoder(SECRET).unpack([SECRET, raw_add_request(params)])


@pytest.mark.parametrize("payload", [
    msgspec.msgpack.encode({"type": "EngineFailed", "error": "x"}),  # the other direction's type
    msgspec.msgpack.encode({"type": "Exec", "code": "import os"}),  # a type nobody defines
    msgspec.msgpack.encode({"rids": [1]}),  # no type at all
    msgspec.msgpack.encode({"type": "AbortRequests", "rids": [1], "reason": "explode"}),
    msgspec.msgpack.encode({"type": "AbortRequests", "rids": ["1"]}),
    msgspec.msgpack.encode({"type": "AddRequest", "rid": 1, "prompt_ids": "12", "params": {}}),
    msgspec.msgpack.encode(["AddRequest", 1, [1], {}]),
    msgspec.msgpack.encode(None),
    SHUTDOWN + b"\x00",  # trailing bytes
    SHUTDOWN[:-1],  # truncated
    b"",
    b"\xc1",  # a byte msgpack never uses
], ids=["other_direction", "unknown_type", "untagged", "bad_reason", "str_rids", "str_prompt", "array",
        "nil", "trailing", "truncated", "empty", "reserved_byte"])
def test_unexpected_or_malformed_payloads_are_rejected(payload: bytes) -> None:
    with pytest.raises(MessageError):
        to_engine_decoder(SECRET).unpack([SECRET, payload])


def test_message_error_is_a_value_error_and_decoders_are_per_secret() -> None:
    assert issubclass(MessageError, ValueError)
    frames = pack(SECRET, Shutdown())
    with pytest.raises(MessageError):
        Decoder(Shutdown, b"another-secret").unpack(frames)
    assert Decoder(Shutdown, SECRET).unpack(frames) == Shutdown()
