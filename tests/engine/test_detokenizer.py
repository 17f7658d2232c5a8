import pytest

from keel.engine.detokenizer import IncrementalDetokenizer, TextDecoder
from keel.models.byte_tokenizer import EOS_ID, byte_tokenizer

TOKENIZER = byte_tokenizer()
DECODER = TextDecoder(TOKENIZER)


@pytest.mark.parametrize("text", ["plain ascii", "héllo wörld", "你好，世界", "emoji 🎉🚀 end", "mixé你🎉"])
def test_deltas_never_split_a_character_and_add_up_to_the_text(text):
    ids = TOKENIZER(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(DECODER, TOKENIZER("prompt").input_ids)
    deltas = [detok.push([t]) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)


def test_incomplete_character_is_held_then_flushed_at_the_end():
    detok = IncrementalDetokenizer(DECODER, [])
    first_two_bytes_of_ni = list("你".encode())[:2]
    assert detok.push(first_two_bytes_of_ni) == ""
    assert detok.flush() == "\ufffd"  # the request ended mid-character; say so rather than drop it


def test_special_tokens_are_not_text():
    detok = IncrementalDetokenizer(DECODER, [])
    assert detok.push([ord("a"), EOS_ID]) == "a"


def test_tokens_without_text_do_not_grow_the_window_for_good():
    detok = IncrementalDetokenizer(DECODER, [])
    assert detok.push([ord("a")]) == "a"
    for _ in range(1000):  # the end-of-sequence token is skipped: no text
        assert detok.push([EOS_ID]) == ""
    assert len(detok.ids) - detok.prefix_offset <= 20  # each decode reads a short window, not 1,000 tokens
    assert "".join(detok.push([t]) for t in "é b".encode()) + detok.flush() == "é b"


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_the_decoder_decodes_as_transformers_does(model, keel_cache_dir):
    """Real tokenizers (byte-level BPE, SentencePiece-style), random ids, special tokens included."""
    import random

    from keel.models.source import resolve_model
    from keel.models.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(model))
    rng = random.Random(0)
    sequences = [[rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 12))] for _ in range(200)]
    expected = [tokenizer.decode(seq, skip_special_tokens=True) for seq in sequences]
    assert [TextDecoder(tokenizer)(seq) for seq in sequences] == expected


@pytest.mark.parametrize("model", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_text_made_once_at_the_end_is_the_deltas_joined(model, keel_cache_dir):
    """A request whose text is only read when it finishes is detokenized in one push (RequestState): the same
    text as one push per token. Random ids, so partial characters, special and silent tokens all occur."""
    import random

    from keel.models.source import resolve_model
    from keel.models.tokenizer import load_tokenizer

    decoder = TextDecoder(load_tokenizer(resolve_model(model)))
    rng = random.Random(1)
    vocab = len(decoder.tokenizer)
    for _ in range(100):
        prompt = [rng.randrange(vocab) for _ in range(rng.randint(0, 8))]
        output = [rng.randrange(vocab) for _ in range(rng.randint(0, 40))]
        each = IncrementalDetokenizer(decoder, prompt)
        deltas = "".join(each.push([t]) for t in output) + each.flush()
        once = IncrementalDetokenizer(decoder, prompt)
        assert once.push(output) + once.flush() == deltas, (prompt, output)
