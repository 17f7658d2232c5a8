import random
from typing import Optional

from keel.engine.outputs import CoreOutput
from keel.engine.request_state import RequestState
from keel.engine.stop_strings import StopAutomaton, StopMatcher
from keel.models.byte_tokenizer import byte_tokenizer
from keel.sampling_params import SamplingParams


def brute_match(text: str, stops: list[str]) -> Optional[int]:
    """Start of the stop string that ends first; the longest of those ending there."""
    for end in range(1, len(text) + 1):
        lengths = [len(s) for s in stops if text[:end].endswith(s)]
        if lengths:
            return end - max(lengths)
    return None


def brute_holdback(text: str, stops: list[str]) -> int:
    """Longest suffix of text that is a proper prefix of some stop string."""
    return max((k for k in range(1, len(text) + 1)
                if any(len(s) > k and s.startswith(text[-k:]) for s in stops)), default=0)


def matcher(stops: list[str]) -> StopMatcher:
    return StopMatcher(StopAutomaton(stops))


def test_matches_brute_force_in_random_chunkings():
    for seed in range(300):
        rng = random.Random(seed)
        alphabet = "abc"[:rng.randint(1, 3)]
        stops = ["".join(rng.choices(alphabet, k=rng.randint(1, 5))) for _ in range(rng.randint(1, 6))]
        text = "".join(rng.choices(alphabet + "x", k=rng.randint(0, 40)))
        m, fed = matcher(stops), ""
        while fed != text:
            chunk = text[len(fed):len(fed) + rng.randint(0, 5)]
            fed += chunk
            hit = m.feed(chunk)
            assert hit == brute_match(fed, stops), (seed, stops, fed)
            if hit is not None:
                break  # the request is finished
            assert m.holdback == brute_holdback(fed, stops), (seed, stops, fed)


def test_find_and_holdback():
    m = matcher(["###", "END"])
    assert m.feed("text ##") is None and m.holdback == 2
    assert m.feed("x E") is None and m.holdback == 1
    assert m.feed("N") is None and m.holdback == 2
    assert m.feed("D and more") == 9  # a match that the new text completes, indexed in all text fed
    assert m.feed("more ###") == 9 and m.holdback == 0  # finished: later text changes nothing


def test_overlapping_stops_and_a_stop_that_is_a_suffix_of_another():
    assert matcher(["aba", "bab"]).feed("xababx") == 1  # "aba" ends first
    assert matcher(["abcd", "cd"]).feed("xabcd") == 1  # both end together: the longer wins
    assert matcher(["bc", "abcd"]).feed("abcd") == 1  # "bc" ends first, though "abcd" starts earlier
    m = matcher(["ab", "abc"])
    assert m.feed("a") is None and m.holdback == 1
    assert m.feed("b") == 0  # a complete stop string is a match, not a holdback


def test_empty_stop_list():
    m = matcher([])
    assert m.feed("anything at all") is None and m.holdback == 0


def test_one_automaton_serves_several_generations():
    automaton = StopAutomaton(["STOP"])
    first, second = StopMatcher(automaton), StopMatcher(automaton)
    assert first.feed("xxST") is None and first.holdback == 2
    assert second.feed("STOP") == 0
    assert first.feed("OP") == 2


class CountingList(list):
    """A list that counts reads, to measure the automaton's work per character."""

    reads = 0

    def __getitem__(self, index):
        CountingList.reads += 1
        return super().__getitem__(index)


def reads_per_char(stops: list[str], text: str) -> float:
    automaton = StopAutomaton(stops)
    automaton.goto, automaton.fail = CountingList(automaton.goto), CountingList(automaton.fail)
    automaton.match_len, automaton.depth = CountingList(automaton.match_len), CountingList(automaton.depth)
    CountingList.reads = 0
    assert StopMatcher(automaton).feed(text) is None
    return CountingList.reads / len(text)


def test_work_per_character_does_not_grow_with_the_number_of_stops():
    rng = random.Random(0)
    many = ["".join(rng.choices("ab", k=100)) for _ in range(10_000)]
    text = "".join(rng.choices("ab", k=10_000))  # random text keeps deep in the trie, following failure links
    one, all_ = reads_per_char(many[:1], text), reads_per_char(many, text)
    # A step reads goto once per failure link followed plus once, and match_len once; failure links
    # followed never outnumber characters fed (each character deepens the state by at most one).
    assert one <= 5 and all_ <= 5


def test_request_state_cuts_the_stop_string_and_holds_back_its_start():
    tokenizer = byte_tokenizer()
    state = RequestState("0", "p", [1], SamplingParams(stop=["END"]), tokenizer)
    deltas = []
    for piece in ["Hello E", "N", "D! ignored"]:
        ids = tokenizer(piece, add_special_tokens=False).input_ids
        finished_by_stop = state.update(CoreOutput(0, ids, None, None))
        deltas.append(state.take_delta())
    assert deltas == ["Hello ", "", ""] and finished_by_stop
    assert state.output.text == "Hello " and state.output.finish_reason == "stop"
