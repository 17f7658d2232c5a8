"""EngineConfig: every engine option in one dataclass, mapped 1:1 to CLI flags.

`keel.Engine(model, page_size=16)` and `keel generate --page-size 16` set the same field;
the argparse flags are generated from the fields below, so the two cannot drift apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

# No torch here: `keel serve` reads this module before it spawns the engine, which must not wait for that import.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MAX_TREE_TOKENS = 64  # a draft tree's tokens, root included: one bit each in the attention kernels' int64 masks


def option(default: Any, help: str, choices: Optional[tuple] = None) -> Any:
    """A dataclass field that also describes its CLI flag."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass
class EngineConfig:
    model: str = option("keel-demo", "preset name, 'keel-demo', or a local Hugging Face model directory")
    dtype: str = option(
        "auto", "weight and activation dtype; auto: the checkpoint's dtype on GPU (float32 checkpoints run "
        "in bfloat16), float32 on CPU", ("auto", *DTYPE_NAMES))
    device: str = option("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N")
    load_format: str = option(
        "auto", "auto: safetensors if the directory has weights, else error; dummy: random weights "
        "from the config alone (presets always use dummy)", ("auto", "safetensors", "dummy"))
    seed: int = option(0, "seed for dummy weights and for requests that do not set their own seed")
    page_size: int = option(1, "tokens per KV page")
    kv_cache_tokens: Optional[int] = option(
        None, "KV pool size in tokens (of the full-attention pool of a hybrid model; of the sliding-window pool "
        "when every layer slides); default: from --mem-fraction of memory free after weights")
    mem_fraction: float = option(
        0.8, "fraction of the memory free after loading weights used for the KV pool and the CUDA graphs")
    context_length: Optional[int] = option(None, "maximum tokens per request; default: the model's")
    max_running_requests: int = option(256, "most requests holding KV (decoding or prefilling) at once")
    max_prefill_tokens: int = option(16384, "most prompt tokens prefilled in one step")
    chunked_prefill_size: Optional[int] = option(
        8192, "prefill long prompts in page-aligned chunks of at most this many tokens per step "
        "(0 or unset: no chunking)")
    enable_mixed_chunk: bool = option(False, "run prefill chunks and decodes in the same batch")
    schedule_policy: str = option("fcfs", "waiting-queue order: fcfs (arrival) or lpm (longest cached "
                                  "prefix first)", ("fcfs", "lpm"))
    swa_full_tokens_ratio: float = option(
        0.8, "hybrid KV pools (models mixing sliding-window and full-attention layers): sliding-window pool tokens "
        "per full-pool token. The window layers need only their last `window` tokens per request, so long contexts "
        "fit far more requests with a small ratio (e.g. 0.05 for 32k-token requests and a 1k window)")
    disable_hybrid_swa_memory: bool = option(
        False, "keep every layer's K/V for every token (sliding-window layers masked), instead of a separate, "
        "smaller pool for the sliding-window layers")
    disable_radix_cache: bool = option(False, "do not share KV of common prefixes between requests")
    cuda_graph_max_bs: int = option(256, "largest decode batch replayed from a captured CUDA graph")
    disable_cuda_graph: bool = option(False, "run every decode step eagerly (CUDA graphs need the triton backend)")
    disable_overlap: bool = option(False, "finish each step before scheduling the next (by default the host "
                                          "schedules step N+1 while the device runs step N)")
    constrained_json_disable_any_whitespace: bool = option(
        False, "structured JSON output without whitespace between tokens (compact JSON). By default a model may "
        "put whitespace there, at most 24 characters in a row")
    speculative_algorithm: Optional[str] = option(
        None, "speculative decoding: NGRAM (drafts from earlier matches of the latest tokens in the prompt and "
        "output), STANDALONE (a smaller model of the same vocabulary drafts), EAGLE or EAGLE3 (a draft head that "
        "reads the target's hidden states); the target verifies every draft token in one forward, so outputs "
        "follow the target exactly. Turns overlap scheduling off", (None, "NGRAM", "STANDALONE", "EAGLE", "EAGLE3"))
    speculative_draft_model_path: Optional[str] = option(
        None, "the drafter of STANDALONE (a model of the target's vocabulary), EAGLE or EAGLE3 (a draft head "
        "checkpoint, LlamaForCausalLMEagle / LlamaForCausalLMEagle3)")
    speculative_num_steps: int = option(3, "draft steps per round: the depth of the chain or tree of drafts")
    speculative_eagle_topk: int = option(1, "candidates each draft step expands: 1 drafts a chain; more drafts a "
                                            "tree (STANDALONE, EAGLE, EAGLE3)")
    speculative_num_draft_tokens: Optional[int] = option(
        None, "tokens the target verifies per request and step: the last token and its drafts; for a chain "
        "speculative_num_steps + 1 (the default), for a tree the best of its candidates (default: "
        "speculative_num_steps * speculative_eagle_topk + 1, at most 64)")
    disable_speculative_backoff: bool = option(
        False, "draft for every request on every step. By default a request whose drafts keep failing (a running "
        "mean of accepted drafts per step below 0.5) drafts only every 2nd, 4th, ... 64th step until they pay "
        "again, and steps without drafts run with overlap scheduling")
    speculative_ngram_min_match_window_size: int = option(1, "NGRAM: shortest suffix looked up")
    speculative_ngram_max_match_window_size: int = option(12, "NGRAM: longest suffix looked up (longer matches "
                                                              "are tried first)")
    tp_size: int = option(1, "tensor-parallel ranks: one engine process per rank, each holding a slice of every "
                                 "layer (attention heads, MLP and expert features, vocabulary); Llama-family models")
    ep_size: int = option(1, "expert parallelism over the tensor-parallel ranks (1, or --tp-size): each rank holds "
                                 "whole experts, a 1/ep share of them, instead of a slice of every expert")
    enable_torch_symm_mem: bool = option(False, "small bfloat16 all-reduces on GPUs take a one-shot path through "
                                                "torch's symmetric memory instead of NCCL")
    dp_size: int = option(1, "data-parallel attention ranks, with --enable-dp-attention (equal to --tp-size): each "
                                 "rank schedules its own requests and holds their KV, the MLP / expert layers are "
                                 "shared over all ranks")
    enable_dp_attention: bool = option(False, "data-parallel attention over --dp-size ranks (SGLang's flag)")
    nnodes: int = option(1, "machines the --tp-size ranks span (an equal share on each)")
    node_rank: int = option(0, "this machine's index among --nnodes; 0 serves, the others run ranks only")
    dist_init_addr: Optional[str] = option(None, "host:port where the ranks of several machines meet (node 0's "
                                                 "address; required with --nnodes > 1)")
    disaggregation_mode: Optional[str] = option(
        None, "prefill/decode disaggregation (SGLang's flag): prefill servers compute prompts' KV and write it into "
        "decode servers' KV pools over NIXL; decode servers only decode. Both sit behind `keel router`",
        (None, "prefill", "decode"))
    disaggregation_transfer_backend: str = option("nixl", "how KV moves between the servers (NIXL, over UCX)",
                                                  ("nixl",))
    disaggregation_transfer_timeout: float = option(
        300.0, "seconds a request's KV may take to reach a decode server (from its preallocation there) or to "
        "leave a prefill server (from the start of its transfer); past it the request fails and its pages are "
        "freed, so nothing waits forever on a server that is gone")
    attention_backend: str = option(
        "auto", "triton (paged Triton kernels and fused ops, with CUDA-graph decode on a GPU), torch (the "
        "reference: scaled_dot_product_attention and plain torch ops), or auto: triton on a GPU when the model's "
        "head_dim suits its kernels, else torch", ("auto", "torch", "triton"))

    def __post_init__(self) -> None:
        if self.chunked_prefill_size in (0, -1):
            self.chunked_prefill_size = None  # 0 / -1 mean "off", as in SGLang
        for name in ("page_size", "max_running_requests", "max_prefill_tokens", "cuda_graph_max_bs", "tp_size"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        for name in ("kv_cache_tokens", "context_length", "chunked_prefill_size"):
            value = getattr(self, name)
            _require(value is None or value >= 1, name, "must be >= 1 when set")
        _require(0.0 < self.mem_fraction <= 1.0, "mem_fraction", "must be in (0, 1]")
        _require(self.disaggregation_transfer_timeout > 0, "disaggregation_transfer_timeout", "must be > 0")
        _require(0.0 < self.swa_full_tokens_ratio <= 1.0, "swa_full_tokens_ratio", "must be in (0, 1]")
        if self.chunked_prefill_size is not None:
            _require(self.chunked_prefill_size >= self.page_size, "chunked_prefill_size",
                     f"must be at least page_size ({self.page_size}) so every chunk holds a page")
            _require(self.max_prefill_tokens >= self.page_size, "max_prefill_tokens",
                     f"must be at least page_size ({self.page_size}) when prefill is chunked")
        self._check_speculative()
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            _require(choices is None or getattr(self, f.name) in choices, f.name,
                     f"must be one of {choices}")
        _require(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), "device",
                 "must be auto, cpu, cuda or cuda:N")

    def _check_speculative(self) -> None:
        _require(self.speculative_num_steps >= 1, "speculative_num_steps", "must be >= 1")
        steps, topk = self.speculative_num_steps, self.speculative_eagle_topk
        _require(topk >= 1, "speculative_eagle_topk", "must be >= 1")
        if self.speculative_num_draft_tokens is None:
            self.speculative_num_draft_tokens = steps + 1 if topk == 1 else min(steps * topk + 1, MAX_TREE_TOKENS)
        if topk == 1:
            _require(self.speculative_num_draft_tokens == steps + 1, "speculative_num_draft_tokens",
                     f"must be speculative_num_steps + 1 ({steps + 1}) for a chain of drafts (topk 1)")
        else:
            _require(self.speculative_algorithm != "NGRAM", "speculative_eagle_topk",
                     "must be 1 with NGRAM, which drafts a chain")
            candidates = topk + (steps - 1) * topk * topk
            _require(2 <= self.speculative_num_draft_tokens <= min(candidates + 1, MAX_TREE_TOKENS),
                     "speculative_num_draft_tokens", f"must be between 2 and {min(candidates + 1, MAX_TREE_TOKENS)} "
                     f"for a tree of {steps} steps of top-{topk} ({candidates} candidates and the root; at most "
                     f"{MAX_TREE_TOKENS})")
            _require(1 + (steps - 1) * topk <= MAX_TREE_TOKENS, "speculative_num_steps",
                     f"a tree's draft steps write 1 + (steps - 1) * topk tokens, at most {MAX_TREE_TOKENS}")
        _require(1 <= self.speculative_ngram_min_match_window_size <= self.speculative_ngram_max_match_window_size,
                 "speculative_ngram_min_match_window_size", "must be >= 1 and <= the max match window size")
        _require(self.ep_size in (1, self.tp_size), "ep_size", "must be 1 or --tp-size (experts spread over the "
                 "tensor-parallel ranks)")
        _require(self.speculative_algorithm is None or not self.enable_dp_attention, "speculative_algorithm",
                 "is not supported with --enable-dp-attention yet")
        self._check_parallel()
        with_model = self.speculative_algorithm in ("STANDALONE", "EAGLE", "EAGLE3")
        _require(with_model == (self.speculative_draft_model_path is not None), "speculative_draft_model_path",
                 "is required by, and only by, --speculative-algorithm STANDALONE, EAGLE and EAGLE3")

    def _check_parallel(self) -> None:
        _require(self.dp_size >= 1 and self.nnodes >= 1, "dp_size", "--dp-size and --nnodes must be >= 1")
        if self.dp_size > 1 or self.enable_dp_attention:
            _require(self.enable_dp_attention, "dp_size", "> 1 needs --enable-dp-attention (keel's data parallelism "
                     "is data-parallel attention; for independent replicas run one server per GPU)")
            _require(self.dp_size == self.tp_size and self.dp_size > 1, "enable_dp_attention",
                     f"needs --dp-size equal to --tp-size, both > 1 (got --dp-size {self.dp_size}, --tp-size "
                     f"{self.tp_size}): every rank attends over its own requests")
        _require(self.tp_size % self.nnodes == 0, "nnodes", f"must divide --tp-size {self.tp_size} (an equal share "
                 "of the ranks on each machine)")
        _require(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, {self.nnodes})")
        _require(self.nnodes == 1 or self.dist_init_addr is not None, "dist_init_addr",
                 "is required with --nnodes > 1 (node 0's host:port)")
        if self.dist_init_addr is not None:
            host, _, port = self.dist_init_addr.rpartition(":")
            _require(bool(host) and port.isdigit() and 0 < int(port) < 65536, "dist_init_addr",
                     f"must be host:port, got {self.dist_init_addr!r}")

    @property
    def num_draft_tokens(self) -> int:
        """Draft tokens the target verifies per request and step (beside the last token); 0 without speculation."""
        return 0 if self.speculative_algorithm is None else self.speculative_num_draft_tokens - 1

    @property
    def draft_tree(self) -> bool:
        """Drafts form a tree (topk > 1): verified with a tree mask, the accepted path's KV moved into place."""
        return self.speculative_algorithm is not None and self.speculative_eagle_topk > 1

    @property
    def drafter_reads_host_tokens(self) -> bool:
        """NGRAM drafts from the tokens on the host, so a request it drafts for must have none pending."""
        return self.speculative_algorithm == "NGRAM"

    @property
    def rows_per_request(self) -> int:
        """Most single-token rows a request fills in one forward: its verified tokens, or a tree's frontier."""
        return max(1 + self.num_draft_tokens, self.speculative_eagle_topk)

    @property
    def draft_reserve(self) -> int:
        """KV slots a drafted request holds past its last token during a step: one per verified draft, and (a tree)
        one per token the draft model's steps write, if those are more."""
        if not self.draft_tree:
            return self.num_draft_tokens
        return max(self.num_draft_tokens, (self.speculative_num_steps - 1) * self.speculative_eagle_topk)

    @property
    def overlap(self) -> bool:
        """Overlap scheduling: on unless disabled. A step that verifies drafts is read before the next is
        scheduled (the next depends on how many were accepted), and so is any step before one that drafts."""
        return not self.disable_overlap

    @classmethod
    def from_options(cls, model: str, **options: Any) -> "EngineConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown engine option(s) {unknown}; known options: {sorted(known)}")
        return cls(model=model, **options)


