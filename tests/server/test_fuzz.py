"""Acceptance fuzz test: thousands of mutated requests against one real `keel serve`.

Starts from valid bodies of the three POST routes (/v1/completions with a text prompt, a list of prompts and
token-id prompts; /v1/chat/completions with string and text-part content; /generate with text and with
input_ids and sampling_params; streaming and not, n > 1, logprobs, echo, stop strings, seeds), and applies
1-3 mutations to each:
- a field's type changed (int, str, bool, float, list, dict, null), a field deleted, unknown or known fields
  added anywhere (including inside sampling_params and messages), duplicate keys;
- out-of-range numbers: negative, 0, 2**31, 2**63, 2**64, -2**63, 10**30, a 5000-digit integer, 1e308,
  1e-320, 1E400, floats where ints are expected, raw `NaN` / `Infinity` / `-Infinity` literals;
- Unicode edge cases in any string: lone surrogates written as raw JSON escapes, emoji and ZWJ sequences, RTL
  overrides, zero-width characters, NUL, control characters, combining marks, noncharacters, template
  and special-token look-alikes, SSE look-alikes, and strings of up to ~100 KB; other roles, content-part
  types and model names;
- empty strings/lists/objects, lists and objects nested 50-300 deep, huge lists (10k stop strings,
  100k token ids, 10k prompts or messages);
- raw bodies: invalid UTF-8 inside strings, truncated JSON, trailing garbage, a BOM, UTF-16, non-JSON
  bodies, bodies over the 16 MiB limit; wrong or missing content types, chunked uploads, odd headers
  (Expect: 100-continue, Content-Encoding: gzip, a 4 KB header);
- routes: a body sent to another route, GET on a POST route, an unknown route, /abort of odd ids.

Every response must be a 200 (strict JSON, or an SSE stream whose every `data:` line is strict JSON or
`[DONE]`, ending with `data: [DONE]`, and carrying no engine error), or a 4xx whose body is exactly
OpenAI's error object, or a 503 capacity refusal with Retry-After. Afterwards the server is healthy, its
engine process is the one it started with, its log has no traceback, and once idle every KV page is free
or in the evictable prefix cache.

KEEL_FUZZ_SEED picks the seed (a failure names the seed and the case index: `build_case(seed, index)`
rebuilds that request) and KEEL_FUZZ_REQUESTS the number of requests.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import httpx

from tests.server.conftest import Server, start_server, stop_server

SEED = int(os.environ.get("KEEL_FUZZ_SEED", "20250611"))
REQUESTS = int(os.environ.get("KEEL_FUZZ_REQUESTS", "2000"))
CONCURRENCY = 16
TIMEOUT_S = 60
MODEL = "keel-demo"
BODY_LIMIT = 16 * 2**20  # keel serve's default --max-request-body-mb
ERROR_KEYS = {"message", "type", "param", "code"}


# ---- JSON with the values Python's json cannot write ---------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Already-serialized JSON text, written as is: lone-surrogate escapes, NaN, 1E400, huge integers."""

    text: str


@dataclass(frozen=True)
class Dup:
    """An object written with the given (possibly repeated) keys."""

    pairs: tuple[tuple[str, Any], ...]


def dump(value: Any) -> str:
    if isinstance(value, (list, dict)):
        try:  # the C encoder, unless a Raw or Dup is inside (it raises TypeError on those)
            return json.dumps(value, ensure_ascii=False)
        except TypeError:
            pass
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Dup):
        return "{" + ", ".join(f"{json.dumps(k)}: {dump(v)}" for k, v in value.pairs) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {dump(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(dump(v) for v in value) + "]"
    # Strings go out as UTF-8 (not \u escapes), so the server's decoder sees the real bytes.
    return json.dumps(value, ensure_ascii=False)


def raw_string(*parts: str) -> Raw:
    """A JSON string of `parts`, where a part starting with a backslash is an escape written verbatim."""
    return Raw('"' + "".join(p if p.startswith("\\") else json.dumps(p, ensure_ascii=False)[1:-1]
                             for p in parts) + '"')


# ---- valid requests to start from ------------------------------------------------------------------------


def templates() -> list[tuple[str, dict]]:
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " you"}],
              "name": "fuzz"}]
    return [
        ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}),
        ("/v1/completions", {"model": MODEL, "prompt": ["The cat", "A dog sat"], "max_tokens": 3, "n": 2,
                             "temperature": 0.8, "seed": 7, "stop": ["\n", " the"]}),
        ("/v1/completions", {"model": MODEL, "prompt": [[256, 72, 105], [256, 65]], "max_tokens": 3,
                             "logprobs": 2, "echo": True}),
        ("/v1/completions", {"model": MODEL, "prompt": [256, 72, 105], "max_tokens": 4, "stream": True,
                             "stream_options": {"include_usage": True}, "logprobs": 1}),
        ("/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "stream": True, "echo": True,
                             "stop": "l", "top_k": 5, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1,
                             "frequency_penalty": 0.5, "presence_penalty": -0.5, "ignore_eos": True,
                             "user": "fuzz"}),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat, "max_tokens": 4}),
        ("/v1/chat/completions", {"model": MODEL, "messages": parts, "max_completion_tokens": 3, "stream": True,
                                  "n": 2, "logprobs": True, "top_logprobs": 2, "seed": 3,
                                  "stream_options": {"include_usage": True}}),
        ("/v1/chat/completions", {"model": MODEL, "messages": chat, "max_tokens": 3, "temperature": 0,
                                  "stop": ["."], "tools": []}),
        ("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4, "temperature": 0}}),
        ("/generate", {"input_ids": [256, 72, 105], "stream": True,
                       "sampling_params": {"max_new_tokens": 3, "top_k": 3, "stop_token_ids": [10],
                                           "logprobs": True, "top_logprobs": 2, "prompt_logprobs": 1,
                                           "seed": 5, "stop": ["x"]}}),
    ]


# Fields of every route and of SamplingParams: "known" fields to add where they do not belong.
KNOWN_FIELDS = ["model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                "top_k", "min_p", "n", "stop", "seed", "frequency_penalty", "presence_penalty",
                "repetition_penalty", "ignore_eos", "stream", "stream_options", "include_usage", "user", "echo",
                "logprobs", "top_logprobs", "tools", "text", "input_ids", "sampling_params", "max_new_tokens",
                "stop_token_ids", "prompt_logprobs", "role", "content", "name", "type", "tool_choice",
                "response_format", "logit_bias", "suffix", "best_of"]

ROUTES = ["/v1/completions", "/v1/chat/completions", "/generate"]


# ---- values ----------------------------------------------------------------------------------------------


def numbers() -> list[Any]:
    return [0, -1, 1, 2, 5, 64, 65, 128, 129, 256, 258, 259, 1024, 2**31 - 1, 2**31, 2**32, 2**53 + 1,
            2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30, -10**30, 1e308, -1e308, 1e-320,
            5e-324, -0.0, 0.5, 1.0, 2.5, 3.0, 1e5, 0.999999, 100.0, 100.5, Raw("1E400"), Raw("-1e400"),
            Raw("1.0e-400"), Raw("-0"), Raw("9" * 5000), Raw("1" + "0" * 400), Raw("NaN"), Raw("Infinity"),
            Raw("-Infinity")]


