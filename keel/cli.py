"""The `keel` command.

    keel serve keel-demo --port 8000                        # OpenAI-compatible server (--model works too)
    keel bench serve --url http://127.0.0.1:8000 --num-prompts 100 --request-rate 4
    keel generate --model keel-demo "Hello"                 # stream one completion
    keel generate --model llama-3.2-1b --max-new-tokens 8 "a" "b"
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import TYPE_CHECKING, Optional

from keel import __version__ as keel_version
from keel.config import EngineConfig, RouterConfig, ServerConfig, add_dataclass_arguments, dataclass_kwargs
from keel.sampling_params import SamplingParams
from keel.spec import SIMULATE_ACCEPT_ENV

if TYPE_CHECKING:  # imported lazily at run time: `keel --help` stays fast
    from keel.engine.engine import Engine
    from keel.engine.outputs import TokenLogprob

# The engine's --seed already seeds every request of a CLI run, so there is no per-request --seed.
_ENGINE_SEEDED = ("seed",)
_MODEL_ALIASES = {"model": ("--model-path",)}  # SGLang's name for --model


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="keel", description="keel: LLM inference and serving engine")
    parser.add_argument("--version", action="version", version=f"keel {keel_version}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve the OpenAI-compatible HTTP API",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # `keel serve MODEL`, as `vllm serve MODEL`; --model (and SGLang's --model-path) still work
    serve.add_argument("model_positional", nargs="?", metavar="MODEL", help="the model to serve (or --model)")
    add_dataclass_arguments(serve.add_argument_group("server options"), ServerConfig)
    add_dataclass_arguments(serve.add_argument_group("engine options"), EngineConfig, aliases=_MODEL_ALIASES,
                            required=("model",))
    gen = commands.add_parser("generate", help="generate completions for prompts",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    gen.add_argument("prompts", nargs="+", help="prompt text(s)")
    engine_opts = gen.add_argument_group("engine options")
    add_dataclass_arguments(engine_opts, EngineConfig, aliases=_MODEL_ALIASES)
    sampling_opts = gen.add_argument_group("sampling options")
    add_dataclass_arguments(sampling_opts, SamplingParams, skip=_ENGINE_SEEDED)
    gen.add_argument("--no-stream", action="store_true", help="print each completion when it is done")
    gen.add_argument("--chat", action="store_true",
                     help="send each prompt as a user message through the model's chat template; print the answer")
    router = commands.add_parser("router", help="the front of prefill/decode disaggregation: sends each request to "
                                 "a prefill and a decode server",
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_dataclass_arguments(router, RouterConfig)
    bench = commands.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    from keel.bench import capacity, kv_transfer, latency, offline, serve as bench_serve

    for name, module, what in (("serve", bench_serve, "load an OpenAI-compatible server"),
                               ("latency", latency, "prefill and decode-step time, achieved memory bandwidth"),
                               ("offline", offline, "throughput of many prompts at once"),
                               ("capacity", capacity, "how many requests of a length the KV pools hold"),
                               ("kv-transfer", kv_transfer, "KV transfer bandwidth between two servers' pools "
                                                            "(disaggregation)")):
        module.add_arguments(bench.add_parser(name, help=what, formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    for command in (serve, gen):
        command.add_argument("--log-level", default="warning", help="python logging level")
    return parser


def serve(args: argparse.Namespace) -> None:
    from keel.models.source import resolve_model
    from keel.server.engine_client import EngineClient, EngineError

    engine_config = EngineConfig(**dataclass_kwargs(args, EngineConfig))
    if engine_config.node_rank > 0:
        return run_node_ranks(engine_config)
    server_config = ServerConfig(**dataclass_kwargs(args, ServerConfig))
    if os.environ.get(SIMULATE_ACCEPT_ENV):
        raise ValueError(f"{SIMULATE_ACCEPT_ENV} is set: verification would accept draft tokens the model did not "
                         "choose; it is for `keel bench`, never for serving")
    from keel.server.listen import bind

    sock = bind(server_config)  # a busy port fails now, not after the model has loaded
    source = resolve_model(engine_config.model)  # converts a GGUF file or builds a preset once, before the engine
    client = EngineClient(engine_config)
    client.spawn()  # the engine loads the model while this process imports the web stack and the tokenizer
    try:
        from keel.server.launch import serve as run_server

        run_server(source, client, server_config, sock)
    except EngineError as e:  # one line; the engine's traceback with --log-level debug
        if e.details and logging.getLogger().isEnabledFor(logging.DEBUG):
            sys.stderr.write(e.details)
        sys.exit(f"keel: error: {e}")
    finally:
        client.stop_if_unstarted()


def generate(args: argparse.Namespace) -> None:
    from keel.engine.engine import Engine

    params = SamplingParams(**dataclass_kwargs(args, SamplingParams, skip=_ENGINE_SEEDED))  # fail before loading
    options = dataclass_kwargs(args, EngineConfig)
    if options["node_rank"] > 0:
        return run_node_ranks(EngineConfig(**options))
    started = time.perf_counter()
    sys.stderr.write(f"keel: loading {options['model']}\n")  # loading takes seconds: say so at once
    sys.stderr.flush()
    engine = Engine(options.pop("model"), **options)
    sys.stderr.write(f"keel: loaded in {time.perf_counter() - started:.1f} s\n")
    inputs = [chat_ids(engine, p) for p in args.prompts] if args.chat else args.prompts
    echoed = [""] * len(args.prompts) if args.chat else args.prompts  # a chat answer is printed alone
    if len(args.prompts) == 1 and not args.no_stream and not params.wants_logprobs:
        stream = engine.stream(inputs[0], params)
        first = next(stream, "")  # a request the engine refuses fails here, before the prompt is echoed
        sys.stdout.write(echoed[0] + first)
        for delta in stream:
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return
    for prompt, out in zip(echoed, engine.generate(inputs, params)):
        print(f"--- [{out.finish_reason}, {len(out.token_ids)} tokens]\n{prompt}{out.text}")
        if out.logprobs:
            print(format_logprobs(engine, out.logprobs))


def format_logprobs(engine: Engine, logprobs: list[TokenLogprob]) -> str:
    """One line per generated token: the token, its log-prob, and the top alternatives asked for."""
    def token(token_id: int) -> str:
        return repr(engine.tokenizer.decode([token_id]))

    lines = ["log-probs:"]
    for lp in logprobs:
        top = ", ".join(f"{token(t)} {v:.4f}" for t, v in lp.top)
        lines.append(f"  {token(lp.token_id)} {lp.logprob:.4f}" + (f"  (top: {top})" if top else ""))
    return "\n".join(lines)


def run_node_ranks(config: EngineConfig) -> None:
    """--node-rank > 0: this machine runs its share of the ranks for node 0's engine, until that engine stops."""
    from keel.distributed.ranks import ranks_per_node, run_node
    from keel.models.source import resolve_model

    resolve_model(config.model)  # converts a GGUF file or builds a preset once, before the ranks load it
    first = config.node_rank * ranks_per_node(config)
    print(f"keel: node {config.node_rank} of {config.nnodes} runs ranks {first}..{first + ranks_per_node(config) - 1} "
          f"for the engine at {config.dist_init_addr}", flush=True)
    run_node(config)


