"""Speculative decoding on the GPU: the Triton path with CUDA graphs (verify and draft decode steps replay the
decode graphs, a greedy chain's later steps its own graph; draft extend runs eagerly), float32, against the same
engine without speculation. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

import keel
from tests.helpers import assert_same_greedy, random_prompts
from tests.spec.eagle_heads import write_eagle_head

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GREEDY = keel.SamplingParams(temperature=0.0, max_new_tokens=40, ignore_eos=True, top_logprobs=2)
OPTIONS = dict(dtype="float32", device="cuda", attention_backend="triton")
TREE = dict(speculative_num_steps=3, speculative_eagle_topk=4, speculative_num_draft_tokens=8)


def run(directory, prompts, **options) -> list[keel.RequestOutput]:
    engine = keel.Engine(str(directory), **OPTIONS, **options)
    outputs = engine.generate(prompts, GREEDY)
    engine.core.check_idle()
    return outputs


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("algorithm, topk, tokens", [
    ("NGRAM", 1, None), ("STANDALONE", 1, None), ("EAGLE3", 1, None), ("EAGLE", 1, None), ("STANDALONE", 4, 8),
    ("EAGLE3", 4, 8), ("EAGLE", 4, 8), ("STANDALONE", 4, 6), ("EAGLE3", 4, 6)])
def test_greedy_speculation_on_triton_with_cuda_graphs(algorithm, topk, tokens, page_size, tiny_model, tmp_path):
    """EAGLE3: a random head with a 300-token draft vocabulary; EAGLE: the identity head, which drafts the
    last token again (tests/spec/eagle_heads.py). topk 4: trees of 8 tokens (or 6: fewer than the drafter's steps
    write), verified and drafted in CUDA graphs captured with the tree mask."""
    directory, _ = tiny_model("llama3")
    prompts = random_prompts([1, 7, 16, 33, 100, 250], seed=3) + [[5, 6, 7, 8] * 10]
    spec = dict(speculative_algorithm=algorithm, **({**TREE, "speculative_num_draft_tokens": tokens}
                                                       if topk > 1 else {}))
    if algorithm == "STANDALONE":
        spec["speculative_draft_model_path"] = str(directory)
    elif algorithm.startswith("EAGLE"):
        eagle3 = algorithm == "EAGLE3"
        head = write_eagle_head(tmp_path / "head", directory, eagle3=eagle3, identity=not eagle3,
                                draft_vocab_size=300 if eagle3 else None)
        spec["speculative_draft_model_path"] = str(head)
    reference = run(directory, prompts, page_size=page_size)
    outputs = run(directory, prompts, page_size=page_size, **spec)
    for i, (ours, ref) in enumerate(zip(outputs, reference)):
        assert_same_greedy(ours, ref, f"request {i}")
    drafted, accepted = sum(o.spec_draft_tokens for o in outputs), sum(o.spec_accepted_tokens for o in outputs)
    assert drafted > 0
    if algorithm == "STANDALONE" and topk == 1:  # the target drafting for itself: rounding aside, all accepted
        assert accepted >= 0.95 * drafted, (accepted, drafted)
    if algorithm == "STANDALONE" and topk > 1:  # its best candidate is the target's choice: one accepted per step
        assert accepted >= 0.95 * sum(o.spec_verify_ct for o in outputs), accepted


def test_seed_003_padded_graph_rows_cannot_write_into_live_kv(tiny_model):
    """Seed 003's class: a CUDA-graph input buffer keeps rows from an earlier, larger replay. Eight requests
    fill the largest captured graph (8), finish, and their pages go to five new requests, replayed in the same
    graph with three padded rows. Guard bounded-write neutralises the padded rows on every replay; without it
    they keep the last replay's slots, now inside the new requests' KV, and overwrite it. The target drafts for
    itself at page size 16, so corrupted draft KV shows as rejected drafts, and corrupted target KV as changed
    tokens."""
    directory, _ = tiny_model("llama3")
    outputs = five_after_eight(directory, cuda_graph_max_bs=8)
    drafted, accepted = sum(o.spec_draft_tokens for o in outputs), sum(o.spec_accepted_tokens for o in outputs)
    assert accepted >= 0.95 * drafted, (accepted, drafted)


def five_after_eight(directory, **options) -> list[keel.RequestOutput]:
    """Eight requests at page size 16, the target drafting for itself, then five more on their freed pages; the
    five must equal their run without speculation."""
    engine = keel.Engine(str(directory), **OPTIONS, page_size=16, max_running_requests=8, kv_cache_tokens=8 * 16 * 8,
                         speculative_algorithm="STANDALONE", speculative_draft_model_path=str(directory), **options)
    assert engine.core.runner.cuda_graph is not None
    assert engine.core.runner.cuda_graph.max_bs == options["cuda_graph_max_bs"]
    second = random_prompts([20] * 5, seed=6)
    engine.generate(random_prompts([30] * 8, seed=5), GREEDY)
    outputs = engine.generate(second, GREEDY)
    engine.core.check_idle()
    for i, (ours, ref) in enumerate(zip(outputs, run(directory, second))):
        assert_same_greedy(ours, ref, f"request {i}")
    return outputs


def test_seed_003_draft_tree_rows_stay_in_their_graph_rows(tiny_model):
    """Seed 003 itself: draft-decode steps of a tree (topk 4) at page size 16 in CUDA graphs. Eight requests
    run the largest captured graph (8 x 8 verify rows = 64; 8 x 4 frontier rows = 32), finish, and five new ones
    reuse the freed pages: their frontier steps (20 rows) replay the 24-row graph and their roots (5) the 8-row
    one, with padded rows. Guard bounded-write checks every write's extent and neutralises the padded rows
    (request-table row 0, slot 0, no tree); without it those rows keep the first requests' slots and tree masks
    and write into the new requests' draft KV, which then drafts worse. The target drafts for itself, so its best
    candidate is always the target's choice: with intact KV every verify step accepts at least one token."""
    directory, _ = tiny_model("llama3")
    outputs = five_after_eight(directory, cuda_graph_max_bs=64, **TREE)
    verified, accepted = sum(o.spec_verify_ct for o in outputs), sum(o.spec_accepted_tokens for o in outputs)
    assert accepted >= verified, (accepted, verified)