WEIRD_STRINGS = [
    "", " ", "\u0000", "a\u0000b", "\x01\x1f\x7f", "\n", "\r\n", "\t",
    "😀", "👨‍👩‍👧‍👦", "🇺🇳", "\U0010ffff", "\uffff\ufffe", "\ufffd",
    "مرحبا بالعالم", "\u202eabc\u202c", "\u200b\u200c\u200d\ufeff", "e" + "\u0301" * 50,
    "Z\u0324\u0354\u0367a\u0308\u0356lg\u0317o\u0319",
    "日本語", "\u00e9", "e\u0301", "<s>", "</s>", "<pad>", "<|assistant|>\n", "<|user|>", "{{ 7*7 }}",
    "{% for x in range(10**9) %}", "data: [DONE]\n\n", "\ndata: {\"x\": 1}\n\n", "keel-demo ", "KEEL-DEMO",
    "null", "true", "0", "-1", "NaN", "\\u0000", "\\ud800", "'; DROP TABLE x;--", "%s%n%x", "../../etc/passwd",
]

SURROGATE_ESCAPES = ["\\ud800", "\\udfff", "\\udc00\\ud800", "\\ud83d", "\\ude00", "\\ud83d\\ude00",
                     "\\u0000", "\\uFFFF", "\\uDBFF\\uDFFF"]


