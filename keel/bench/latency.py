"""`keel bench latency`: prefill time, decode-step time and achieved memory bandwidth per (batch, input length).

A decode step is timed two ways: the whole engine step (the wall time between successive steps of
the engine loop, scheduling and bookkeeping included, overlapped with the device as configured;
the headline figure), and the runner alone (forward + sampling between synchronizations, as
SGLang's bench_one_batch times it). Achieved bandwidth = (weight bytes + KV bytes read in the
step) / step time, against the HBM bandwidth measured in the same run.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import time

import torch

import keel
from keel.bench.common import (append_result, environment, hf_model_like, measure_hbm_bandwidth, median_time,
                               sync, weight_bytes_read_per_step)
from keel.bench.profile import add_profile_arguments, format_report, profile_steps
from keel.bench.roofline import measure_matmul_rate, prefill_flops
from keel.cache.kv_pool import KVPool
from keel.config import EngineConfig, add_dataclass_arguments, dataclass_kwargs
from keel.models.loader import load_model_config
from keel.models.source import resolve_model
from keel.runner.forward_batch import ForwardMode
from keel.scheduler.batch import build_forward_batch, build_sampling_batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--input-lens", type=int, nargs="+", default=[128])
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3, help="repeat each case; the median run is reported")
    parser.add_argument("--prefill", choices=["batch", "engine"], default="batch",
                        help="batch: the whole batch in one unchunked step (on a hybrid pool one request per step, "
                        "since a step needs window KV for all of its tokens); engine: as the engine schedules it "
                        "(--chunked-prefill-size, --max-prefill-tokens)")
    parser.add_argument("--compare", choices=["hf"], default=None,
                        help="also time transformers (static cache) on the same batch-1 cases")
    parser.add_argument("--result-file", default="bench_results.jsonl")
    add_profile_arguments(parser)
    add_dataclass_arguments(parser.add_argument_group("engine options"), EngineConfig)


def run(args: argparse.Namespace) -> list[dict]:
    options = dataclass_kwargs(args, EngineConfig)
    largest = max(args.batch_sizes) * (max(args.input_lens) + args.output_len)
    options.update(max_running_requests=max(options["max_running_requests"], max(args.batch_sizes)),
                   kv_cache_tokens=options["kv_cache_tokens"] or largest + 4096)
    if args.prefill == "batch":
        windows = load_model_config(resolve_model(options["model"])).sliding_windows
        hybrid = any(w is not None for w in windows) and not options["disable_hybrid_swa_memory"]
        options.update(chunked_prefill_size=None, max_prefill_tokens=max(args.input_lens) if hybrid
                       else max(options["max_prefill_tokens"], largest))
    baseline = None
    if options["speculative_algorithm"] is not None:  # the same cases without speculation, first
        plain = {k: v for k, v in options.items() if not k.startswith("speculative_")}
        baseline = time_decoding(keel.Engine(plain.pop("model"), **plain), args)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the baseline's KV pool goes back before the measured engine sizes its own
    engine = keel.Engine(options.pop("model"), **options)
    results = run_speculative(engine, args, baseline) if baseline is not None else time_cases(engine, args)
    if args.profile is not None:  # the first case once more; the trace skips its prefill step and the first decode
        bs, input_len = args.batch_sizes[0], args.input_lens[0]
        report = profile_steps(engine.core, lambda: time_engine(engine, bs, input_len, args.output_len), args.profile,
                               2, args.profile_steps)
        print(format_report(report, engine.core.runner.device.type == "cuda"))
    return results


def time_cases(engine: keel.Engine, args: argparse.Namespace) -> list[dict]:
    runner = engine.core.runner
    hbm = measure_hbm_bandwidth(runner.device)
    matmul = measure_matmul_rate(runner.device, runner.dtype)
    results = []
    for bs in args.batch_sizes:
        for input_len in args.input_lens:
            runs = [time_case(engine, bs, input_len, args.output_len) for _ in range(args.runs)]
            record = summarize(engine, runs, bs, input_len, args.output_len, hbm)
            flops = prefill_flops(runner, bs, input_len)
            record.update(prefill_flops=flops, matmul_flops=matmul,
                          prefill_matmul_fraction=flops / record["prefill_s"] / matmul)
            if args.compare == "hf" and bs == 1:
                record["hf"] = time_hf(engine, input_len, args.output_len, hbm, record["bytes_per_step"])
                record["speedup_vs_hf"] = record["hf"]["decode_step_s"] / record["decode_step_s"]
            append_result(args.result_file, record)
            results.append(record)
            print(format_record(record))
    return results


def time_decoding(engine: keel.Engine, args: argparse.Namespace) -> dict[tuple[int, int], dict]:
    """Per (batch size, input length): the median run of the engine alone (`time_engine`)."""
    cases = {}
    for bs in args.batch_sizes:
        for input_len in args.input_lens:
            runs = [time_engine(engine, bs, input_len, args.output_len) for _ in range(args.runs)]
            cases[bs, input_len] = sorted(runs, key=lambda r: r["decode_s"])[len(runs) // 2]
    return cases


def run_speculative(engine: keel.Engine, args: argparse.Namespace, baseline: dict[tuple[int, int], dict]) -> list[dict]:
    """A speculative step emits a varying number of tokens, so the figure is decode time per output token, against
    the same cases without speculation measured in this run; with the mean accept length."""
    results = []
    for (bs, input_len), ours in time_decoding(engine, args).items():
        plain = baseline[bs, input_len]
        tokens = bs * (args.output_len - 1)  # decoded after the prefill's first token
        record = {**environment(engine.core.runner.device), "bench": "latency", "model": engine.config.model,
                  "speculative_algorithm": engine.config.speculative_algorithm, "batch_size": bs,
                  "input_len": input_len, "output_len": args.output_len, "runs": args.runs,
                  "prefill_s": ours["prefill_s"], "decode_s_per_token": ours["decode_s"] / tokens,
                  "decode_tok_s": tokens / ours["decode_s"], "accept_length": ours["accept_length"],
                  "baseline_decode_tok_s": tokens / plain["decode_s"],
                  "speedup_vs_no_speculation": plain["decode_s"] / ours["decode_s"]}
        append_result(args.result_file, record)
        results.append(record)
        print(f"{record['model']} {record['speculative_algorithm']} bs={bs} in={input_len} out={args.output_len}: "
              f"{record['decode_tok_s']:.0f} decode tok/s, accept length {record['accept_length']:.2f}; without "
              f"speculation {record['baseline_decode_tok_s']:.0f} tok/s: {record['speedup_vs_no_speculation']:.2f}x")
    return results


def time_case(engine: keel.Engine, bs: int, input_len: int, output_len: int) -> dict:
    """The case twice: as the engine runs it (step after step, overlap as configured), and with the runner
    alone timed step by step (forward + sampling, synchronized; scheduling excluded). With several ranks only the
    engine runs it (the other ranks follow the engine's steps, not a runner driven by hand)."""
    engine_run = time_engine(engine, bs, input_len, output_len)
    if engine.config.tp_size > 1:
        return {**engine_run, "runner_step_s": None}
    return {**engine_run, **time_runner(engine, bs, input_len, output_len)}


def add_requests(engine: keel.Engine, bs: int, input_len: int, output_len: int) -> None:
    core = engine.core
    rng = random.Random(bs * 1000 + input_len)
    params = keel.SamplingParams(temperature=0.0, max_new_tokens=output_len, ignore_eos=True)
    for _ in range(bs):
        core.add_request([rng.randrange(core.model_config.vocab_size) for _ in range(input_len)], params)


def time_engine(engine: keel.Engine, bs: int, input_len: int, output_len: int) -> dict:
    """Prefill (the steps until every request has its first token, synchronized), then the wall time between
    successive engine steps (their median, and all of them), and the mean accept length where steps verified
    drafts."""
    core, device = engine.core, engine.core.runner.device
    add_requests(engine, bs, input_len, output_len)
    sync(device)
    start = time.perf_counter()
    core.step()
    while core.scheduler.waiting or core.scheduler.chunked is not None:
        core.step()
    sync(device)
    prefill = time.perf_counter() - start
    intervals = []
    verified = accepted = 0
    last = time.perf_counter()
    while core.has_work:
        for out in core.step():
            verified += bool(out.num_draft_tokens)
            accepted += out.num_accepted_tokens
        now = time.perf_counter()
        intervals.append(now - last)
        last = now
    core.flush_cache()
    return {"prefill_s": prefill, "engine_step_s": statistics.median(intervals), "decode_s": sum(intervals),
            "accept_length": 1 + accepted / verified if verified else 1.0}


def time_runner(engine: keel.Engine, bs: int, input_len: int, output_len: int) -> dict:
    """Each decode step's forward + sampling alone, between device synchronizations."""
    core, runner = engine.core, engine.core.runner
    vocab = core.model_config.vocab_size
    add_requests(engine, bs, input_len, output_len)
    times = []
    while core.scheduler.has_work:
        batch = core.scheduler.schedule()
        forward_batch = build_forward_batch(batch, runner.device)
        sampled = [p.req for p in batch.sampled]  # none in a prefill chunk that does not end its prompt
        sampling = build_sampling_batch(sampled, vocab, runner.device) if sampled else None
        sync(runner.device)
        start = time.perf_counter()
        logits = runner.forward(forward_batch)
        token_ids = runner.sample(logits, sampling).token_ids.tolist() if sampling is not None else []
        if batch.mode == ForwardMode.DECODE and len(batch.parts) == bs:
            times.append(time.perf_counter() - start)
        core.scheduler.launched(batch)
        core.scheduler.process(batch, [[t] for t in token_ids])
    core.flush_cache()
    if not times:
        raise ValueError(f"no decode step ran all {bs} requests (the first finished before the last was prefilled, "
                         "one per step on a hybrid pool): raise --output-len")
    return {"runner_step_s": statistics.median(times)}


def kv_bytes_per_step(runner, bs: int, input_len: int, output_len: int) -> float:
    """The KV a decode step reads on this rank, averaged over the case's decode steps: every request's tokens so
    far in each layer (a sliding-window layer only its window), of the KV heads this rank holds."""
    layer_bytes = KVPool.bytes_per_token(1, runner.num_kv_heads, runner.model_config.head_dim, runner.dtype)
    windows = runner.model_config.sliding_windows
    steps = range(input_len + 1, input_len + output_len)  # KV length of each decode step
    return bs * layer_bytes * statistics.mean(sum(min(n, w or n) for w in windows) for n in steps)


def summarize(engine: keel.Engine, runs: list[dict], bs: int, input_len: int, output_len: int, hbm: float) -> dict:
    """The median run (by engine step time), with the median prefill of all runs (a first run's compile does
    not show as its prefill); bandwidth figures for the engine step and the runner alone."""
    runner = engine.core.runner
    run = sorted(runs, key=lambda r: r["engine_step_s"])[len(runs) // 2]
    step_bytes = weight_bytes_read_per_step(runner.model, bs) + kv_bytes_per_step(runner, bs, input_len, output_len)
    step = run["engine_step_s"]
    runner_step = run["runner_step_s"]
    return {**environment(runner.device), "bench": "latency", "model": engine.config.model,
            "hybrid_kv": engine.core.kv_cache.swa is not None, "attention_backend": runner.attention_backend,
            "cuda_graph": runner.cuda_graph is not None, "tp_size": engine.config.tp_size,
            "ep_size": engine.config.ep_size,
            "overlap": engine.core.overlap, "dtype": str(runner.dtype), "batch_size": bs, "input_len": input_len,
            "output_len": output_len, "runs": len(runs), "prefill_s": statistics.median(r["prefill_s"] for r in runs),
            "decode_step_s": step,
            "runner_step_s": runner_step, "decode_tok_s": bs / step, "bytes_per_step": step_bytes,
            "achieved_bw": step_bytes / step, "hbm_bw": hbm, "bw_fraction": step_bytes / step / hbm,
            "runner_bw_fraction": step_bytes / runner_step / hbm if runner_step else None,
            "roofline_step_s": step_bytes / hbm,
            "step_over_roofline": step * hbm / step_bytes}


def time_hf(engine: keel.Engine, input_len: int, output_len: int, hbm: float, step_bytes: float) -> dict:
    """transformers' generate with a static cache, batch 1, on a model of the same shape (random weights)."""
    device = engine.core.runner.device
    model = hf_model_like(engine)
    ids = torch.randint(0, model.config.vocab_size, (1, input_len), device=device)

    def generate(new_tokens: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, cache_implementation="static", pad_token_id=0)

    def timed(new_tokens: int) -> float:
        return median_time(lambda: generate(new_tokens), device, repeats=3, warmup=0)

    generate(4)  # warm up
    prefill = timed(1)
    step = (timed(output_len) - prefill) / (output_len - 1)
    del model
    torch.cuda.empty_cache()
    return {"prefill_s": prefill, "decode_step_s": step, "bw_fraction": step_bytes / step / hbm}


def format_record(r: dict) -> str:
    prefill = (f" = {100 * r['prefill_matmul_fraction']:.1f}% of the measured {r['matmul_flops'] / 1e12:.0f} "
               "TFLOP/s" if "prefill_matmul_fraction" in r else "")
    line = (f"{r['model']} bs={r['batch_size']} in={r['input_len']} out={r['output_len']}: prefill "
            f"{1e3 * r['prefill_s']:.1f} ms{prefill}, decode step {1e3 * r['decode_step_s']:.3f} ms, "
            f"{r['decode_tok_s']:.0f} tok/s, {r['achieved_bw'] / 1e12:.2f} TB/s = {100 * r['bw_fraction']:.1f}% of "
            f"measured HBM {r['hbm_bw'] / 1e12:.2f} TB/s; {r['step_over_roofline']:.2f}x roofline (")
    if r["runner_step_s"] is not None:
        line += f"runner alone {1e3 * r['runner_step_s']:.3f} ms = {100 * r['runner_bw_fraction']:.1f}%; "
    line += f"tp {r['tp_size']}, overlap {'on' if r['overlap'] else 'off'})"
    if "hf" in r:
        line += (f"\n  transformers (static cache): decode step {1e3 * r['hf']['decode_step_s']:.3f} ms = "
                 f"{100 * r['hf']['bw_fraction']:.1f}% of HBM; keel is {r['speedup_vs_hf']:.2f}x faster")
    return line
