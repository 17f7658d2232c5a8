import pytest

from keel.sampling_params import (MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, InvalidParameter,
                                  SamplingParams)


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=-3), "max_new_tokens"),
    (dict(max_new_tokens=2.5), "max_new_tokens"),
    (dict(temperature=-0.1), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=-5), "top_k"),
    (dict(min_p=1.2), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(frequency_penalty=3.0), "frequency_penalty"),
    (dict(presence_penalty=-2.5), "presence_penalty"),
    (dict(seed="x"), "seed"),
    (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"),
    (dict(logprobs=1), "logprobs"),
    (dict(top_logprobs=21), "top_logprobs"),
    (dict(ignore_eos="yes"), "ignore_eos"),
    # Untrusted JSON: non-finite numbers, wrong types, out-of-range integers, oversized lists.
    *[(dict(**{name: bad}), name)
      for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty")
      for bad in (float("inf"), float("-inf"), float("nan"), True, "0.5", None, 10**400)],
    (dict(temperature=101), "temperature"),
    *[(dict(**{name: bad}), name)
      for name in ("max_new_tokens", "top_k", "seed", "top_logprobs", "prompt_logprobs")
      for bad in (True, "5", 5.0, float("nan"))],
    (dict(max_new_tokens=2**31), "max_new_tokens"),
    (dict(top_k=2**63), "top_k"),
    (dict(top_k=False), "top_k"),
    (dict(top_k=0.0), "top_k"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(stop=5), "stop"),
    (dict(stop={"a": 1}), "stop"),
    (dict(stop=[5]), "stop"),
    (dict(stop=["ok", None]), "stop"),
    (dict(stop=["s"] * (MAX_STOP_STRINGS + 1)), "stop"),
    (dict(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]), "stop"),
    (dict(stop="\ud800"), "stop"),
    (dict(stop=["ok", "a\udfffb"]), "stop"),
    (dict(stop_token_ids=5), "stop_token_ids"),
    (dict(stop_token_ids="5"), "stop_token_ids"),
    (dict(stop_token_ids=[True]), "stop_token_ids"),
    (dict(stop_token_ids=["5"]), "stop_token_ids"),
    (dict(stop_token_ids=[2**31]), "stop_token_ids"),
    (dict(stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids"),
    (dict(ignore_eos=1), "ignore_eos"),
])
def test_invalid_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(InvalidParameter, match=rf"\b{name}\b") as caught:
        SamplingParams(**kwargs)
    assert caught.value.param == name


def test_limits_themselves_are_accepted():
    p = SamplingParams(max_new_tokens=2**31 - 1, temperature=100, top_k=2**31 - 1, seed=2**64 - 1,
                       stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS,
                       stop_token_ids=[2**31 - 1] * MAX_STOP_TOKEN_IDS)
    assert len(p.stop) == MAX_STOP_STRINGS and SamplingParams(seed=-2**63).seed == -2**63
    assert SamplingParams(stop=("a", "b"), stop_token_ids=None).stop == ["a", "b"]


def test_an_oversized_value_is_not_echoed_in_full():
    with pytest.raises(InvalidParameter) as caught:
        SamplingParams(stop=["s"] * 100_000)
    assert len(str(caught.value)) < 200


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k is None
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_logprobs=2).wants_logprobs
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties
