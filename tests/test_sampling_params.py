import pytest

from keel.sampling_params import SamplingParams


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
])
def test_invalid_values_raise_naming_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        SamplingParams(**kwargs)


def test_normalisation():
    p = SamplingParams(stop="###", top_k=-1)
    assert p.stop == ["###"] and p.top_k is None
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(top_logprobs=2).wants_logprobs
    assert not SamplingParams().has_penalties and SamplingParams(presence_penalty=0.1).has_penalties