def weird_string(rng: random.Random) -> Any:
    kind = rng.random()
    if kind < 0.25:  # a lone (or valid) surrogate escape inside ordinary text
        return raw_string(rng.choice(["", "ab", "Hi "]), rng.choice(SURROGATE_ESCAPES), rng.choice(["", "cd"]))
    if kind < 0.35:  # long: up to ~100 KB of text, in characters of 1-4 UTF-8 bytes
        unit = rng.choice(["a", "é", "日", "😀", "\u0301", "ab\n"])
        return unit * rng.choice([300, 1000, 5000, 25_000, 100_000 // len(unit.encode())])
    if kind < 0.5:
        return "".join(rng.choice(WEIRD_STRINGS) for _ in range(rng.randint(2, 6)))
    return rng.choice(WEIRD_STRINGS)


def value_of_type(rng: random.Random, kind: str) -> Any:
    makers: dict[str, Callable[[], Any]] = {
        "int": lambda: rng.choice([0, 1, -1, 3, 7, 2**40]),
        "float": lambda: rng.choice([0.0, 0.5, 1.5, -2.5, 3.0]),
        "str": lambda: rng.choice(["", "1", "true", "abc", "keel-demo", "0.5", "[1]"]),
        "bool": lambda: rng.choice([True, False]),
        "null": lambda: None,
        "list": lambda: rng.choice([[], [1], ["a"], [None], [[1, 2]], [{"type": "text", "text": "x"}]]),
        "dict": lambda: rng.choice([{}, {"a": 1}, {"text": "x"}, {"role": "user", "content": "x"}]),
    }
    return makers[kind]()


TYPES = ["int", "float", "str", "bool", "null", "list", "dict"]


def deep(rng: random.Random) -> Any:
    depth = rng.randint(50, 300)
    value: Any = rng.choice([1, "x", [], {}, None])
    for _ in range(depth):
        value = [value] if rng.random() < 0.5 else {"a": value}
    return value


def huge_list(rng: random.Random) -> list:
    """Items are separate objects, so a later mutation of one does not repeat 10k times."""
    kind = rng.randrange(5)
    if kind == 0:
        return [f"s{i}" for i in range(10_000)]  # stop strings
    if kind == 1:
        return list(rng.randbytes(100_000))  # token ids
    if kind == 2:
        return ["p"] * 10_000  # prompts
    if kind == 3:
        return [{"role": "user", "content": "x"} for _ in range(10_000)]  # messages
    return [[256, 1] for _ in range(10_000)]  # token-id prompts


# ---- the request tree and its mutations -------------------------------------------------------------------


Slot = tuple[Any, Any]  # (container, key or index)


MAX_WALK_DEPTH = 20  # mutations go near the top, so nesting stays within ~350 levels however many are deep


def slots(value: Any, out: list[Slot], depth: int = 0) -> list[Slot]:
    """Every place in the tree a value can be replaced (long lists: only their first few items)."""
    if depth > MAX_WALK_DEPTH:
        return out
    if isinstance(value, dict):
        for key in list(value):
            out.append((value, key))
            slots(value[key], out, depth + 1)
    elif isinstance(value, list):
        for i in range(min(len(value), 8)):
            out.append((value, i))
            slots(value[i], out, depth + 1)
    return out


def containers(value: Any, kind: type, out: list, depth: int = 0) -> list:
    if isinstance(value, kind):
        out.append(value)
    children = value.values() if isinstance(value, dict) else value[:8] if isinstance(value, list) else ()
    for child in children if depth < MAX_WALK_DEPTH else ():
        containers(child, kind, out, depth + 1)
    return out


def pick_slot(rng: random.Random, root: list) -> Slot:
    """A slot of the body, weighted towards those nearer the top; rarely the body itself."""
    found = slots(root[0], [])
    if not found or rng.random() < 0.03:
        return (root, 0)
    return rng.choice(found[: max(1, len(found) // 2)] if rng.random() < 0.5 else found)


def set_slot(rng: random.Random, root: list, value: Any) -> None:
    container, key = pick_slot(rng, root)
    container[key] = value


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "dict"}.get(type(value), "")


def change_type(rng: random.Random, root: list) -> None:
    container, key = pick_slot(rng, root)
    kinds = [k for k in TYPES if k != type_name(container[key])]
    container[key] = value_of_type(rng, rng.choice(kinds))


def out_of_range(rng: random.Random, root: list) -> None:
    set_slot(rng, root, rng.choice(numbers()))


def unicode_edge(rng: random.Random, root: list) -> None:
    strings = [(c, k) for c, k in slots(root[0], []) if isinstance(c[k], str)]
    if strings and rng.random() < 0.8:  # mostly into a string that is already there: prompts, roles, stops
        container, key = rng.choice(strings)
        weird = weird_string(rng)
        if isinstance(weird, Raw) or rng.random() < 0.5:
            container[key] = weird
        else:
            at = rng.randint(0, len(container[key]))
            container[key] = container[key][:at] + weird + container[key][at:]
    else:
        set_slot(rng, root, weird_string(rng))


# Valid-looking words for fields with a fixed vocabulary (roles, part types, the model).
WORDS = ["assistant", "system", "user", "tool", "developer", "function", "text", "image_url", "input_audio",
         "keel-demo", "gpt-4o", "auto", "none", "required", "json_object"]


def plausible_word(rng: random.Random, root: list) -> None:
    strings = [(c, k) for c, k in slots(root[0], []) if isinstance(c[k], str)]
    container, key = rng.choice(strings) if strings else pick_slot(rng, root)
    container[key] = rng.choice(WORDS)


def delete_field(rng: random.Random, root: list) -> None:
    container, key = pick_slot(rng, root)
    if container is root:
        root[0] = {}
    else:
        del container[key]


def add_field(rng: random.Random, root: list) -> None:
    dicts = containers(root[0], dict, [])
    if not dicts:
        return
    name = rng.choice(KNOWN_FIELDS) if rng.random() < 0.6 else rng.choice(["x", "", "__proto__", "é😀", "a" * 300])
    value = rng.choice([value_of_type(rng, rng.choice(TYPES)), rng.choice(numbers()), weird_string(rng)])
    rng.choice(dicts)[name] = value


def nest_deep(rng: random.Random, root: list) -> None:
    set_slot(rng, root, deep(rng))


def make_empty(rng: random.Random, root: list) -> None:
    set_slot(rng, root, rng.choice(["", [], {}, [[]], [""], [{}]]))


def make_huge(rng: random.Random, root: list) -> None:
    body = root[0]
    if isinstance(body, dict) and rng.random() < 0.7:  # where a list belongs: stop, prompt, messages, ids
        key = rng.choice(["stop", "prompt", "messages", "input_ids", "stop_token_ids"])
        target = body.get("sampling_params") if key == "stop_token_ids" else body
        if isinstance(target, dict):
            target[key] = huge_list(rng)
            return
    set_slot(rng, root, huge_list(rng))


def non_finite(rng: random.Random, root: list) -> None:
    set_slot(rng, root, Raw(rng.choice(["NaN", "Infinity", "-Infinity", "-NaN", "nan", "inf"])))


def duplicate_key(rng: random.Random, root: list) -> None:
    """One object written with a key twice (its first value, or a mutated one, first); done last."""
    dicts = [d for d in containers(root[0], dict, []) if d]
    if not dicts:
        return
    target = rng.choice(dicts)
    key = rng.choice(list(target))
    other = rng.choice([value_of_type(rng, rng.choice(TYPES)), target[key]])
    pairs = list(target.items())
    pairs.insert(rng.randint(0, len(pairs)), (key, other))
    replacement = Dup(tuple(pairs))
    if target is root[0]:
        root[0] = replacement
        return
    for container, slot_key in slots(root[0], []):
        if container[slot_key] is target:
            container[slot_key] = replacement
            return


TREE_MUTATIONS: dict[str, Callable[[random.Random, list], None]] = {
    "type": change_type, "number": out_of_range, "unicode": unicode_edge, "word": plausible_word,
    "delete": delete_field, "add": add_field, "deep": nest_deep, "empty": make_empty, "huge": make_huge,
    "nonfinite": non_finite,
}


# ---- raw-body, header and route mutations -----------------------------------------------------------------


INVALID_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xc0\xaf", b"\xe2\x82", b"\xf4\x90\x80\x80", b"\x80",
                b"\xf0\x9f\x98"]


def raw_mutation(rng: random.Random, body: bytes) -> bytes:
    kind = rng.randrange(9)
    if kind == 0:  # invalid UTF-8 just inside a string
        quotes = [i for i in range(min(len(body), 4000)) if body[i:i + 1] == b'"'] or [0]
        at = rng.choice(quotes) + 1
        return body[:at] + rng.choice(INVALID_UTF8) + body[at:]
    if kind == 1:
        return body[: rng.randrange(max(len(body), 1))]  # truncated
    if kind == 2:
        return body + rng.choice([b" x", b"}", b"{}", b"\x00", b" " + body])  # trailing garbage, two objects
    if kind == 3:
        return "\ufeff".encode() + body  # a byte-order mark
    if kind == 4:
        return body.decode("utf-8", "replace").encode(rng.choice(["utf-16", "utf-32", "latin-1"]), "replace")
    if kind == 5:
        return rng.choice([b"", b"null", b"[]", b"1", b'"x"', b"{", b"}{", b"true", b"\x00" * 10,
                           b"model=keel-demo&prompt=hi", b"<xml/>", bytes(rng.randrange(256) for _ in range(64))])
    if kind == 6 and rng.random() < 0.3:  # over the body limit: refused while read (rarely: 16 MiB is slow)
        return body + b" " * (BODY_LIMIT + 1 - len(body))
    if kind in (6, 7):  # whitespace everywhere JSON allows it
        return body.replace(b",", b" \t\r\n ,\n ")
    return body.replace(b":", b" : ", rng.randint(1, 3))


CONTENT_TYPES = [None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/json; charset=latin-1", "application/xml", "application/json, text/html", "*/*"]


@dataclass
class Case:
    seed: int
    index: int
    method: str
    path: str
    body: bytes
    headers: dict[str, str]
    chunked: bool
    mutations: list[str] = field(default_factory=list)

    def describe(self, limit: int = 600) -> str:
        shown = self.body[:limit]
        more = f"... ({len(self.body)} bytes)" if len(self.body) > limit else ""
        return (f"case #{self.index} (KEEL_FUZZ_SEED={self.seed}) {self.method} {self.path} headers={self.headers} "
                f"chunked={self.chunked} mutations={self.mutations}\n  body: {shown!r}{more}")


def build_case(seed: int, index: int) -> Case:
    """The index-th request of a run with this seed: each case has its own generator, so it rebuilds alone."""
    master = random.Random(seed)
    case_seed = None
    for _ in range(index + 1):
        case_seed = master.getrandbits(64)
    return make_case(random.Random(case_seed), seed, index)


def make_case(rng: random.Random, seed: int, index: int) -> Case:
    path, body = rng.choice(templates())  # built afresh on every call: mutations never leak into the next case
    case = Case(seed, index, "POST", path, b"", {"content-type": "application/json"}, False)
    root = [body]
    kinds = list(TREE_MUTATIONS) * 3 + ["dup", "raw", "raw", "header", "route"]
    chosen = [rng.choice(kinds) for _ in range(rng.randint(1, 3))]
    for kind in chosen:
        if kind in TREE_MUTATIONS:
            TREE_MUTATIONS[kind](rng, root)
    if "dup" in chosen:
        duplicate_key(rng, root)
    case.body = dump(root[0]).encode("utf-8", "surrogatepass")
    for kind in chosen:
        if kind == "raw":
            case.body = raw_mutation(rng, case.body)
        elif kind == "header":
            mutate_headers(rng, case)
        elif kind == "route":
            mutate_route(rng, case)
    case.mutations = chosen
    return case


# Headers the server should not care about (it neither decompresses nor negotiates).
ODD_HEADERS = [("expect", "100-continue"), ("content-encoding", "gzip"), ("accept", "text/event-stream"),
               ("accept-charset", "utf-16"), ("authorization", "Bearer nonsense"), ("x-request-id", "a" * 4000)]


def mutate_headers(rng: random.Random, case: Case) -> None:
    if rng.random() < 0.4:
        case.chunked = True  # no Content-Length: the server reads the body as a stream
    content_type = rng.choice(CONTENT_TYPES)
    if content_type is None:
        case.headers.pop("content-type", None)
    else:
        case.headers["content-type"] = content_type
    if rng.random() < 0.5:
        name, value = rng.choice(ODD_HEADERS)
        case.headers[name] = value


def mutate_route(rng: random.Random, case: Case) -> None:
    kind = rng.randrange(4)
    if kind == 0:
        case.path = rng.choice([r for r in ROUTES if r != case.path])  # a body for another route
    elif kind == 1:
        case.method = rng.choice(["GET", "PUT", "DELETE", "PATCH"])
    elif kind == 2:
        case.path = rng.choice(["/v1/completions/", "/v1/completion", "/generate/x", "/v1/../generate",
                                "/v1/chat/completions?stream=true", "/%ff", "/v2/completions"])
    else:
        case.method = "POST"
        case.path = "/abort/" + rng.choice(["cmpl-x", "%00", "%F0%9F%98%80", "a" * 2000, "%ed%a0%80", "..%2f",
                                             "gen-" + "0" * 32])


# ---- sending and judging ----------------------------------------------------------------------------------


@dataclass
class Result:
    case: Case
    status: int
    content_type: str
    body: bytes
    retry_after: Optional[str]
    problem: Optional[str]


def strict_json(text: str | bytes) -> Any:
    """json.loads without NaN / Infinity, which are not JSON."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"non-standard JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def judge(status: int, content_type: str, body: bytes, retry_after: Optional[str]) -> Optional[str]:
    """What is wrong with this response, or None."""
    if status == 200:
        if content_type.startswith("text/event-stream"):
            return judge_stream(body)
        try:
            payload = strict_json(body)
        except ValueError as e:
            return f"200 with a body that is not JSON: {e}"
        if not isinstance(payload, dict) or "error" in payload:
            return "200 whose body is not a result object"
        return engine_error(payload)
    if 400 <= status < 600:
        problem = judge_error(body)
        if problem or status < 500:
            return problem
        error = strict_json(body)["error"]
        if status == 503 and error["type"] == "service_unavailable" and retry_after:
            return None  # the queue is full: a client retries
        return f"server error {status}"
    return f"unexpected status {status}"


def judge_error(body: bytes) -> Optional[str]:
    try:
        payload = strict_json(body)
    except ValueError as e:
        return f"error body is not JSON: {e}"
    if not isinstance(payload, dict) or set(payload) != {"error"} or not isinstance(payload["error"], dict):
        return "error body is not {'error': {...}}"
    error = payload["error"]
    if set(error) != ERROR_KEYS:
        return f"error keys are {sorted(error)}, not {sorted(ERROR_KEYS)}"
    if not isinstance(error["message"], str) or not error["message"] or not isinstance(error["type"], str):
        return "error message or type is not a non-empty string"
    if not all(error[k] is None or isinstance(error[k], str) for k in ("param", "code")):
        return "error param or code is neither a string nor null"
    return None


def judge_stream(body: bytes) -> Optional[str]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"stream is not UTF-8: {e}"
    data = [line[len("data: "):] for line in text.split("\n") if line.startswith("data:")]
    if not data or data[-1] != "[DONE]" or data.count("[DONE]") != 1:
        return "stream does not end with exactly one `data: [DONE]`"
    if not text.rstrip("\n").endswith("data: [DONE]"):
        return "stream has content after `data: [DONE]`"
    for chunk in data[:-1]:
        try:
            payload = strict_json(chunk)
        except ValueError as e:
            return f"stream line is not JSON: {e}: {chunk[:200]!r}"
        if problem := engine_error(payload):
            return problem
    return None


def engine_error(payload: Any) -> Optional[str]:
    """An accepted request the engine failed: an error event in a stream, or meta_info.error of /generate."""
    if not isinstance(payload, dict):
        return f"stream event is not an object: {payload!r}"
    if "error" in payload:
        return f"engine error in the response: {payload['error']}"
    meta = payload.get("meta_info")
    if isinstance(meta, dict) and meta.get("error") is not None:
        return f"engine error in meta_info: {meta['error']}"
    return None


async def chunks(body: bytes) -> AsyncIterator[bytes]:
    for i in range(0, len(body), 65536):
        yield body[i:i + 65536]


async def send(client: httpx.AsyncClient, url: str, case: Case) -> Result:
    try:
        return await exchange(client, url, case)
    except httpx.TimeoutException as e:  # a server that never answers is a failure, not a race
        return Result(case, 0, "", b"", None, f"no response: {type(e).__name__}: {e}")
    except httpx.TransportError:
        pass
    # No response at all on a pooled connection: HTTP/1.1's keep-alive race (the server closed the connection as
    # idle while this request went out; the client's 1 s expiry does not cover a test process starved of CPU for
    # seconds). Clients resend such a request on a new connection; a server that drops it again fails the test.
    async with httpx.AsyncClient(timeout=TIMEOUT_S) as fresh:
        try:
            return await exchange(fresh, url, case)
        except httpx.HTTPError as e:
            return Result(case, 0, "", b"", None, f"no response: {type(e).__name__}: {e}")


async def exchange(client: httpx.AsyncClient, url: str, case: Case) -> Result:
    """One request and its judged response; raises httpx's error if no response head arrived."""
    content = chunks(case.body) if case.chunked else case.body
    if case.method == "GET" and not case.chunked:
        content = None  # a GET with a body is not what clients send
    async with client.stream(case.method, url + case.path, content=content, headers=case.headers) as response:
        try:
            body = await response.aread()
        except httpx.HTTPError as e:
            return Result(case, response.status_code, "", b"", None,
                          f"response cut short: {type(e).__name__}: {e}")
    content_type = response.headers.get("content-type", "")
    retry_after = response.headers.get("retry-after")
    return Result(case, response.status_code, content_type, body, retry_after,
                  judge(response.status_code, content_type, body, retry_after))


async def fuzz(url: str, seed: int, count: int) -> list[Result]:
    master = random.Random(seed)
    case_seeds = [master.getrandbits(64) for _ in range(count)]
    pending = iter(range(count))
    results: list[Result] = []

    async def worker(client: httpx.AsyncClient) -> None:
        for index in pending:  # shared: each index goes to one worker
            # built here, one at a time, so a run never holds thousands of large bodies
            case = make_case(random.Random(case_seeds[index]), seed, index)
            results.append(await send(client, url, case))

    # idle connections are dropped well before the server's 5 s keep-alive timeout: reusing one just as the
    # server closes it fails with a ReadError that says nothing about the server
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=1)
    async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(CONCURRENCY)))
    return results


def report(results: list[Result], seed: int) -> str:
    statuses = Counter(r.status for r in results)
    routes = Counter((r.case.path, r.status) for r in results)
    streams = sum(r.content_type.startswith("text/event-stream") for r in results)
    lines = [f"{len(results)} requests, seed {seed}: statuses {dict(sorted(statuses.items()))}, "
             f"{streams} streams"]
    lines += [f"  {path} {status}: {n}" for (path, status), n in sorted(routes.items()) if n >= 5]
    return "\n".join(lines)


def failure(result: Result) -> str:
    return (f"{result.problem}\n{result.case.describe()}\n  response: {result.status} {result.content_type} "
            f"{result.body[:600]!r}")


# ---- the server's state after the run ---------------------------------------------------------------------


def settled(info: dict) -> bool:
    engine = info["engine"]
    return (info["pending_requests"] == 0 and engine["running"] == 0 and engine["waiting"] == 0
            and engine["pages_held"] == 0 and engine["pages_cached_locked"] == 0
            and engine["pages_free"] + engine["pages_cached"] == engine["pages_total"])


def wait_until_settled(server: Server, timeout_s: float = 30) -> dict:
    """Engine stats arrive every half second or so: wait for them to show the server idle and its KV free."""
    deadline = time.monotonic() + timeout_s
    info = server.info()
    while not settled(info) and time.monotonic() < deadline:
        time.sleep(0.2)
        info = server.info()
    return info


def test_fuzzed_requests_never_break_the_server(tmp_path):
    server = start_server(tmp_path / "serve.log", "--context-length", "64")
    try:
        check_server_survives_fuzzing(server)
    except BaseException:
        server.process.kill()  # the failure above is the report: no second one from stop_server
        raise
    stop_server(server)


def check_server_survives_fuzzing(server: Server) -> None:
    engine_pid = server.info()["engine_pid"]
    started = time.monotonic()
    results = asyncio.run(fuzz(server.url, SEED, REQUESTS))
    print(f"\n{report(results, SEED)}\n  in {time.monotonic() - started:.1f} s")
    failures = [r for r in results if r.problem]
    kinds = Counter(r.problem.split(":")[0] for r in failures if r.problem)
    assert len(failures) == 0, (f"{len(failures)} of {len(results)} responses are wrong ({dict(kinds)}); "
                                "the first ones:\n" + "\n".join(failure(r) for r in failures[:8]))
    assert len(results) == REQUESTS
    assert httpx.get(f"{server.url}/health").status_code == 200
    good = {"model": MODEL, "prompt": "still there?", "max_tokens": 2}
    assert httpx.post(f"{server.url}/v1/completions", json=good, timeout=TIMEOUT_S).status_code == 200
    info = wait_until_settled(server)
    assert info["engine_pid"] == engine_pid and engine_pid in server.children(), "the engine was restarted"
    engine = info["engine"]
    assert info["pending_requests"] == 0 and engine["running"] == 0 and engine["waiting"] == 0, info
    # every page is free or in the evictable prefix cache: none held by a request, none locked
    assert engine["pages_held"] == 0 and engine["pages_cached_locked"] == 0, engine
    assert engine["pages_free"] + engine["pages_cached"] == engine["pages_total"], engine
    log = server.log.read_text()
    for marker in ("Traceback", "Exception in ASGI application"):
        assert marker not in log, log[max(0, log.index(marker) - 2000):][:8000]
