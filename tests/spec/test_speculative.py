"""Speculative decoding on tiny random models (CPU, float32): greedy output equals greedy output without
speculation for every drafter and the paths around it (page sizes, chunked prefill, prefix-cache hits,
retraction, aborts, mixed batches); sampled output keeps the target's distribution. Engines from make_engine
are checked after each test: drained, invariants intact, every page free."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import keel
from keel.models.byte_tokenizer import save_byte_tokenizer
from tests.helpers import _COMMON, TINY_MODELS, random_prompts

GREEDY = keel.SamplingParams(temperature=0.0, max_new_tokens=24, ignore_eos=True, top_logprobs=2)
# Mixed lengths: single-token, page-sized and long prompts, and one that repeats itself (n-grams find it).
PROMPTS = random_prompts([1, 5, 16, 17, 40, 90], seed=11) + [[7, 8, 9, 10, 11] * 6]


@pytest.fixture(scope="module")
def reference(tiny_model) -> list[keel.RequestOutput]:
    target, _ = tiny_model("llama3")
    return keel.Engine(str(target), dtype="float32", device="cpu").generate(PROMPTS, GREEDY)


def assert_greedy_equal(outputs: list[keel.RequestOutput], expected: list[keel.RequestOutput]) -> None:
    for i, (ours, ref) in enumerate(zip(outputs, expected)):
        assert ours.token_ids == ref.token_ids, f"request {i}"
        assert ours.finish_reason == ref.finish_reason
        for a, b in zip(ours.logprobs, ref.logprobs):
            assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-4, f"request {i}"


TREE = dict(speculative_num_steps=3, speculative_eagle_topk=4, speculative_num_draft_tokens=8)
MODEL_DRAFTERS = ["self", "noisy", "unrelated", "eagle3", "eagle"]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("drafter, topk",
                         [(d, 1) for d in ["ngram"] + MODEL_DRAFTERS] + [(d, 4) for d in MODEL_DRAFTERS])
def test_greedy_output_equals_non_speculative(drafter, topk, page_size, drafters, reference, tiny_model,
                                              make_engine):
    target, _ = tiny_model("llama3")
    engine = make_engine(target, page_size=page_size, **drafters[drafter], **(TREE if topk > 1 else {}))
    outputs = engine.generate(PROMPTS, GREEDY)
    assert_greedy_equal(outputs, reference)
    drafted = sum(o.spec_draft_tokens for o in outputs)
    accepted = sum(o.spec_accepted_tokens for o in outputs)
    assert drafted > 0
    if drafter == "self" and topk == 1:
        assert accepted == drafted  # the drafter is the target: every draft is the target's own choice
    if drafter == "self" and topk > 1:  # the target's own choice is the best-scored candidate: always verified
        assert accepted >= sum(o.spec_verify_ct for o in outputs)
    if drafter in ("noisy", "ngram", "eagle"):  # (the EAGLE head here drafts the last token again)
        assert 0 < accepted < drafted


@pytest.mark.parametrize("page_size", [1, 4])
def test_a_tree_drafter_writing_more_tokens_than_are_verified(page_size, drafters, reference, tiny_model, make_engine):
    """3 steps of 4 candidates write 8 draft tokens, 5 of them verified (SGLang's usual `--speculative-num-steps 3
    --speculative-eagle-topk 4 --speculative-num-draft-tokens 6`): a step in flight holds the drafter's 8 slots,
    past what the next step, with no drafts or 5, asks for; that step must not give them back (it used to fail
    with "grow() cannot shrink a request's KV")."""
    target, _ = tiny_model("llama3")
    engine = make_engine(target, page_size=page_size, **drafters["noisy"],
                         **{**TREE, "speculative_num_draft_tokens": 6})
    outputs = engine.generate(PROMPTS, GREEDY)
    assert_greedy_equal(outputs, reference)
    assert sum(o.spec_accepted_tokens for o in outputs) > 0


def options(drafter: str, drafters: dict[str, dict]) -> dict:
    """A drafter by name; "tree:NAME" is NAME drafting trees (topk 4, 8 tokens verified)."""
    tree, _, name = drafter.rpartition(":")
    return {**drafters[name], **(TREE if tree else {})}


@pytest.mark.parametrize("drafter", ["ngram", "noisy", "eagle3", "tree:noisy", "tree:eagle3"])
def test_chunked_prefill_prefix_hits_and_retraction(drafter, drafters, reference, tiny_model, make_engine,
                                                    monkeypatch):
    """Chunks of 8 tokens, every prompt twice (the second time mostly from the prefix cache, with the draft
    model's KV of the cached pages), a tight pool, and a forced retraction every 3 decode steps."""
    monkeypatch.setenv("KEEL_DEBUG_RETRACT_EVERY", "3")
    target, _ = tiny_model("llama3")
    engine = make_engine(target, page_size=4, chunked_prefill_size=8, max_prefill_tokens=8, kv_cache_tokens=400,
                         **options(drafter, drafters))
    assert_greedy_equal(engine.generate(PROMPTS, GREEDY), reference)
    again = engine.generate(PROMPTS, GREEDY)
    assert_greedy_equal(again, reference)
    assert sum(o.num_cached_tokens for o in again) > 0


@pytest.mark.parametrize("drafter", ["noisy", "tree:noisy", "tree:eagle"])
def test_mixed_chunk_batches(drafter, drafters, reference, tiny_model, make_engine):
    target, _ = tiny_model("llama3")
    engine = make_engine(target, chunked_prefill_size=16, enable_mixed_chunk=True, **options(drafter, drafters))
    assert_greedy_equal(engine.generate(PROMPTS, GREEDY), reference)


@pytest.mark.parametrize("drafter", ["self", "tree:self"])
def test_abort_between_verify_steps_releases_everything(drafter, drafters, tiny_model, make_engine):
    target, _ = tiny_model("llama3")
    engine = make_engine(target, page_size=4, **options(drafter, drafters))
    core = engine.core
    rids = [core.add_request(p, GREEDY) for p in PROMPTS]
    for _ in range(3):
        core.step()
    assert any(core.kv_cache.kv_len(r) for r in rids if r in core.kv_cache.held)
    core.abort_many(rids[::2])
    while core.has_work:
        core.step()  # the rest finish; make_engine checks that every page comes back


@pytest.mark.parametrize("drafter", ["self", "tree:self"])
def test_requests_near_their_limits_get_fewer_drafts(drafter, drafters, reference, tiny_model, make_engine):
    """max_new_tokens 1 and 2, a stop token among the accepted drafts, and penalties (no drafts), batched with
    drafted requests: each stops exactly where it would without speculation, with the tokens it would get."""
    target, _ = tiny_model("llama3")
    engine = make_engine(target, **options(drafter, drafters))
    stop = reference[4].token_ids[5]
    cases = [keel.SamplingParams(temperature=0.0, max_new_tokens=1),
             keel.SamplingParams(temperature=0.0, max_new_tokens=2, ignore_eos=True),
             keel.SamplingParams(temperature=0.0, max_new_tokens=24, stop_token_ids=[stop]),
             keel.SamplingParams(temperature=0.0, max_new_tokens=12, ignore_eos=True, repetition_penalty=1.3),
             GREEDY, GREEDY]
    prompts = [PROMPTS[4]] * 4 + PROMPTS[2:4]
    ours = engine.generate(prompts, cases)
    expected = keel.Engine(str(target), dtype="float32", device="cpu").generate(prompts, cases)
    for a, b, params in zip(ours, expected, cases):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason), params


def test_options_are_checked():
    with pytest.raises(ValueError, match="speculative_draft_model_path"):
        keel.EngineConfig(speculative_algorithm="STANDALONE")
    with pytest.raises(ValueError, match="speculative_eagle_topk"):
        keel.EngineConfig(speculative_algorithm="NGRAM", speculative_eagle_topk=4)
    with pytest.raises(ValueError, match="speculative_num_draft_tokens"):
        keel.EngineConfig(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=8)
    tree = dict(speculative_algorithm="EAGLE", speculative_draft_model_path="head", speculative_eagle_topk=4)
    assert keel.EngineConfig(**tree, speculative_num_steps=3).speculative_num_draft_tokens == 13
    assert keel.EngineConfig(**tree, speculative_num_steps=3).draft_reserve == 12
    assert keel.EngineConfig(**tree, speculative_num_steps=5, speculative_num_draft_tokens=8).draft_reserve == 16
    with pytest.raises(ValueError, match="speculative_num_draft_tokens"):  # more than the candidates and root
        keel.EngineConfig(**tree, speculative_num_steps=1, speculative_num_draft_tokens=6)
    with pytest.raises(ValueError, match="at most 64"):
        keel.EngineConfig(**tree, speculative_num_steps=30)


def test_a_drafter_of_another_vocabulary_is_refused(tiny_model, tmp_path):
    target, _ = tiny_model("llama3")
    config_cls, model_cls, extra = TINY_MODELS["llama2"]
    config = config_cls(**{**_COMMON, **extra, "vocab_size": 300})
    config.architectures = [model_cls.__name__]
    model_cls(config).save_pretrained(tmp_path)
    save_byte_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="vocabulary of 300 tokens"):
        keel.Engine(str(target), dtype="float32", device="cpu", speculative_algorithm="STANDALONE",
                    speculative_draft_model_path=str(tmp_path))


# ---- sampling keeps the target's distribution

SAMPLES = 2000
SAMPLED = keel.SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=3, ignore_eos=True)


def first_tokens(engine: keel.Engine, prompt: list[int]) -> list[tuple[int, ...]]:
    params = [dataclasses.replace(SAMPLED, seed=seed) for seed in range(SAMPLES)]
    return [tuple(o.token_ids) for o in engine.generate([prompt] * SAMPLES, params)]


def chi_square_p(a: list, b: list) -> float:
    """p-value of a two-sample chi-square test that `a` and `b` come from one distribution; categories seen
    fewer than 10 times in all are pooled."""
    counts: dict = {}
    for sample, column in ((a, 0), (b, 1)):
        for value in sample:
            counts.setdefault(value, [0, 0])[column] += 1
    table = [c for c in counts.values() if sum(c) >= 10]
    rare = [sum(c[i] for c in counts.values() if sum(c) < 10) for i in (0, 1)]
    if sum(rare):
        table.append(rare)
    totals = [sum(c[i] for c in table) for i in (0, 1)]
    n = sum(totals)
    statistic = sum((c[i] - sum(c) * totals[i] / n) ** 2 / (sum(c) * totals[i] / n) for c in table for i in (0, 1))
    df = len(table) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def sampled_reference(tiny_model) -> list[tuple[int, ...]]:
    target, _ = tiny_model("llama3")
    engine = keel.Engine(str(target), dtype="float32", device="cpu", max_running_requests=512)
    return first_tokens(engine, PROMPTS[3])


@pytest.mark.parametrize("drafter", ["ngram", "noisy", "eagle3", "tree:noisy", "tree:eagle3"])
def test_sampling_keeps_the_target_distribution(drafter, drafters, sampled_reference, tiny_model, make_engine):
    """The first 3 tokens of 2,000 seeded requests, with and without speculation: the token at each position
    passes a chi-square test of equal distributions at p > 0.001 (the triples themselves are too many distinct
    values for 2,000 samples to test)."""
    target, _ = tiny_model("llama3")
    engine = make_engine(target, max_running_requests=512, **options(drafter, drafters))
    ours = first_tokens(engine, PROMPTS[3])
    for position in range(3):
        p = chi_square_p([t[position] for t in ours], [t[position] for t in sampled_reference])
        assert p > 1e-3, f"token {position}: p = {p:.2e}"


def test_the_distribution_test_catches_a_verifier_that_trusts_the_drafter(drafters, sampled_reference, tiny_model,
                                                                         make_engine, monkeypatch):
    """Mutation check of the test above: accept every draft (the draft's distribution, not the target's)."""
    import keel.spec.verify as verify_module

    def trusting(logits, rows, starts, num_draft, drafts, draft_probs, draft_rows, is_draft):
        accepted = num_draft
        p = verify_module.filtered_probs(logits, rows)
        final_rows = starts + accepted
        return accepted, verify_module.sample_from(p[final_rows], rows.seeds[final_rows], rows.steps[final_rows])

    monkeypatch.setattr(verify_module, "_speculative_sample", trusting)
    target, _ = tiny_model("llama3")
    engine = make_engine(target, max_running_requests=512, **drafters["unrelated"])
    ours = first_tokens(engine, PROMPTS[3])
    assert min(chi_square_p([t[i] for t in ours], [t[i] for t in sampled_reference]) for i in range(3)) < 1e-3


def test_the_distribution_test_catches_a_tree_verifier_that_trusts_the_drafter(drafters, sampled_reference,
                                                                              tiny_model, make_engine, monkeypatch):
    """The same for trees: accept the drafter's deepest candidate path (as if it were the target's choice)."""
    import keel.spec.verify as verify_module

    def trusting(logits, rows, starts, valid, node_rows, node_tokens, tree):
        node = verify_module._deepest_within(tree, valid, torch.full_like(starts, tree.max_depth))
        p = verify_module.filtered_probs(logits, rows)
        depth = tree.depths.gather(1, node[:, None])[:, 0]
        return node, verify_module.sample_from(p[starts + node], rows.seeds[starts], rows.steps[starts] + depth)

    monkeypatch.setattr(verify_module, "_tree_sample", trusting)
    target, _ = tiny_model("llama3")
    engine = make_engine(target, max_running_requests=512, **options("tree:unrelated", drafters))
    ours = first_tokens(engine, PROMPTS[3])
    assert min(chi_square_p([t[i] for t in ours], [t[i] for t in sampled_reference]) for i in range(3)) < 1e-3


# ---- seed 004: an optional field absent on a rare path is an error naming it, not a silent fallback

def test_seed_004_missing_draft_distribution_is_an_error_naming_it(drafters, tiny_model, make_engine, monkeypatch):
    """A draft model that samples must hand over the distributions it drew from; suppose a rarely used path
    forgot them (probs None). With guard optional-explicit the step fails naming DraftTokens.probs; without it,
    verification would silently treat the drafts as deterministic and bias every sampled request."""
    import keel.spec.draft_model as draft_model

    original = draft_model.DraftModelDrafter.propose

    def forgetful(self, batch, roots):
        drafts = original(self, batch, roots)
        return dataclasses.replace(drafts, probs=None) if drafts is not None else None

    monkeypatch.setattr(draft_model.DraftModelDrafter, "propose", forgetful)
    target, _ = tiny_model("llama3")
    engine = make_engine(target, **drafters["noisy"])
    with pytest.raises(ValueError, match="DraftTokens.probs is missing"):
        engine.generate([PROMPTS[3]], SAMPLED)
    engine.core.abort_many(list(engine.core._live))


@pytest.mark.parametrize("drafter", ["unrelated", "tree:unrelated"])
def test_simulated_acceptance_accepts_the_asked_mean(drafter, drafters, tiny_model, make_engine, monkeypatch):
    """KEEL_SIMULATE_ACCEPT_LEN (benchmarks): a drafter that is never right still gets the asked mean."""
    monkeypatch.setenv("KEEL_SIMULATE_ACCEPT_LEN", "2.5")
    target, _ = tiny_model("llama3")
    outputs = make_engine(target, **options(drafter, drafters)).generate(PROMPTS, GREEDY)
    steps = sum(o.spec_verify_ct for o in outputs)
    assert 2.2 < 1 + sum(o.spec_accepted_tokens for o in outputs) / steps < 2.8


# ---- backoff: drafts that keep failing are made rarely, and the steps between run with overlap

def test_failing_drafts_back_off_and_good_ones_do_not(drafters, tiny_model, make_engine, monkeypatch):
    """Every draft rejected (simulated accept length 1): with backoff, each request soon drafts only every 64th
    step, and the steps between are plain decodes; without it, every decode step verifies drafts. Outputs are
    the target's either way (a rejected draft leaves the target's own token). The target drafting for itself
    never backs off."""
    target, _ = tiny_model("llama3")
    params = dataclasses.replace(GREEDY, max_new_tokens=96)
    reference = keel.Engine(str(target), dtype="float32", device="cpu").generate(PROMPTS[:3], params)
    monkeypatch.setenv("KEEL_SIMULATE_ACCEPT_LEN", "1")
    verify_steps = {}
    for backoff in (True, False):
        engine = make_engine(target, disable_speculative_backoff=not backoff, **drafters["noisy"])
        outputs = engine.generate(PROMPTS[:3], params)
        assert_greedy_equal(outputs, reference)
        verify_steps[backoff] = sum(o.spec_verify_ct for o in outputs)
    # every decode step of every request, but the last ones (nothing to keep: with a verify in flight the host
    # counts the most it may have emitted)
    assert verify_steps[False] >= 3 * 92
    assert verify_steps[True] <= 3 * 8  # each: 2 steps to fall below 0.5, then every 2nd, 4th, ... 64th
    monkeypatch.delenv("KEEL_SIMULATE_ACCEPT_LEN")
    outputs = make_engine(target, **drafters["self"]).generate(PROMPTS[:3], params)
    assert [o.spec_verify_ct for o in outputs] == [24] * 3  # 95 tokens after the first: 23 x 4, then 3


# ---- overlap: the next step is built from the verify in flight, on the device

@pytest.mark.parametrize("drafter", ["noisy", "tree:eagle3", "eagle"])
@pytest.mark.parametrize("page_size", [1, 16])
def test_steps_after_a_verify_in_flight_shift_on_the_device(drafter, page_size, drafters, reference, tiny_model,
                                                            make_engine, monkeypatch):
    """With overlap (the default), a step after a verify is scheduled before the verify is read: counted lengths
    are upper bounds and the device shifts positions, lengths, slots and tree roots back by what the verify did
    not emit (its ForwardBatch has no host lengths). Outputs stay exact; with --disable-overlap no step runs
    that way."""
    import keel.engine.launched_step as launched_step

    built = []
    original = launched_step.build_forward_batch

    def recording(*args, **kwargs):
        forward_batch = original(*args, **kwargs)
        built.append(forward_batch.seq_lens_cpu is None)
        return forward_batch

    monkeypatch.setattr(launched_step, "build_forward_batch", recording)
    target, _ = tiny_model("llama3")
    for overlap in (True, False):
        built.clear()
        engine = make_engine(target, page_size=page_size, disable_overlap=not overlap, disable_speculative_backoff=True,
                             **options(drafter, drafters))
        assert_greedy_equal(engine.generate(PROMPTS, GREEDY), reference)
        assert (sum(built) >= 5) if overlap else not any(built), (overlap, sum(built), len(built))


# ---- a real model

def test_a_real_model_drafting_trees_for_itself_is_token_identical(make_engine):
    """SmolLM2-135M-Instruct (float32, CPU) drafting trees for itself (STANDALONE, topk 4, 8 tokens) at page size 16,
    with overlap while speculating: greedy output equals plain greedy on chat prompts, and every verify accepts at
    least the target's own first choice, which is always the tree's best candidate."""
    plain = make_engine("smollm2-135m-instruct", page_size=16)
    chats = [plain.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                 tokenize=False)
             for text in ("Name three rivers in Europe.", "Write one sentence about the sea.")]
    prompts = [plain.tokenizer(chat, add_special_tokens=False).input_ids for chat in chats]
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=40, top_logprobs=2)
    expected = plain.generate(prompts, params)
    spec = make_engine("smollm2-135m-instruct", page_size=16, speculative_algorithm="STANDALONE",
                       speculative_draft_model_path="smollm2-135m-instruct", **TREE)
    outputs = spec.generate(prompts, params)
    assert_greedy_equal(outputs, expected)
    assert all(o.spec_accepted_tokens >= o.spec_verify_ct > 0 for o in outputs)