@dataclass
class ServerConfig:
    """Options of `keel serve` beyond the engine's."""

    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    served_model_name: Optional[str] = option(None, "model name clients must use (default: --model as given)")
    health_timeout: float = option(1.5, "/health fails once the engine process has sent no heartbeat for this "
                                        "many seconds (it sends one every 0.25 s, even during a long step)")
    shutdown_timeout: float = option(30.0, "on Ctrl-C / SIGTERM, seconds in-flight requests get to finish")
    api_key: Optional[str] = option(None, "require 'Authorization: Bearer KEY' on every route but /health")
    max_request_body_mb: float = option(16.0, "largest request body accepted, in MiB (read as a stream; a larger "
                                              "one is refused with 413 before it is parsed)")
    max_fanout: int = option(256, "most engine requests one HTTP request may start: prompts x n")
    max_queued_requests: int = option(
        1024, "requests accepted beyond --max-running-requests; when that many wait, new ones get 503 with "
        "Retry-After")
    timeout_keep_alive: int = option(5, "seconds an idle keep-alive connection stays open")
    timeout_header_read: float = option(10.0, "seconds a connection may take to send a request's headers")
    tool_call_parser: Optional[str] = option(
        None, "the format the model writes tool calls in, to answer chat requests with `tools`: llama3 (Llama 3.x "
        "JSON; also llama3_json) or hermes (<tool_call> tags: Hermes, Qwen 2.5, Qwen 3; also qwen25, qwen3)",
        (None, "llama3", "llama3_json", "hermes", "qwen25", "qwen3"))
    reasoning_parser: Optional[str] = option(
        None, "move the model's <think>...</think> reasoning into reasoning_content: qwen3 or deepseek-r1",
        (None, "qwen3", "deepseek-r1"))

    def __post_init__(self) -> None:
        for name in ("health_timeout", "shutdown_timeout", "max_request_body_mb", "max_fanout",
                     "timeout_keep_alive", "timeout_header_read"):
            _require(getattr(self, name) > 0, name, "must be > 0")
        _require(self.max_queued_requests >= 0, "max_queued_requests", "must be >= 0")
        _require(1 <= self.port <= 65535, "port", "must be in [1, 65535]")
        _require(bool(self.host.strip()), "host", "must not be empty")
        _require(self.api_key is None or bool(self.api_key), "api_key", "must not be empty")

    @property
    def max_request_body_bytes(self) -> int:
        return int(self.max_request_body_mb * 2**20)


