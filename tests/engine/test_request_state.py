from keel.engine.outputs import CoreOutput
from keel.engine.request_state import RequestState
from keel.models.byte_tokenizer import byte_tokenizer
from keel.sampling_params import SamplingParams

TOKENIZER = byte_tokenizer()


def _state(incremental: bool, stop: list[str]) -> RequestState:
    return RequestState("0", None, list(b"prompt "), SamplingParams(stop=stop), TOKENIZER, incremental_text=incremental)


def test_text_is_made_each_step_only_for_streams_and_stop_strings():
    """generate() reads a request's text once it finished: detokenizing it on every step would cost the offline
    engine's host a window decode per request and token."""
    states = {"quiet": _state(False, []), "streamed": _state(True, []), "stop strings": _state(False, ["zz"])}
    for state in states.values():
        assert not state.update(CoreOutput(0, list(b"ab"), None, None))
    assert {name: s.output.text for name, s in states.items()} == {"quiet": "", "streamed": "ab", "stop strings": "ab"}
    for state in states.values():
        state.update(CoreOutput(0, list("c é".encode()), None, "length"))
        assert (state.output.text, state.output.token_ids, state.output.finish_reason) == \
            ("abc é", list("abc é".encode()), "length")


def test_a_stop_string_ends_a_request_whose_text_is_read_at_the_end():
    state = _state(False, ["c "])
    assert state.update(CoreOutput(0, list(b"abc d"), None, None))  # the core must finish it
    assert (state.output.text, state.output.finish_reason) == ("ab", "stop")
