"""The official `openai` Python package against the openai-router gateway.

Run by tests/gateway.rs, one phase at a time: `python client.py PHASE`, with OPENAI_BASE_URL
and OPENAI_API_KEY set. Exits non-zero (an assertion) when the gateway misbehaves.
"""

import json
import os
import sys
import time

import openai
from openai import OpenAI

BASE = os.environ["OPENAI_BASE_URL"]
KEY = os.environ["OPENAI_API_KEY"]
OPEN_KEY = os.environ.get("OPEN_KEY", "")


def client(**kwargs):
    return OpenAI(base_url=BASE, api_key=kwargs.pop("api_key", KEY), **kwargs)


def basic():
    answer = client().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=5,
    )
    assert answer.choices[0].message.content, answer
    assert answer.choices[0].finish_reason == "stop", answer
    assert answer.usage.completion_tokens == 5, answer.usage


def stream_tools():
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }]
    stream = client().chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "Weather in Boston?"}],
        tools=tools,
        stream=True,
    )
    name, arguments, finish = None, "", None
    for chunk in stream:
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.function and call.function.name:
                    name = call.function.name
                if call.function and call.function.arguments:
                    arguments += call.function.arguments
            finish = choice.finish_reason or finish
    assert name == "get_weather", name
    assert json.loads(arguments)["location"] == "Boston", arguments
    assert finish == "tool_calls", finish


def legacy_stream():
    # A streamed legacy completion, without and with the usage chunk.
    stream = client().completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=5, stream=True)
    chunks = list(stream)
    text = "".join(choice.text for chunk in chunks for choice in chunk.choices)
    assert len(text.split()) == 5, text
    assert chunks[-1].choices[0].finish_reason == "stop", chunks[-1]
    assert all(chunk.usage is None for chunk in chunks), chunks
    stream = client().completions.create(
        model="gpt-3.5-turbo-instruct", prompt="Say hello", max_tokens=5, stream=True,
        stream_options={"include_usage": True})
    last = list(stream)[-1]
    assert last.choices == [] and last.usage.completion_tokens == 5, last


def responses():
    # The Responses API, answered whole and streamed as named events.
    answer = client().responses.create(
        model="gpt-4o-mini", input="Say hello", max_output_tokens=5)
    assert answer.status == "completed", answer
    assert len(answer.output_text.split()) == 5, answer.output_text
    assert answer.usage.output_tokens == 5, answer.usage
    stream = client().responses.create(
        model="gpt-4o-mini", input=[{"role": "user", "content": "Say hello"}],
        max_output_tokens=5, stream=True)
    events = list(stream)
    assert events[0].type == "response.created", events[0]
    assert events[-1].type == "response.completed", events[-1]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == events[-1].response.output_text, (text, events[-1])
    # A continuation goes where its response is stored, every time.
    for _ in range(3):
        more = client().responses.create(
            model="gpt-4o-mini", input="And then?", previous_response_id=answer.id,
            max_output_tokens=3)
        assert more.status == "completed", more
    # Calls on the stored response go where it is stored.
    again = client().responses.retrieve(answer.id)
    assert again.id == answer.id and again.status == "completed", again
    items = client().responses.input_items.list(answer.id)
    assert items.data, items
    client().responses.delete(answer.id)
    try:
        client(max_retries=0).responses.retrieve(answer.id)
        raise AssertionError("a deleted response was retrieved")
    except openai.NotFoundError as error:
        assert "not found" in str(error), error
    # One the router did not place: it cannot tell where it is stored.
    try:
        client(max_retries=0).responses.create(
            model="gpt-4o-mini", input="And then?", previous_response_id="resp_elsewhere")
        raise AssertionError("a continuation of an unknown response was accepted")
    except openai.BadRequestError as error:
        assert "previous_response_id" in str(error), error


def embeddings():
    answer = client().embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert len(answer.data) == 3, answer
    assert [d.index for d in answer.data] == [0, 1, 2]
    assert len(answer.data[0].embedding) > 0