@dataclass
class RouterConfig:
    """Options of `keel router` (the flags are generated from these fields)."""

    prefill: list[str] = field(default_factory=list,
                               metadata={"help": "URL of a prefill server (keel serve --disaggregation-mode prefill)"})
    decode: list[str] = field(default_factory=list,
                              metadata={"help": "URL of a decode server (keel serve --disaggregation-mode decode)"})
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8000, "port to listen on")
    request_timeout: float = option(3600.0, "seconds a whole request may take, its stream included")
    max_request_body_mb: float = option(16.0, "largest request body accepted, in MiB (413 beyond it, before it is "
                                              "read whole)")

    def __post_init__(self) -> None:
        _require(self.max_request_body_mb > 0, "max_request_body_mb", "must be > 0")
        if not self.prefill or not self.decode:
            raise ValueError("keel router needs at least one --prefill and one --decode server URL")
        for url in self.prefill + self.decode:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http:// or https:// URL")


def _require(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ValueError(f"invalid option {name}: {why}")


# ---- dataclass <-> argparse -------------------------------------------------------------


def add_dataclass_arguments(parser: argparse._ActionsContainer, cls: type, skip: tuple[str, ...] = (),
                            aliases: Optional[dict[str, tuple[str, ...]]] = None,
                            required: tuple[str, ...] = ()) -> None:
    """Add one --flag per dataclass field (snake_case -> kebab-case) with the field's help text; `aliases`: more
    flags for a field; `required`: fields with no default on this command (the flag defaults to None, and the
    command checks that it was given)."""
    hints = typing.get_type_hints(cls)
    for f in _fields(cls, skip):
        flags = ["--" + f.name.replace("_", "-"), *(aliases or {}).get(f.name, ())]
        kind, element = _flag_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata.get("help", "")
        if f.name in required:
            default = None
        if kind is bool:
            parser.add_argument(*flags, action="store_true", default=default, help=help_text)
        elif kind is list:
            # one value per use (--stop a --stop b): a list flag must not swallow the positionals after it
            parser.add_argument(*flags, action="append", type=element, default=None,
                                help=f"{help_text} (repeat the flag for several)")
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(*flags, type=kind, default=default, help=help_text,  # None: leave the flag out
                                choices=tuple(c for c in choices if c is not None) if choices else None)


def dataclass_kwargs(args: argparse.Namespace, cls: type, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields given on the command line (a list flag never used keeps the field's default)."""
    return {f.name: getattr(args, f.name) for f in _fields(cls, skip)
            if not (getattr(args, f.name) is None and f.default is dataclasses.MISSING)}


def _fields(cls: type, skip: tuple[str, ...]) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if f.name not in skip]


def _flag_type(hint: Any) -> tuple[Any, Any]:
    """(flag type, list element type) of an annotation: Optional[int] -> (int, None), list[str] -> (list, str)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        lists = [a for a in inner if typing.get_origin(a) is list]
        return _flag_type(lists[0] if lists else inner[0])
    if origin is list:
        return list, typing.get_args(hint)[0]
    return hint, None
