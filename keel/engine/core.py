"""EngineCore: the scheduler and the model runner, stepped one batch at a time.

Overlap scheduling (on unless disable_overlap): step() launches batch N+1 before it reads batch
N's results, so the host's scheduling and bookkeeping run while the device computes. Tokens of N
that N+1 needs come from the device (Req.pending); pages and rows freed meanwhile are fenced by
the event of the latest launched forward (OwnedIdAllocator). Penalties count output tokens on
the host, so a step with penalised requests is read before the next is scheduled; so is a step that
verified drafts (the next depends on how many were accepted), and any step before one that drafts (the
drafter reads the tokens on the host).

It takes token ids in and gives token ids out; text (tokenization, detokenization, stop
strings) belongs to the front end (the offline Engine, or the API server process).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from typing import Optional

import torch

from keel.cache.kv_cache import KVCacheManager
from keel.cache.kv_plan import plan_kv
from keel.config import EngineConfig
from keel.debug.guards import DISABLE_ENV, GUARDS, disabled_guards
from keel.debug.invariants import check_drained, check_idle, check_invariants, strict_checks_enabled
from keel.disagg.engine_side import DisaggSide, Role
from keel.disagg.kv_transfer import AgentInfo, KVDestination, KVTransferAgent, PeerInfo, TransferError
from keel.distributed.parallel import init_tensor_parallel, shutdown_tensor_parallel, tensor_parallel
from keel.distributed.dp_controller import DpController, RankStep
from keel.distributed.ranks import RankProcesses, RankSetup, rank_config, ranks_per_node
from keel.engine.launched_step import LaunchedStep, StepResults, launch_step
from keel.engine.limits import RequestLimits, validate_request
from keel.engine.outputs import CoreOutput, TokenLogprob
from keel.grammar import Grammars
from keel.models.eagle import EAGLE_HEADS, EagleHead
from keel.models.loader import load_model_config
from keel.models.registry import model_class
from keel.models.source import resolve_model
from keel.models.tokenizer import load_tokenizer
from keel.runner.model_runner import ModelRunner, SwaGroup, free_memory_bytes, resolve_device
from keel.runner.penalties import PenaltyCounts
from keel.sampling_params import SamplingParams
from keel.scheduler.batch import build_sampling_batch
from keel.scheduler.req import FinishReason, Req
from keel.scheduler.scheduler import ScheduledBatch, Scheduler, TokenAppended
from keel.spec import SIMULATE_ACCEPT_ENV
from keel.spec.drafter import create_drafter
from keel.spec.verify import simulated_accept_len

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, rank: Optional[RankSetup] = None) -> None:
        """`rank`: this core is a rank > 0, executing rank 0's commands (keel/distributed/ranks.py); None: the core
        clients talk to, which starts the other ranks itself when --tp-size > 1."""
        if rank is None and config.node_rank > 0:
            raise ValueError(f"--node-rank {config.node_rank} runs ranks only (keel.distributed.ranks.run_node); "
                             "requests go to node 0")
        self.config = config
        self.source = resolve_model(config.model)
        self.model_config = load_model_config(self.source)
        if self.model_config.architecture in EAGLE_HEADS.values():
            raise ValueError(f"{config.model} is an EAGLE draft head ({self.model_config.architecture}), not a model "
                             "to serve: pass it as --speculative-draft-model-path with --speculative-algorithm "
                             "EAGLE or EAGLE3")
        if config.draft_tree and any(w is not None for w in self.model_config.sliding_windows):
            raise ValueError(f"--speculative-eagle-topk {config.speculative_eagle_topk} drafts a tree, which keel does "
                             f"not verify on sliding-window models ({config.model}); use --speculative-eagle-topk 1")
        if config.tp_size > 1 and not getattr(model_class(self.model_config.architecture), "tensor_parallel", False):
            raise ValueError(f"--tp-size {config.tp_size}: keel splits Llama-family and Gemma models (Llama, "
                             "Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral, Gemma 2 and 3) over ranks, not "
                             f"{self.model_config.architecture}")
        if config.tp_size > 1 and rank is None:
            config = self.config = rank_config(config, 0)  # rank 0's device, as the others get theirs
        self.ranks = RankProcesses(config) if config.tp_size > 1 and rank is None else None
        setup = rank or (self.ranks.setup if self.ranks else RankSetup(0, 1, ""))
        init_tensor_parallel(setup.rank, setup.size, setup.init_method, resolve_device(config.device),
                             whole_experts=config.ep_size > 1, dp_attention=config.enable_dp_attention,
                             symmetric_all_reduce=config.enable_torch_symm_mem)
        self.dp = DpController(config.dp_size) if config.enable_dp_attention and rank is None else None
        self.runner = ModelRunner(config, self.source, self.model_config)
        self.draft_runner = self._load_draft_model() if config.speculative_draft_model_path else None
        self.kv_cache = self._build_kv([self.runner] + ([self.draft_runner] if self.draft_runner else []))
        self.scheduler = Scheduler(self.kv_cache, config)
        limit_host_threads(self.runner.device, ranks_per_node(config))
        self.strict_checks = strict_checks_enabled()
        if off := disabled_guards():
            logger.warning("GUARDS OFF (%s=%s): %s. For tests only: the bug classes they catch can now corrupt "
                           "outputs silently", DISABLE_ENV, ",".join(sorted(off)),
                           "; ".join(GUARDS[g] for g in sorted(off)))
        self._rids = itertools.count(1)
        self._live: set[int] = set()  # ids of requests not yet finished
        self._seeds = random.Random(config.seed)
        self.overlap = config.overlap
        self.drafter = create_drafter(config, self.runner.device, self.draft_runner, self.kv_cache.table)
        if self.drafter is not None and (simulate := simulated_accept_len()) is not None:
            logger.warning("%s=%s: verification accepts that many tokens per step on average, whatever the drafts: "
                           "outputs are NOT the model's (for benchmarks only)", SIMULATE_ACCEPT_ENV, simulate)
        self._launched: Optional[LaunchedStep] = None  # the step whose results have not been read yet
        self.penalties = PenaltyCounts(self.model_config.vocab_size, self.runner.device)
        self.on_schedule: Optional[Callable[[ScheduledBatch], None]] = None  # sees every batch (benchmarks)
        self.disagg: Optional[DisaggSide] = None  # a prefill or decode server's side (enable_disaggregation)
        self.device_wait_s = 0.0  # the host's time waiting for the device to finish steps, summed (benchmarks)
        if config.disaggregation_mode is not None and rank is None:
            self.enable_disaggregation(config.disaggregation_mode,  # type: ignore[arg-type]  # checked: choices
                                       transfer_timeout_s=config.disaggregation_transfer_timeout)

    def _load_draft_model(self) -> ModelRunner:
        """The drafter's model, run at the target's context length: a model of the target's vocabulary
        (STANDALONE), or an EAGLE head, which gets the target's shared weights and has the target capture the
        hidden states it reads (before any CUDA graph is captured)."""
        path, algorithm = self.config.speculative_draft_model_path, self.config.speculative_algorithm
        assert path is not None  # EngineConfig requires it with these algorithms
        source = resolve_model(path)
        draft_config = load_model_config(source)
        if draft_config.vocab_size != self.model_config.vocab_size:
            raise ValueError(f"the draft model {path} has a vocabulary of {draft_config.vocab_size} tokens, the "
                             f"target {self.model_config.vocab_size}: a drafter must share the target's tokenizer")
        wanted = EAGLE_HEADS.get(algorithm or "")
        if draft_config.architecture != wanted if wanted else draft_config.architecture in EAGLE_HEADS.values():
            raise ValueError(f"--speculative-algorithm {algorithm} needs a draft model of architecture "
                             f"{wanted or 'a causal LM'}; {path} is {draft_config.architecture}")
        runner = ModelRunner(self.config, source, draft_config, context_length=self.runner.context_length)
        if isinstance(runner.model, EagleHead):
            if not hasattr(self.runner.model.model, "forward_capturing"):
                raise ValueError(f"{algorithm} drafts from hidden states keel captures in Llama-family targets; "
                                 f"{self.model_config.architecture} is not one")
            capture = runner.model.target_capture(self.model_config.num_layers)
            if not all(0 <= i <= self.model_config.num_layers for i in capture.layers):
                raise ValueError(f"the EAGLE-3 head {path} reads target layers {capture.layers}; the target has "
                                 f"{self.model_config.num_layers} (set eagle_config.eagle_aux_hidden_state_layer_ids)")
            runner.model.share_target(self.runner.model)
            self.runner.model.capture = capture
        return runner

    def _build_kv(self, runners: list[ModelRunner]) -> KVCacheManager:
        """The KV memory of every runner: pages sized for all of them, one request table, one pool each. The
        target's sliding-window layers get a pool of their own when its layers mix (or all slide); a draft
        model keeps full K/V."""
        config, device = self.config, self.runner.device
        windows = self.model_config.sliding_windows
        swa_layers = frozenset() if config.disable_hybrid_swa_memory else frozenset(
            i for i, w in enumerate(windows) if w is not None)
        window = max(windows[i] for i in swa_layers) if swa_layers else None
        swa_bytes = self.runner.kv_bytes_per_token(len(swa_layers))
        full_bytes = sum(r.kv_bytes_per_token() for r in runners) - swa_bytes
        # the graphs' memory comes out of a budget; a pool sized in tokens has none
        graph_bytes = 0 if config.kv_cache_tokens else sum(runner.measure_graph_memory() for runner in runners)
        plan = plan_kv(config, full_bytes, swa_bytes, window, free_memory_bytes(device), self.runner.context_length,
                       device.type == "cpu", graph_bytes)
        kv_cache = KVCacheManager(plan.num_pages, config.page_size, config.max_running_requests,
                                  self.runner.context_length, device, prefix_cache=not config.disable_radix_cache,
                                  num_swa_pages=plan.num_swa_pages, window=plan.window)
        logger.info("KV pool: %s%s; context length %d; %.0f MiB kept for CUDA graphs",
                    plan.describe(config.page_size, full_bytes, swa_bytes),
                    ", draft model included" if len(runners) > 1 else "", self.runner.context_length,
                    graph_bytes / 2**20)
        for runner in runners:
            swa = None
            if runner is self.runner and kv_cache.swa is not None:
                swa = SwaGroup(swa_layers, plan.num_swa_pages, kv_cache.swa.device_map)
            runner.attach_kv(plan.num_pages, kv_cache.table, swa)
        return kv_cache

    @property
    def context_length(self) -> int:
        return self.runner.context_length

    @property
    def limits(self) -> RequestLimits:
        return RequestLimits(self.model_config.vocab_size, self.context_length, self.kv_cache.capacity_tokens,
                             self.drafter is not None)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError, naming the numbers, for a request the engine could never serve."""
        validate_request(prompt_ids, params, self.limits)

    def add_request(self, prompt_ids: list[int], params: SamplingParams, rid: Optional[int] = None,
                    dp_rank: Optional[int] = None, kv_destination: Optional[KVDestination] = None) -> int:
        """Queue a request; returns its id (`rid` when the caller names it: a positive id not in use). Under
        data-parallel attention it goes to the least loaded rank, or to `dp_rank` (SGLang's data_parallel_rank).
        A prefill server's request names its `kv_destination` (from the decode server's `preallocate`): it draws
        its first token with the decode server's seed, and finishes once its KV is there."""
        if dp_rank is not None and (self.dp is None or not 0 <= dp_rank < self.config.dp_size):
            raise ValueError(f"data_parallel_rank {dp_rank}: the engine has {self.config.dp_size} data-parallel "
                             "attention rank(s)" + ("" if self.dp else " (--enable-dp-attention is off)"))
        if kv_destination is not None and (self.disagg is None or self.disagg.role != "prefill"):
            raise ValueError("a request with a KV destination needs a prefill server (enable_disaggregation)")
        if kv_destination is not None:  # one token here, the rest on the decode server
            params = dataclasses.replace(params, seed=kv_destination.seed, max_new_tokens=1)
        req = self._new_req(prompt_ids, params, rid)
        req.kv_destination = kv_destination
        if kv_destination is not None and kv_destination.send_within_s:
            req.kv_send_by = time.monotonic() + kv_destination.send_within_s
        self._live.add(req.rid)
        rid = req.rid
        target = self.dp.assign(len(prompt_ids), dp_rank) if self.dp is not None else None
        if self.ranks is not None and target != 0:  # with the seed drawn here, so every rank samples alike
            self.ranks.send("add_request", list(prompt_ids), dataclasses.replace(params, seed=req.seed), rid, None,
                            kv_destination, to=target)
        if target in (None, 0):
            self.scheduler.add(req)
        return rid

    def _new_req(self, prompt_ids: list[int], params: SamplingParams, rid: Optional[int]) -> Req:
        """A checked request, not yet queued anywhere."""
        self.validate(prompt_ids, params)
        rid = next(self._rids) if rid is None else rid
        if rid <= 0 or rid in self._live:
            raise ValueError(f"request id {rid} is not positive or already in use")
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(63)
        eos = () if params.ignore_eos else self.model_config.eos_token_ids
        stop_ids = frozenset(params.stop_token_ids) | frozenset(eos)
        req = Req(rid, list(prompt_ids), params, seed, stop_ids)
        if params.grammar is not None:
            req.grammar = self._grammars.matcher(params.grammar)
        self._probe(req)
        return req

    # ---- disaggregation ----------------------------------------------------------------------------

    def enable_disaggregation(self, role: Role, name: Optional[str] = None,
                              transfer_timeout_s: float = 300.0) -> DisaggSide:
        """Make this engine a prefill or a decode server of a disaggregated deployment (keel/disagg): its KV pool
        is registered with a NIXL agent named `name`; `connect` the prefill side to the decode side's
        `peer_info()` before sending."""
        if self.disagg is not None:
            raise ValueError(f"this engine is already a {self.disagg.role} server")
        assert self.runner.kv_pool is not None
        name = name or f"keel-{role}-{os.getpid()}-{id(self):x}"
        if self.ranks is not None:  # every rank registers its own pool (its KV heads) with an agent of its own
            self.ranks.send("enable_disaggregation", role, name, transfer_timeout_s)
        rank = tensor_parallel().rank
        # a drafter's state travels with the KV: a draft model's K/V, an EAGLE head's input features
        agent = KVTransferAgent(name if rank == 0 else f"{name}.rank{rank}", self.runner.kv_pool,
                                self.draft_runner.kv_pool if self.draft_runner is not None else None,
                                self.drafter.features if self.drafter is not None else None, rank)
        self.disagg = DisaggSide(role, self.scheduler, self.kv_cache, agent, transfer_timeout_s)
        return self.disagg

    def kv_peer_info(self) -> PeerInfo:
        """What this server's transfer agents are (every rank's), for a peer's bootstrap exchange."""
        if self.disagg is None:
            raise ValueError("kv_peer_info needs a disaggregated server (enable_disaggregation)")
        if self.ranks is None:
            return PeerInfo((self.kv_agent_info(),))
        self.ranks.send("kv_agent_info", reply=True)
        return PeerInfo(tuple(self.ranks.gather(self.kv_agent_info())))

    def kv_agent_info(self) -> AgentInfo:
        """This rank's transfer agent."""
        assert self.disagg is not None
        return self.disagg.agent.info()

    def connect_kv_peer(self, peer: PeerInfo) -> None:
        """Prefill server: the bootstrap exchange with a decode server (`kv_peer_info()` there), each rank with its
        counterpart; raises TransferError if any rank cannot reach it."""
        if self.disagg is None or self.disagg.role != "prefill":
            raise ValueError("connect_kv_peer needs a prefill server (enable_disaggregation)")
        if self.ranks is not None:
            self.ranks.send("connect_kv_rank", peer, reply=True)
            errors = self.ranks.gather(self.connect_kv_rank(peer))
        else:
            errors = [self.connect_kv_rank(peer)]
        for rank, error in enumerate(errors):
            if error is not None:
                raise TransferError(error if len(errors) == 1 else f"rank {rank}: {error}")

    def connect_kv_rank(self, peer: PeerInfo) -> Optional[str]:
        """This rank's part of connect_kv_peer: the error, if any."""
        assert self.disagg is not None
        try:
            self.disagg.connect(peer)
        except Exception as e:  # another geometry, another rank count, or NIXL cannot reach it
            return str(e)
        return None

    def kv_sender_done(self, rids: list[int]) -> None:
        """Decode server: the prefill server will write nothing more for these requests (DisaggSide.sender_done)."""
        if self.ranks is not None:
            self.ranks.send("kv_sender_done", list(rids))
        assert self.disagg is not None
        for rid in rids:
            self.disagg.sender_done(rid)

    def preallocate(self, prompt_ids: list[int], params: SamplingParams,
                    rid: Optional[int] = None) -> Optional[KVDestination]:
        """Decode server: take a request whose prompt a prefill server computes, holding the KV it will write;
        None (nothing held, nothing queued) if it does not fit now. The request decodes once its KV has arrived."""
        if self.disagg is None or self.disagg.role != "decode":
            raise ValueError("preallocate needs a decode server (enable_disaggregation)")
        if params.wants_logprobs or params.prompt_logprobs is not None:
            raise ValueError("log-probs are not served by disaggregated servers yet (the prefill server's first "
                             "token and prompt scores do not travel with the KV)")
        req = self._new_req(prompt_ids, params, rid)
        args = (list(prompt_ids), dataclasses.replace(params, seed=req.seed), req.rid)
        target = self.dp.assign(len(prompt_ids)) if self.dp is not None else None
        if self.ranks is not None and target is None:  # every rank holds the same pages (its KV heads' share)
            self.ranks.send("preallocate", *args)
        if self.ranks is not None and target not in (None, 0):  # data-parallel attention: another rank holds it
            self.ranks.send("preallocate", *args, to=target, reply=True)
            destination = self.ranks.gather(None)[target]
        else:
            destination = self.disagg.preallocate(req)
        if destination is not None:
            self._live.add(req.rid)
        self._after_step()
        return destination

    @functools.cached_property
    def _grammars(self) -> Grammars:
        """The grammar compiler, built for the first request with a grammar (it loads the tokenizer)."""
        return Grammars(load_tokenizer(self.source), self.model_config.vocab_size, self.model_config.eos_token_ids,
                        json_whitespace=not self.config.constrained_json_disable_any_whitespace)

    def _probe(self, req: Req) -> None:
        """Build `req`'s own sampling inputs on the host, as a batch would: a value the batch cannot hold fails
        here, for this request alone (raises RequestFault), instead of in a step shared with others."""
        try:
            build_sampling_batch([req], self.model_config.vocab_size, torch.device("cpu"))
            if req.params.has_penalties:  # (its counts and penalty values, as launch_step adds them)
                PenaltyCounts(self.model_config.vocab_size, torch.device("cpu")).inputs([req])
        except Exception as e:
            raise RequestFault(f"request {req.rid} cannot be batched: {type(e).__name__}: {e}") from e

    def abort(self, rid: int, reason: FinishReason = "abort") -> bool:
        """Finish a request now, releasing its KV; False if it is unknown or already finished."""
        return bool(self.abort_many([rid], reason))

    def abort_many(self, rids: list[int], reason: FinishReason = "abort") -> list[int]:
        """Finish these requests now, releasing their KV, in one pass over the queues; returns those that were
        live (unknown or finished ones are ignored)."""
        if self.ranks is not None:
            self.ranks.send("abort_many", list(rids), reason)
        live = [rid for rid in rids if rid in self._live]
        finished = self.scheduler.abort_many(set(live), reason)
        aborted = [req.rid for req in finished]
        if self.disagg is not None:  # parked ones: freed once their transfer no longer touches their KV
            for req in finished:
                self.disagg.aborted_unparked(req)
            for rid in live:
                if rid in self.scheduler.parked and rid not in self.disagg.aborted:
                    self.disagg.abort(rid)
                    aborted.append(rid)
        if self.dp is not None:
            aborted = live  # rank 0 knows every rank's live requests; the others abort theirs
        self._live.difference_update(live)
        if self._launched is not None and not self.scheduler.has_work:
            # every request of the step in flight has finished: wait for it, so the engine is idle now
            dropped = self._read_launched()
            assert not dropped, "a finished request got a token"
            self.kv_cache.set_fence(None)
        self._after_step()
        return aborted

    @property
    def has_work(self) -> bool:
        return self._has_own_work or (self.dp is not None and self.dp.others_busy)

    @property
    def waiting_on_transfers(self) -> bool:
        """All this engine has left is KV moving to or from other servers: nothing to run until it has moved."""
        return (self.disagg is not None and self.scheduler.has_work and not self.scheduler.has_batch_work
                and self._launched is None and not self.disagg.ended)

    @property
    def _has_own_work(self) -> bool:
        """Work of this rank's own: requests it holds, a step in flight, or ends of transfers to report."""
        return (self.scheduler.has_work or self._launched is not None
                or (self.disagg is not None and bool(self.disagg.ended)))

    def step(self) -> list[CoreOutput]:
        """Schedule and launch one batch; returns what requests got from the steps whose results were read
        (and requests that failed). With overlap, a step's results are read after the next step is launched,
        so the device never waits for the host between them. Under data-parallel attention every rank steps its
        own requests, and rank 0 returns all of their outputs."""
        if self.ranks is None:
            return self._step()
        try:
            if self.dp is None:
                self.ranks.send("step")
                return self._step()
            self.ranks.send("rank_step", reply=True)
            answers: list[RankStep] = self.ranks.gather(self.rank_step())
        except BaseException:
            self.ranks.kill()  # the others may wait for this rank inside a collective: the engine is over
            raise
        outputs = self.dp.collect(answers)
        self._live.difference_update(out.rid for out in outputs if out.finish_reason is not None)
        return outputs

    def rank_step(self) -> RankStep:
        """step() on this rank alone, with what a data-parallel controller needs to know after it."""
        outputs = self._step()
        return RankStep(outputs, self.scheduler.load_tokens, self._has_own_work)

    def _step(self) -> list[CoreOutput]:
        outputs: list[CoreOutput] = []
        if self._launched is not None and (not self.overlap or self._launched.needs_host_tokens
                                           or self.scheduler.wants_drafts()):
            outputs += self._read_launched()
        batch = self.scheduler.schedule()
        if batch is not None and self.on_schedule is not None:
            self.on_schedule(batch)
        outputs = self._take_failed() + outputs
        previous, self._launched = self._launched, None
        if batch is not None:
            rounds = self.runner.dp_rounds
            try:
                self._launched = self._launch(batch, previous)
            except Exception as e:
                outputs += self._contain(batch, e, met_round=self.runner.dp_rounds > rounds)
        elif self.config.enable_dp_attention:
            self.runner.forward_idle()  # the other ranks' forwards gather from this one: meet them
        if previous is not None:
            outputs += self._read(previous)
        elif batch is None and self.scheduler.has_batch_work and not outputs and not self.scheduler.parked:
            # (parked requests hold KV while it moves: once it has, they decode or free it, and room comes back)
            raise RuntimeError("the scheduler has requests but could schedule none of them")
        if self._launched is not None and not self.overlap:
            outputs += self._read_launched()
        if self._launched is None:
            self.kv_cache.set_fence(None)  # nothing in flight: fenced pages and rows are free again
        if self.disagg is not None:
            outputs += self.disagg.poll()
        self._live.difference_update(out.rid for out in outputs if out.finish_reason is not None)
        self.penalties.free_finished()
        self._after_step()
        return outputs

    def _launch(self, batch: ScheduledBatch, previous: Optional[LaunchedStep]) -> LaunchedStep:
        step = launch_step(self.runner, batch, self.model_config.vocab_size,
                           previous.pending if previous is not None else None, self.penalties, self.drafter)
        self.scheduler.launched(batch)
        if step.done is not None:
            self.kv_cache.set_fence(step.done)  # what is freed from now on may still be read by this forward
        return step

    def _contain(self, batch: ScheduledBatch, error: Exception, met_round: bool) -> list[CoreOutput]:
        """A step failed to launch. Each of its requests whose own inputs cannot be built (the probe fails) ends
        with that error; the others are retracted, to be re-prefilled as if nothing happened. An error no
        request accounts for, or a device error (the device state is unknown), is re-raised: the engine ends."""
        if _is_device_error(error):
            raise error
        if self.config.enable_dp_attention and not met_round:
            self.runner.forward_idle()  # the failure came before this rank's forward: the others still wait for it
        culprits = []
        for req in {id(p.req): p.req for p in batch.parts}.values():
            try:
                self._probe(req)
            except RequestFault as fault:
                culprits.append((req, str(fault)))
        if not culprits:
            raise error
        failed = {req.rid for req, _ in culprits}
        for req, why in culprits:
            logger.error("%s; it alone fails", why)
            self.scheduler.fail(req, why)
        for part in reversed(batch.parts):  # each goes to the front of the queue: keep their order
            if part.req.rid not in failed:
                self.scheduler.requeue(part.req)
        return self._take_failed()

    def _take_failed(self) -> list[CoreOutput]:
        """The last outputs of requests the scheduler failed (with their errors)."""
        outputs = [CoreOutput(r.rid, [], None, r.finish_reason, r.num_cached_tokens, r.error)
                   for r in self.scheduler.failed]
        self.scheduler.failed.clear()
        return outputs

    def _read_launched(self) -> list[CoreOutput]:
        assert self._launched is not None
        step, self._launched = self._launched, None
        return self._read(step)

    def _read(self, step: LaunchedStep) -> list[CoreOutput]:
        results = step.read()
        self.device_wait_s += results.device_wait_s
        return [self._token_output(appended, results) for appended in self.scheduler.process(step.batch,
                                                                                              results.token_ids)]

    @staticmethod
    def _token_output(appended: TokenAppended, results: StepResults) -> CoreOutput:
        req, wanted = appended.req, None
        kept = len(appended.token_ids)
        if results.logprobs is not None and req.params.wants_logprobs:
            wanted = [TokenLogprob(lp.token_id, lp.logprob, lp.top[:req.params.top_logprobs])
                      for lp in results.logprobs[appended.index][:kept]]
        first = len(req.output_ids) == kept
        prompt_logprobs = req.prompt_logprobs if first and req.params.prompt_logprobs is not None else None
        return CoreOutput(req.rid, appended.token_ids, wanted, appended.finish_reason,
                          req.num_cached_tokens if first else None, req.error, prompt_logprobs=prompt_logprobs,
                          num_draft_tokens=appended.num_draft, num_accepted_tokens=appended.num_accepted)

    def _after_step(self) -> None:
        if self.strict_checks:
            (check_invariants if self.has_work else check_idle)(self.scheduler)
        elif not self.has_work:
            check_drained(self.scheduler)  # always on, counters only: a leak is caught where it happens, for free

    def check_idle(self) -> None:
        """Raise InvariantViolation unless the engine is drained and every page is free or evictable cache."""
        check_idle(self.scheduler)

    def flush_cache(self) -> int:
        """Evict the whole prefix cache (every page must be free afterwards); returns the pages freed."""
        if self.ranks is not None:
            self.ranks.send("flush_cache")
        return self.kv_cache.flush_cache()

    def close(self) -> None:
        """Stop the other ranks, if any (rank 0), and leave the group."""
        if self.disagg is not None:
            self.disagg.close()
            self.disagg = None
        for runner in (self.runner, self.draft_runner):
            if runner is not None:
                runner.release_graphs()
        if self.ranks is not None:
            self.ranks.close()  # leaves the group along with the others
            self.ranks = None
        shutdown_tensor_parallel()