def _served_model(parser: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The model `keel serve` was given: positionally or as --model / --model-path (once); there is no default."""
    given = [m for m in (args.model_positional, args.model) if m is not None]
    if not given:
        parser.error("keel serve needs a model: keel serve MODEL (a preset name, keel-demo, a Hugging Face "
                     "directory or a GGUF file)")
    if len(given) == 2 and given[0] != given[1]:
        parser.error(f"two models given: {given[0]!r} and --model {given[1]!r}")
    return given[0]


def chat_ids(engine: Engine, prompt: str) -> list[int]:
    """`prompt` as one user message through the model's chat template (which adds any BOS itself)."""
    tokenizer = engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"--chat: model {engine.config.model!r} has no chat template")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def main(argv: Optional[list[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        args.model = _served_model(parser, args)
    logging.basicConfig(level=getattr(args, "log_level", "warning").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "generate":
            generate(args)
        elif args.command == "serve":
            serve(args)
        elif args.command == "router":
            from keel.disagg.router import serve_router

            serve_router(RouterConfig(**dataclass_kwargs(args, RouterConfig)))
        elif args.command == "bench":
            from keel.bench import capacity, kv_transfer, latency, offline, serve as bench_serve

            if args.bench == "serve":
                bench_serve.run(bench_serve.config_from_args(args))
            else:
                {"latency": latency, "offline": offline, "capacity": capacity,
                 "kv-transfer": kv_transfer}[args.bench].run(args)
    except ValueError as e:
        sys.exit(f"keel: error: {e}")


if __name__ == "__main__":
    main()
