"""`keel bench serve`: an open-loop load against any OpenAI-compatible server.

Requests arrive as a Poisson process at --request-rate (inf: all at once), optionally capped at
--max-concurrency in flight; each streams a /v1/completions request with a prompt of random
token ids (lengths drawn from --input-len), or the prompts of a --dataset file, and max_tokens from
--output-len with ignore_eos, so the work is the same on every server that honours ignore_eos (keel, vLLM,
SGLang). Reports throughput, time to first token, inter-token latency and end-to-end latency; with several
--request-rates, one run per rate and a plot of throughput against latency (--plot).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

import aiohttp

from keel.bench.prompts import random_requests


@dataclass
class BenchServeConfig:
    url: str
    num_prompts: int
    request_rate: float
    max_concurrency: Optional[int]
    input_len: tuple[int, int]
    output_len: tuple[int, int]
    model: Optional[str]
    seed: int
    token_id_range: int  # prompt token ids are drawn from [0, token_id_range)
    output_json: Optional[str]
    dataset: Optional[str] = None  # JSON lines: {"prompt": text, "output_len": n (optional)}
    request_rates: tuple[float, ...] = ()  # several runs, one per rate (request_rate is then unused)
    plot: Optional[str] = None  # PNG of throughput against latency over request_rates


@dataclass
class RequestResult:
    ok: bool
    input_len: int
    output_tokens: int = 0
    ttft: float = 0.0
    itls: list[float] = field(default_factory=list)
    latency: float = 0.0
    error: str = ""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="server base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--num-prompts", type=int, default=200)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (Poisson); inf: all at once")
    parser.add_argument("--request-rates", type=float, nargs="+", default=(), metavar="RATE",
                        help="one run per rate (requests/s), reported side by side")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="with --request-rates: draw output throughput against TTFT and ITL here")
    parser.add_argument("--dataset", default=None, metavar="JSONL",
                        help='prompts, one JSON object per line: {"prompt": "...", "output_len": 128}; output_len '
                             "is optional (default: drawn from --output-len)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    parser.add_argument("--input-len", type=int, nargs=2, default=(128, 512), metavar=("MIN", "MAX"),
                        help="prompt lengths, uniform in [MIN, MAX] tokens")
    parser.add_argument("--output-len", type=int, nargs=2, default=(64, 256), metavar=("MIN", "MAX"),
                        help="output lengths, uniform in [MIN, MAX] tokens (ignore_eos)")
    parser.add_argument("--model", default=None, help="model name (default: the server's first model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--token-id-range", type=int, default=256,
                        help="prompt token ids are drawn below this (keep it inside the model's vocabulary)")
    parser.add_argument("--output-json", default=None, help="also write the results to this file")


def config_from_args(args: argparse.Namespace) -> BenchServeConfig:
    if args.plot and len(args.request_rates) < 2:
        raise ValueError("--plot draws one point per rate: give --request-rates with two or more rates")
    return BenchServeConfig(args.url.rstrip("/"), args.num_prompts, args.request_rate, args.max_concurrency,
                            tuple(args.input_len), tuple(args.output_len), args.model, args.seed,
                            args.token_id_range, args.output_json, args.dataset, tuple(args.request_rates),
                            args.plot)


def run(config: BenchServeConfig) -> dict:
    """One run (--request-rate), or one per --request-rates; the summary, or {"rates": summaries}."""
    summaries = []
    for rate in config.request_rates or (config.request_rate,):
        one = dataclasses.replace(config, request_rate=rate)
        results, duration = asyncio.run(_run(one))
        summaries.append(summarize(one, results, duration))
        if config.request_rates:
            print(f"--- request rate {rate:g}/s")
        print(format_summary(summaries[-1]))
    report = summaries[0] if not config.request_rates else {"rates": summaries}
    if config.output_json:
        with open(config.output_json, "w") as f:
            json.dump(report, f, indent=2)
    if config.plot:
        plot(summaries, config.plot)
    return report


def plot(summaries: list[dict], path: str) -> None:
    """Output throughput against median and p99 TTFT and ITL, one point per request rate."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install matplotlib (or keel-llm[bench])") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    throughput = [s["output_throughput"] for s in summaries]
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "ttft_s", "time to first token"), (axes[1], "itl_s", "inter-token latency")):
        for stat, style in (("median", "o-"), ("p99", "s--")):
            ax.plot(throughput, [1e3 * s[key][stat] for s in summaries], style, label=stat)
        for s, x in zip(summaries, throughput):
            ax.annotate(f"{s['config']['request_rate']}/s", (x, 1e3 * s[key]["median"]), fontsize=7)
        ax.set(xlabel="output throughput (tok/s)", ylabel="ms", title=title)
        ax.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def make_work(config: BenchServeConfig, rng: random.Random) -> list[tuple[Union[str, list[int]], int]]:
    """(prompt, output length) per request: the dataset's prompts in order (cycled), or random token ids."""
    if config.dataset is None:
        return random_requests(rng, config.num_prompts, config.input_len, config.output_len,  # type: ignore[return-value]
                               config.token_id_range)
    with open(config.dataset, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows or not all(isinstance(r, dict) and isinstance(r.get("prompt"), str) for r in rows):
        raise ValueError(f"{config.dataset}: each line must be a JSON object with a string 'prompt'")
    picked = [rows[i % len(rows)] for i in range(config.num_prompts)]
    return [(r["prompt"], int(r.get("output_len") or rng.randint(*config.output_len))) for r in picked]


async def _run(config: BenchServeConfig) -> tuple[list[RequestResult], float]:
    rng = random.Random(config.seed)
    work = make_work(config, rng)
    # aiohttp, as SGLang's and vLLM's serving benchmarks use: httpx spent ~3x the CPU per streamed chunk, enough
    # to make a one-process client the bottleneck at thousands of tokens/s (TCP_NODELAY is aiohttp's default)
    connector = aiohttp.TCPConnector(limit=config.max_concurrency or config.num_prompts)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                     read_bufsize=2 ** 20) as client:
        async with client.get(f"{config.url}/v1/models") as models:
            model = config.model or (await models.json())["data"][0]["id"]
        gate = asyncio.Semaphore(config.max_concurrency or config.num_prompts)
        start = time.perf_counter()
        tasks = []
        for prompt, output_len in work:
            tasks.append(asyncio.create_task(_limited(gate, client, config.url, model, prompt, output_len)))
            if config.request_rate != math.inf:
                await asyncio.sleep(rng.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


async def _limited(gate: asyncio.Semaphore, client: aiohttp.ClientSession, url: str, model: str,
                   prompt: Union[str, list[int]], output_len: int) -> RequestResult:
    async with gate:
        return await _one_request(client, url, model, prompt, output_len)


async def _one_request(client: aiohttp.ClientSession, url: str, model: str, prompt: Union[str, list[int]],
                       output_len: int) -> RequestResult:
    # continuous_usage_stats (vLLM's, keel's): every chunk counts the tokens so far, so a chunk whose tokens
    # decode to no text (dummy weights, a partial character) still times a token; elsewhere text chunks do
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    result = RequestResult(ok=False, input_len=len(prompt) if isinstance(prompt, list) else 0)
    start = last = time.perf_counter()
    try:
        async with client.post(f"{url}/v1/completions", json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read()).decode()[:200]}"
                return result
            seen = 0  # tokens (or, without usage in chunks, text chunks) received so far
            async for raw in response.content:
                line = raw.rstrip(b"\r\n")
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if "error" in chunk:
                    result.error = f"error event: {chunk['error'].get('message', chunk['error'])}"
                    return result
                usage = chunk.get("usage") or {}
                counted = usage.get("completion_tokens")
                if counted is not None:
                    result.output_tokens = counted
                result.input_len = usage.get("prompt_tokens", result.input_len)  # a text prompt's, in tokens
                if not chunk.get("choices"):
                    continue
                carried = counted if counted is not None else seen + bool(chunk["choices"][0].get("text"))
                if carried > seen:
                    if seen == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    seen, last = carried, now
        result.latency = time.perf_counter() - start
        if seen == 0:
            result.error = "the stream carried no token"
            return result
        result.ok = True
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        result.error = repr(e)
    return result


