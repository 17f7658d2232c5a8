"""Every bad request gets an OpenAI-style error body and the right status; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest

GOOD = {"model": "keel-demo", "prompt": "Hi", "max_tokens": 4}


def post(server, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=30, **kwargs)


@pytest.mark.parametrize("path,body,status,param,code", [
    ("/v1/completions", {**GOOD, "max_tokens": "many"}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "max_tokens": -1}, 400, "max_tokens", None),
    ("/v1/completions", {**GOOD, "n": 0}, 400, "n", None),
    ("/v1/completions", {**GOOD, "temperature": -1}, 400, "temperature", None),
    ("/v1/completions", {**GOOD, "logprobs": 9}, 400, "logprobs", None),
    ("/v1/completions", {**GOOD, "prompt": "x" * 3000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "max_tokens": 5000}, 400, "prompt", "context_length_exceeded"),
    ("/v1/completions", {**GOOD, "prompt": [[1, 2, 999999]]}, 400, "prompt", None),
    ("/v1/completions", {"prompt": "Hi"}, 400, "model", None),
    ("/v1/completions", {**GOOD, "model": "gpt-5"}, 404, "model", "model_not_found"),
    ("/v1/chat/completions", {"model": "keel-demo", "messages": []}, 400, "messages", None),
    ("/v1/chat/completions", {"model": "keel-demo", "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 0}, 400, "max_completion_tokens", None),
    ("/v1/chat/completions", {"model": "keel-demo", "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs", None),
    ("/v1/chat/completions", {"model": "keel-demo", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools", None),
    ("/v1/chat/completions", {"model": "keel-demo", "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function"}]}, 400, "tools.0.function", None),
    ("/generate", {"text": "a", "input_ids": [1]}, 400, "text", None),
    ("/generate", {"text": "a", "sampling_params": {"temprature": 1}}, 400, "sampling_params", None),
])
def test_bad_requests_get_an_error_body_and_the_server_keeps_serving(server, path, body, status, param, code):
    response = post(server, path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert post(server, "/v1/completions", json=GOOD).status_code == 200


def test_malformed_json(server):
    response = post(server, "/v1/completions", content=b'{"model": "keel-demo", "prompt": ',
                    headers={"content-type": "application/json"})
    assert response.status_code == 400 and "invalid JSON" in response.json()["error"]["message"]
    assert post(server, "/v1/completions", json=GOOD).status_code == 200


def test_abort_of_an_unknown_request(server):
    response = post(server, "/abort/cmpl-nothing")
    assert response.status_code == 404 and response.json()["error"]["param"] == "request_id"
