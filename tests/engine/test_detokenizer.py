import pytest

from keel.engine.detokenizer import IncrementalDetokenizer
from keel.models.byte_tokenizer import EOS_ID, byte_tokenizer

TOKENIZER = byte_tokenizer()


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "你好，世界", "emoji 🎉🚀 end", "mixé你🎉"])
def test_deltas_never_split_a_character_and_add_up_to_the_text(text):
    ids = TOKENIZER(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(TOKENIZER, TOKENIZER("prompt").input_ids)
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_is_held_then_flushed_at_the_end():
    detok = IncrementalDetokenizer(TOKENIZER, [])
    first_two_bytes_of_ni = list("你".encode())[:2]
    assert detok.push(first_two_bytes_of_ni) == ""
    assert detok.flush() == "\ufffd"  # the request ended mid-character; say so rather than drop it


def test_special_tokens_are_not_text():
    detok = IncrementalDetokenizer(TOKENIZER, [])
    assert detok.push([ord("a"), EOS_ID]) == "a"