@pytest.mark.parametrize("algorithm", ["STANDALONE", "EAGLE3"])
@pytest.mark.parametrize("rows", [1, 10, 33])  # graphs of 1, 11 and 36 rows: none, one and three padded rows
def test_draft_chain_graph_drafts_what_its_steps_draft_eagerly(algorithm, rows, tiny_model, tmp_path):
    """A greedy chain's later steps replayed from one CUDA graph give the tokens of the same steps run one
    forward at a time without graphs (float32, the same kernels: exactly)."""
    directory, _ = tiny_model("llama3")
    path = directory if algorithm == "STANDALONE" else write_eagle_head(tmp_path / "head", directory, eagle3=True,
                                                                        draft_vocab_size=300)
    engine = keel.Engine(str(directory), **OPTIONS, speculative_algorithm=algorithm, speculative_num_steps=4,
                         speculative_draft_model_path=str(path))
    drafter, table = engine.core.drafter, engine.core.kv_cache.table
    chain = drafter.chain
    assert chain is not None and chain.steps == 3 and sorted(chain.graphs)[9:12] == [11, 13, 15]
    g = torch.Generator().manual_seed(rows)
    req_rows = torch.arange(1, rows + 1)
    width = 32  # table positions 0..31 of each row on slots of their own, in an idle engine's free pages
    table.write(req_rows.repeat_interleave(width), torch.arange(width).repeat(rows),
                (req_rows[:, None] * width + torch.arange(width)).reshape(-1))
    tokens = torch.randint(0, 200, (rows,), generator=g).cuda()
    positions = torch.randint(4, 20, (rows,), generator=g).cuda()
    features = None
    if drafter.features is not None:
        features = torch.randn(rows, drafter.features.shape[1], generator=g).cuda()
    inputs = (tokens, positions, req_rows.cuda(), features)
    replayed = chain.run(*inputs).clone()
    eager = chain._chain(*inputs, drafter.runner.forward_eager)
    assert torch.equal(replayed, eager), (replayed, eager)
    if features is not None:  # a head's graph never replays on the last call's hidden states (guard 004)
        with pytest.raises(ValueError, match="without features"):
            chain.run(tokens, positions, req_rows.cuda(), None)
