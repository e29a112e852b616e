"""engine/openai_compat.py: the OpenAI-shaped parts of /v1/chat/completions, on literal requests."""

from __future__ import annotations

import pytest

from engine.runtime.backend import ChatResult
from engine.server.api_models import ChatRequest
from engine.server.openai_compat import (
    chat_completion,
    chat_settings,
    check_chat_request,
    openai_logprobs,
    to_backend_messages,
)
from engine.server.security import ApiError


def _request(**fields):
    return ChatRequest(model="geo-r1", messages=[{"role": "user", "content": "hi"}], **fields)


@pytest.mark.parametrize(
    ("fields", "status", "message"),
    [
        ({"stream": True}, 400, "stream=true"),
        ({"n": 2}, 400, "n=2"),
        ({"stop": ["\n"]}, 400, "stop sequences"),
        ({"top_logprobs": 3}, 400, "needs logprobs=true"),
    ],
)
def test_check_chat_request_refuses_what_the_engine_does_not_do(fields, status, message):
    with pytest.raises(ApiError, match=message) as info:
        check_chat_request(_request(**fields))
    assert info.value.status_code == status


def test_check_chat_request_accepts_a_plain_request():
    check_chat_request(_request(n=1, logprobs=True, top_logprobs=2, stream=False))


def test_to_backend_messages_keeps_text_and_collects_data_uris():
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "assistant"},
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "text", "text": "tanks"},
                    ],
                },
            ],
        }
    )
    messages, urls = to_backend_messages(body.messages)
    assert messages == [
        {"role": "system", "content": "be brief"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "tanks"}]},
    ]
    assert urls == ["data:image/png;base64,AAAA"]


def test_to_backend_messages_never_fetches_urls():
    body = ChatRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}],
        }
    )
    with pytest.raises(ApiError, match=r"messages\[0\]\.content\[0\]\.image_url: only data: URIs") as info:
        to_backend_messages(body.messages)
    assert info.value.status_code == 400


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, (256, False, 1.0)),  # greedy, as Geo-R1 is evaluated
        ({"temperature": 0.0, "max_tokens": 64}, (64, False, 1.0)),
        ({"temperature": 0.7, "max_tokens": 64, "max_completion_tokens": 32}, (32, True, 0.7)),
    ],
)
def test_chat_settings(fields, expected):
    s = chat_settings(_request(**fields))
    assert (s.max_new_tokens, s.do_sample, s.temperature) == expected


def test_openai_logprobs_ranks_the_top_alternatives():
    out = openai_logprobs((("é", -0.1, {"é": -0.1, "a": -3.0, "b": -1.0}),), 2)
    assert out is not None and out["refusal"] is None
    (token,) = out["content"]
    assert token["token"] == "é" and token["bytes"] == [0xC3, 0xA9]
    assert [t["token"] for t in token["top_logprobs"]] == ["é", "b"]
    assert openai_logprobs(None, 5) is None


def test_chat_completion_has_openai_shape():
    result = ChatResult("None", 3, 1, "stop", (("None", -0.1, {"None": -0.1}),))
    body = chat_completion(result, "geo-r1", 0, want_logprobs=False)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "geo-r1"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "None", "refusal": None}
    assert choice["logprobs"] is None and choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}
    assert chat_completion(result, "geo-r1", 1, want_logprobs=True)["choices"][0]["logprobs"]["content"]
