"""`keel bench offline`: N prompts with random input and output lengths, all at once; tokens per second."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import random
import statistics
import time
from typing import Optional

import torch

import keel
from keel.bench.common import append_result, environment, hf_model_like, measure_hbm_bandwidth, sync
from keel.bench.profile import add_profile_arguments, format_report, profile_steps
from keel.bench.prompts import random_requests
from keel.bench.roofline import StepRoofline, measure_matmul_rate
from keel.config import EngineConfig, add_dataclass_arguments, dataclass_kwargs
from keel.engine.outputs import mean_accept_length


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--input-len", type=int, nargs=2, default=(100, 1024), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(512, 512), metavar=("MIN", "MAX"))
    parser.add_argument("--seed", dest="bench_seed", type=int, default=0, help="seed of the prompts")
    parser.add_argument("--token-id-range", type=int, default=None,
                        help="prompt token ids are drawn below this (default: the model's vocabulary size)")
    parser.add_argument("--compare", choices=["hf"], default=None,
                        help="also run transformers' generate_batch on the same prompts (needs MIN == MAX output)")
    parser.add_argument("--runs", type=int, default=1,
                        help="time the work this many times and report the median run (every run's time is printed)")
    parser.add_argument("--result-file", default="bench_results.jsonl")
    add_profile_arguments(parser)
    add_dataclass_arguments(parser.add_argument_group("engine options"), EngineConfig, skip=("seed",))


def make_work(args: argparse.Namespace, vocab: int) -> tuple[list[list[int]], list[int]]:
    """The prompts `keel bench serve` sends with the same seed, lengths and --token-id-range (default: the vocabulary)."""
    work = random_requests(random.Random(args.bench_seed), args.num_prompts, args.input_len, args.output_len,
                           args.token_id_range or vocab)
    return [prompt for prompt, _ in work], [output_len for _, output_len in work]


def run(args: argparse.Namespace) -> dict:
    if args.compare == "hf" and args.output_len[0] != args.output_len[1]:
        raise ValueError("--compare hf needs one output length (transformers' generate_batch takes one max)")
    options = dataclass_kwargs(args, EngineConfig, skip=("seed",))
    baseline_tok_s = None
    if args.runs < 1:
        raise ValueError(f"--runs must be at least 1, got {args.runs}")
    if options["speculative_algorithm"] is not None:  # the same prompts without speculation, first, as many runs
        plain = {k: v for k, v in options.items() if not k.startswith("speculative_")}
        plain_engine = keel.Engine(plain.pop("model"), **plain)
        baseline_tok_s = statistics.median(_timed(plain_engine, args)[-1] for _ in range(args.runs))
        del plain_engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the baseline's KV pool goes back before the measured engine sizes its own
    engine = keel.Engine(options.pop("model"), **options)
    device = engine.core.runner.device
    roofline = StepRoofline(engine.core.runner, measure_hbm_bandwidth(device),
                            measure_matmul_rate(device, engine.core.runner.dtype))
    # every run takes the same steps (the same prompts, greedy): the roofline is summed over the first
    runs = [_timed(engine, args, roofline if i == 0 else None) for i in range(args.runs)]
    prompts, output_lens, outputs, elapsed, output_tok_s = sorted(runs, key=lambda run: run[3])[len(runs) // 2]
    run_seconds = [run[3] for run in runs]
    del runs
    input_tokens, output_tokens = sum(map(len, prompts)), sum(len(o.token_ids) for o in outputs)
    record = {**environment(device), "bench": "offline", "model": engine.config.model,
              "attention_backend": engine.core.runner.attention_backend, "num_prompts": args.num_prompts,
              "input_len": list(args.input_len), "output_len": list(args.output_len), "seconds": elapsed,
              "run_seconds": run_seconds,
              "input_tokens": input_tokens, "output_tokens": output_tokens,
              "cached_tokens": sum(o.num_cached_tokens or 0 for o in outputs),  # 0: every prompt was prefilled
              "total_tok_s": (input_tokens + output_tokens) / elapsed, "output_tok_s": output_tok_s,
              **roofline.totals.report(elapsed, roofline.hbm, roofline.matmul)}
    runs_note = f" (median of {len(run_seconds)} runs: {', '.join(f'{t:.2f}' for t in run_seconds)} s)" \
        if len(run_seconds) > 1 else ""
    print(f"keel: {args.num_prompts} prompts, {input_tokens} input + {output_tokens} output tokens in {elapsed:.1f} s"
          f"{runs_note}: {record['total_tok_s']:.0f} total tok/s, {record['output_tok_s']:.0f} output tok/s")
    print(format_roofline(record))
    if baseline_tok_s is not None:
        record.update(speculative_algorithm=engine.config.speculative_algorithm,
                      accept_length=mean_accept_length(outputs) or 1.0,
                      baseline_output_tok_s=baseline_tok_s, speedup_vs_no_speculation=output_tok_s / baseline_tok_s)
        print(f"speculative decoding: mean accept length {record['accept_length']:.2f} tokens per verify step; "
              f"without it {baseline_tok_s:.0f} output tok/s: {record['speedup_vs_no_speculation']:.2f}x")
    if args.profile is not None:  # the trace's window: the run's middle steps
        skip = max(0, roofline.totals.steps // 2 - args.profile_steps // 2)
        report = profile_steps(engine.core, lambda: engine.generate(prompts, _greedy(output_lens)), args.profile,
                               skip, args.profile_steps)
        record["profile"] = dataclasses.asdict(report)
        print(format_report(report, device.type == "cuda"))
    if args.compare == "hf":
        del outputs
        record["hf"] = time_hf(engine, prompts, output_lens[0])
        record["speedup_vs_hf"] = record["output_tok_s"] / record["hf"]["output_tok_s"]
        print(f"transformers generate_batch: {record['hf']['output_tok_s']:.0f} output tok/s; keel is "
              f"{record['speedup_vs_hf']:.1f}x faster")
    append_result(args.result_file, record)
    return record


def format_roofline(r: dict) -> str:
    return (f"roofline: {r['roofline_steps']} steps reading {r['roofline_bytes'] / 1e9:.1f} GB and computing "
            f"{r['roofline_flops'] / 1e12:.1f} TFLOP need {r['roofline_s']:.2f} s at the measured "
            f"{r['hbm_bw'] / 1e12:.2f} TB/s and {r['matmul_flops'] / 1e12:.0f} TFLOP/s: this run reached "
            f"{100 * r['roofline_fraction']:.1f}% of its roofline")


def _timed(engine: keel.Engine, args: argparse.Namespace, roofline: Optional[StepRoofline] = None
           ) -> tuple[list[list[int]], list[int], list[keel.RequestOutput], float, float]:
    """Prompts, output lengths, outputs, seconds and output tokens per second of one timed run (after warm-up);
    `roofline` sees the timed run's batches."""
    prompts, output_lens = make_work(args, engine.core.model_config.vocab_size)
    params = _greedy(output_lens)
    engine.generate(prompts[:4], params[:4])  # warm up
    engine.core.flush_cache()  # no run may reuse an earlier one's prompts from the prefix cache
    device = engine.core.runner.device
    sync(device)
    engine.core.on_schedule = roofline
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, progress=True)
    sync(device)
    elapsed = time.perf_counter() - start
    engine.core.on_schedule = None
    return prompts, output_lens, outputs, elapsed, sum(len(o.token_ids) for o in outputs) / elapsed


def _greedy(output_lens: list[int]) -> list[keel.SamplingParams]:
    return [keel.SamplingParams(temperature=0.0, max_new_tokens=n, ignore_eos=True) for n in output_lens]


def time_hf(engine: keel.Engine, prompts: list[list[int]], output_len: int) -> dict:
    from transformers import GenerationConfig

    runner = engine.core.runner
    model = hf_model_like(engine)
    generation = GenerationConfig(max_new_tokens=output_len, do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate_batch(prompts[:4], generation_config=generation)  # warm up
    sync(runner.device)
    start = time.perf_counter()
    results = model.generate_batch(prompts, generation_config=generation, progress_bar=True)
    sync(runner.device)
    elapsed = time.perf_counter() - start
    output_tokens = sum(len(r.generated_tokens) for r in results.values())
    return {"seconds": elapsed, "output_tokens": output_tokens, "output_tok_s": output_tokens / elapsed}