class RequestFault(ValueError):
    """One request's inputs cannot be prepared: that request fails, the engine goes on."""


def limit_host_threads(device: torch.device, ranks_here: int = 1) -> None:
    """With the model on a GPU, one torch CPU thread (as vLLM's workers run): the engine's host tensors are small
    (page lists, an entry per request), yet torch spreads even those over every core (repeat_interleave splits at
    one element per task), and with other processes busy (the API server, its clients) each step then waited on
    descheduled OpenMP threads: host-bound decode steps of 40-80 ms instead of 9 (llama-3.1-8b, batch 160, H200).
    With the model on the CPU, the `ranks_here` ranks of this machine share its cores: each takes its share (two
    ranks each spinning threads over both cores of a 2-core machine made a tiny Qwen3-MoE's TP 2 step 151 ms, 28
    with a thread each). Set after the model has loaded (casting weights on the host does use the cores);
    OMP_NUM_THREADS overrides."""
    if "OMP_NUM_THREADS" in os.environ:
        return
    threads = 1 if device.type == "cuda" else max(1, torch.get_num_threads() // ranks_here)
    if threads < torch.get_num_threads():
        logger.info("torch CPU threads: %d -> %d (%s; OMP_NUM_THREADS overrides)", torch.get_num_threads(), threads,
                    "the model is on the GPU" if device.type == "cuda" else f"{ranks_here} ranks share the cores")
        torch.set_num_threads(threads)


def _is_device_error(error: Exception) -> bool:
    """An error of the device itself (illegal address, device-side assert): no later step can be trusted."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    return (accelerator_error is not None and isinstance(error, accelerator_error)) or "CUDA error" in str(error)