def errors():
    try:
        client(api_key="sk-not-a-key").chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("401 expected")
    except openai.AuthenticationError as e:
        assert e.status_code == 401
    try:
        client(api_key=OPEN_KEY).chat.completions.create(
            model="gpt-unknown", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("404 expected")
    except openai.NotFoundError as e:
        assert e.status_code == 404
        assert "gpt-4o-mini" in e.message, e.message  # the known models are named


def bad_request():
    # Both upstreams answer 400 context_length_exceeded: passed through as it was.
    try:
        client(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("400 expected")
    except openai.BadRequestError as e:
        assert e.status_code == 400
        assert e.code == "context_length_exceeded", e.code


def throttled():
    try:
        client(max_retries=0).chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
        raise AssertionError("429 expected")
    except openai.RateLimitError as e:
        assert e.status_code == 429
        assert int(e.response.headers["retry-after"]) >= 1


def throttled_then_retried():
    # The gateway throttles with Retry-After: 2; the SDK waits that long and retries.
    started = time.monotonic()
    answer = client(max_retries=2).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    waited = time.monotonic() - started
    assert answer.choices[0].message.content
    assert waited >= 1.5, waited


def fallback():
    # `gpt-4o`'s only endpoint fails; the gateway falls back to `gpt-4o-mini` and says so.
    messages = [{"role": "user", "content": "hi"}]
    raw = client(max_retries=0).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=messages, max_tokens=4)
    assert raw.headers["x-openai-router-model"] == "gpt-4o-mini", dict(raw.headers)
    assert raw.parse().choices[0].message.content
    with client(max_retries=0).chat.completions.with_streaming_response.create(
            model="gpt-4o", messages=messages, max_tokens=4, stream=True) as response:
        assert response.headers["x-openai-router-model"] == "gpt-4o-mini", dict(response.headers)
        chunks = [line for line in response.iter_lines() if line.startswith("data: {")]
        assert chunks, "no chunk"
    # Asked for directly, the model that has one answers under its own name.
    raw = client().chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=messages, max_tokens=4)
    assert raw.headers["x-openai-router-model"] == "gpt-4o-mini"


def entra():
    # `gpt-4o`'s only deployment is on an Azure endpoint that takes Entra ID tokens, no key.
    messages = [{"role": "user", "content": "hi"}]
    answer = client().chat.completions.create(model="gpt-4o", messages=messages, max_tokens=4)
    assert answer.choices[0].message.content, answer
    stream = client().chat.completions.create(
        model="gpt-4o", messages=messages, max_tokens=4, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text, "no content streamed"


def cache_affinity():
    # The gateway round-robins between two deployments; a session's requests still go where
    # its prefix is cached (the simulator reports `cached_tokens` for a repeated prefix of
    # 1,024 tokens or more on the same deployment): every request after a session's first.
    for session, how in [("s-header", "header"), ("s-body", "body"), ("s-user", "user")]:
        system = {"role": "system", "content": f"You answer {session} about the router. " * 200}
        for turn in range(4):
            kwargs = {}
            if how == "header":
                kwargs["extra_headers"] = {"x-session-id": session}
            elif how == "body":
                kwargs["extra_body"] = {"prompt_cache_key": session}
            else:
                kwargs["user"] = session
            answer = client().chat.completions.create(
                model="gpt-4o-mini", max_tokens=3,
                messages=[system, {"role": "user", "content": f"question {turn}"}], **kwargs)
            cached = answer.usage.prompt_tokens_details.cached_tokens
            if turn == 0:
                assert cached == 0, (session, turn, answer.usage)
            else:
                assert cached >= 1024, (session, turn, answer.usage)


def service_tier():
    # Four requests for the priority tier, a stream among them, round-robin over the two
    # deployments: `oai` serves them at priority, `az` at default, and each answer says which.
    tiers = []
    for turn in range(3):
        answer = client().chat.completions.create(
            model="gpt-4o-mini", max_tokens=2, service_tier="priority",
            messages=[{"role": "user", "content": f"tier {turn}"}])
        tiers.append(answer.service_tier)
    stream = client().chat.completions.create(
        model="gpt-4o-mini", max_tokens=2, service_tier="priority", stream=True,
        messages=[{"role": "user", "content": "tier stream"}])
    tiers.extend({c.service_tier for c in stream if c.choices})
    assert sorted(tiers) == ["default", "default", "priority", "priority"], tiers


def spillover():
    # `gpt-4o`'s provisioned deployment is full: Azure spills the request over to the one the
    # caller named, and the answer comes back as usual.
    answer = client().chat.completions.create(
        model="gpt-4o", max_tokens=2, messages=[{"role": "user", "content": "spill"}],
        extra_headers={"x-ms-spillover-deployment": "paygo"})
    assert answer.choices[0].message.content, answer


PHASES = {f.__name__: f for f in [spillover, service_tier, cache_affinity, basic, stream_tools, legacy_stream, responses, embeddings, errors, bad_request, throttled, throttled_then_retried, fallback, entra]}

if __name__ == "__main__":
    PHASES[sys.argv[1]]()
    print("ok", sys.argv[1])
