"""NGRAM drafting: the lookup itself, and token identity with plain greedy decoding on a real model."""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch

import keel
from keel.scheduler.req import Req
from keel.spec.ngram import NgramDrafter, _NgramIndex

LICENSE = Path(os.path.dirname(os.__file__)) / "LICENSE.txt"


def request(tokens: list[int]) -> Req:
    return Req(1, tokens, keel.SamplingParams(), seed=0, stop_token_ids=frozenset())


def test_the_longest_recent_match_is_drafted_and_tokens_are_indexed_once():
    req = request([1, 2, 3, 4, 5, 9, 9, 1, 2, 3])
    index = _NgramIndex()
    index.extend(req, 1, 4)
    assert index.draft(3, 1, 4) == [4, 5, 9]  # "1 2 3" occurred before, followed by 4 5 9
    req.output_ids += [4, 7]
    index.extend(req, 1, 4)
    assert index.draft(3, 1, 4) == []  # "7" never occurred before
    assert len(index.tokens) == 12


def test_drafts_are_padded_to_the_fixed_length_and_forgotten_with_the_request():
    drafter = NgramDrafter(num_draft=4, min_match=1, max_match=3, device=torch.device("cpu"))
    req = request([5, 6, 7, 5, 6])
    index = drafter._indexes.setdefault(req, _NgramIndex())
    index.extend(req, 1, 3)
    assert index.draft(4, 1, 3) == [7, 5, 6]
    del req, index
    gc.collect()
    assert len(drafter._indexes) == 0  # no exit path has to remember to drop it


def test_real_text_edit_is_token_identical_and_accepts_many(make_engine):
    """SmolLM2-135M-Instruct (float32, CPU) asked to repeat a passage: NGRAM output equals plain greedy."""
    passage = LICENSE.read_text(encoding="utf-8")[2000:2400]
    plain = make_engine("smollm2-135m-instruct")
    messages = [{"role": "user", "content": f"Repeat the following text exactly, word for word:\n\n{passage}"}]
    prompt = plain.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = plain.tokenizer(prompt, add_special_tokens=False).input_ids
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=64)
    expected = plain.generate([ids], params)[0]
    spec = make_engine("smollm2-135m-instruct", speculative_algorithm="NGRAM", speculative_num_steps=4)
    ours = spec.generate([ids], params)[0]
    assert ours.token_ids == expected.token_ids
    assert ours.spec_accept_length > 2.0, ours.spec_accept_length