def _stats(values: list[float]) -> dict[str, float]:
    """Mean, median and the 90th and 99th percentiles (nearest rank)."""
    if not values:
        return {"mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    return {"mean": statistics.fmean(ordered), "median": statistics.median(ordered), "p90": rank(0.9),
            "p99": rank(0.99)}


def summarize(config: BenchServeConfig, results: list[RequestResult], duration: float) -> dict:
    done = [r for r in results if r.ok]
    input_tokens = sum(r.input_len for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "config": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v) for k, v in asdict(config).items()},
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "input_throughput": input_tokens / duration,
        "output_throughput": output_tokens / duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "ttft_s": _stats([r.ttft for r in done]),
        "itl_s": _stats([itl for r in done for itl in r.itls]),
        "e2e_latency_s": _stats([r.latency for r in done]),
    }


def format_summary(s: dict) -> str:
    lines = [
        f"{'completed / failed':<28}{s['completed']} / {s['failed']}",
        f"{'duration (s)':<28}{s['duration_s']:.2f}",
        f"{'request throughput (req/s)':<28}{s['request_throughput']:.2f}",
        f"{'input throughput (tok/s)':<28}{s['input_throughput']:.1f}",
        f"{'output throughput (tok/s)':<28}{s['output_throughput']:.1f}",
    ]
    for key, label in (("ttft_s", "TTFT"), ("itl_s", "ITL"), ("e2e_latency_s", "end-to-end latency")):
        stats = s[key]
        lines.append(f"{label + ' (ms)':<28}mean {1e3 * stats['mean']:.1f}  median {1e3 * stats['median']:.1f}  "
                     f"p90 {1e3 * stats['p90']:.1f}  p99 {1e3 * stats['p99']:.1f}")
    lines += [f"error: {e}" for e in s["errors"]]
    return "\n".join(lines)
