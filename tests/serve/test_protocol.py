"""The OpenAI-compatible API on the tiny model: the `openai` client, raw HTTP, auth, SSE, disconnects."""
from __future__ import annotations

import json
import socket
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest
from servekit import API_KEY, make_app, running

from medtune.safety import DISCLAIMER, EMERGENCY_NOTICE

AUTH = {"Authorization": f"Bearer {API_KEY}"}
STROKE = "我爸突然嘴歪了，说话含糊不清，右手拿不住筷子"


def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(served, body, headers=AUTH, timeout: float = 60) -> httpx.Response:
    return httpx.post(served.url + "/v1/chat/completions", json=body, headers=headers, timeout=timeout)


def ask(text: str = "头晕乏力怎么办？", **extra) -> dict:
    return {"messages": [{"role": "user", "content": text}], **extra}


def wait_until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# ----------------------------------------------------------------------------- the openai client

def test_models_lists_the_adapter_name(served, trained_adapter_dir):
    from medtune.modeling import _adapter_names

    ids = [m.id for m in client(served).models.list().data]
    assert ids == [_adapter_names([trained_adapter_dir])[0]] == [served.model_id]


def test_openai_client_answer_carries_disclaimer_usage_and_extensions(served):
    r = client(served).chat.completions.create(model=served.model_id, max_tokens=8, seed=3,
                                               messages=[{"role": "user", "content": "头晕乏力怎么办？"}],
                                               extra_body={"department": "神经内科"})
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content.endswith(DISCLAIMER)
    assert 1 <= r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model_extra["emergency"] is False and r.model_extra["department"] == "神经内科"


def test_stream_equals_non_stream_for_greedy(served):
    kw = dict(model=served.model_id, max_tokens=12, temperature=0,
              messages=[{"role": "user", "content": "胃疼三天了吃什么药好"}])
    whole = client(served).chat.completions.create(**kw)
    chunks = list(client(served).chat.completions.create(stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(chunks) >= 3  # opening, text, closing with the finish reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_emergency_notice_first_and_flagged(served):
    r = client(served).chat.completions.create(model=served.model_id, max_tokens=4,
                                               messages=[{"role": "user", "content": STROKE}])
    assert r.model_extra["emergency"] is True and r.model_extra["emergency_category"] == "stroke"
    assert r.choices[0].message.content.startswith(EMERGENCY_NOTICE + "\n\n")


def test_client_system_message_replaces_ours_and_safety_still_applies(served):
    r = post(served, {"messages": [{"role": "system", "content": "你是一名医生。"},
                                   {"role": "user", "content": STROKE}], "max_tokens": 4, "department": "心血管科"})
    body = r.json()
    assert r.status_code == 200 and body["emergency"] is True
    assert body["department"] is None  # our department prompt was replaced by the client's


def test_department_guessed_by_the_adapters_classifier_when_not_given(served):
    body = post(served, ask("最近血压有点高，头也疼", max_tokens=2)).json()
    assert isinstance(body["department"], str) and body["department"]


def test_seed_makes_sampling_reproducible(served):
    kw = dict(model=served.model_id, max_tokens=16, temperature=1.0, top_p=1.0, ignore_eos=True)
    one = post(served, ask(seed=7, **kw)).json()["choices"][0]["message"]["content"]
    two = post(served, ask(seed=7, **kw)).json()["choices"][0]["message"]["content"]
    other = post(served, ask(seed=8, **kw)).json()["choices"][0]["message"]["content"]
    assert one == two and one != other


def test_ignore_eos_generates_exactly_max_tokens(served):
    body = post(served, ask(max_tokens=12, ignore_eos=True)).json()
    assert body["usage"]["completion_tokens"] == 12 and body["choices"][0]["finish_reason"] == "length"


def test_stop_string_ends_the_answer(served):
    kw = dict(max_tokens=24, temperature=1.0, top_p=1.0, seed=11, ignore_eos=True)  # the seed's draws repeat
    full = post(served, ask(**kw)).json()["choices"][0]["message"]["content"]
    answer = full[: -len("\n\n" + DISCLAIMER)]
    visible = [c for c in answer if c.strip() and c != "\ufffd"]
    assert len(visible) >= 4, answer
    stop = visible[len(visible) // 2]
    cut = post(served, ask(stop=[stop], **kw)).json()
    assert cut["choices"][0]["finish_reason"] == "stop"
    assert cut["choices"][0]["message"]["content"] == answer[: answer.index(stop)].strip() + "\n\n" + DISCLAIMER


# ----------------------------------------------------------------------------- bad input, raw HTTP

BAD = {
    "malformed JSON": b'{"messages": [',
    "no messages": {},
    "empty messages": {"messages": []},
    "unknown role": {"messages": [{"role": "doctor", "content": "x"}]},
    "content not a string": {"messages": [{"role": "user", "content": 5}]},
    "messages not a list": {"messages": "头晕"},
    "last turn not the user's": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    "system not first": {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                      {"role": "user", "content": "c"}]},
    "temperature a string": ask(temperature="hot"),
    "temperature out of range": ask(temperature=3),
    "top_p zero": ask(top_p=0),
    "max_tokens zero": ask(max_tokens=0),
    "max_tokens fractional": ask(max_tokens=1.5),
    "max_tokens over the limit": ask(max_tokens=5000),
    "five stop strings": ask(stop=["a", "b", "c", "d", "e"]),
    "n above one": ask(n=2),
    "too many messages": {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 4
                          + [{"role": "user", "content": "c"}]},
    "prompt over the token limit": ask("头晕" * 1500),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_requests_are_400_in_openai_shape(served, name):
    body = BAD[name]
    if isinstance(body, bytes):
        r = httpx.post(served.url + "/v1/chat/completions", content=body,
                       headers={**AUTH, "Content-Type": "application/json"}, timeout=30)
    else:
        r = post(served, body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"] and "code" in error
    assert "Traceback" not in r.text


def test_limits_name_their_cause(served):
    assert post(served, ask("头晕" * 1500)).json()["error"]["code"] == "context_length_exceeded"
    assert "not valid JSON" in httpx.post(served.url + "/v1/chat/completions", content=b"{", timeout=30,
                                          headers={**AUTH, "Content-Type": "application/json"}).json()["error"]["message"]
    assert post(served, ask(max_tokens=5000)).json()["error"]["param"] == "max_tokens"


def test_body_over_the_limit_is_413(served):
    r = post(served, ask("头" * 70_000))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_unknown_model_is_404(served):
    r = post(served, ask(model="gpt-4o"))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_unknown_path_is_openai_shaped_404(served):
    r = httpx.get(served.url + "/v1/nothing", headers=AUTH)
    assert r.status_code == 404 and "error" in r.json()


# ----------------------------------------------------------------------------- auth

@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_api_needs_the_key(served, headers):
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/metrics")]:
        r = httpx.request(method, served.url + path, headers=headers, json=ask() if method == "POST" else None)
        assert r.status_code == 401, (path, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"


def test_health_page_and_static_need_no_key(served):
    assert httpx.get(served.url + "/health").json() == {"status": "ok", "model": served.model_id}
    page = httpx.get(served.url + "/")
    assert page.status_code == 200 and "医疗问答助手" in page.text
    assert httpx.get(served.url + "/static/app.js").status_code == 200


def test_openai_client_with_wrong_key_gets_authentication_error(served):
    from openai import AuthenticationError, OpenAI

    bad = OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad.models.list()


# ----------------------------------------------------------------------------- SSE framing

def test_sse_framing(served):
    with httpx.stream("POST", served.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json=ask(STROKE, stream=True, max_tokens=6, ignore_eos=True)) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[0]["choices"][0]["delta"]["content"] == EMERGENCY_NOTICE + "\n\n"
    assert all(c["emergency"] is True and c["emergency_category"] == "stroke" for c in chunks)
    assert [c["choices"][0]["finish_reason"] for c in chunks][:-1] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


# ----------------------------------------------------------------------------- disconnects, batching, queue

def _outcomes(served, outcome: str) -> float:
    text = httpx.get(served.url + "/metrics", headers=AUTH).text
    for line in text.splitlines():
        if line.startswith(f'medtune_requests_total{{outcome="{outcome}"}}'):
            return float(line.split()[-1])
    return 0.0


def test_stream_disconnect_stops_generation(served):
    before = _outcomes(served, "cancelled")
    with httpx.stream("POST", served.url + "/v1/chat/completions", headers=AUTH, timeout=60,
                      json=ask(stream=True, max_tokens=4000, ignore_eos=True)) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert served.engine.running == 1
    assert wait_until(lambda: served.engine.running == 0)
    assert wait_until(lambda: _outcomes(served, "cancelled") == before + 1)


def test_non_stream_disconnect_stops_generation(served):
    with pytest.raises(httpx.ReadTimeout):
        post(served, ask(max_tokens=4000, ignore_eos=True), timeout=1.0)
    assert wait_until(lambda: served.engine.running == 0)


def test_concurrent_requests_share_a_batch(served):
    results = []

    def one(i: int) -> None:
        results.append(post(served, ask(f"问题{i}：咳嗽怎么办", max_tokens=24, ignore_eos=True)).status_code)

    served.engine.max_rows_seen = 0
    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 4
    assert served.engine.max_rows_seen >= 3


def test_full_queue_is_429(loaded):
    app = make_app(loaded, api_key=None, batch_size=1, max_queue=1, max_tokens_limit=4096)
    with running(app) as url:
        host, port = urlparse(url).hostname, urlparse(url).port
        body = json.dumps(ask(stream=True, max_tokens=4000, ignore_eos=True)).encode()
        holders = []
        engine = app.state.engine
        # One runs, one waits: the queue is full. The second goes in once the first has left the queue for
        # the batch (sent back to back, the second could find the first still queued, and get the 429).
        for expected in ((1, 0), (1, 1)):
            s = socket.create_connection((host, port))
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            holders.append(s)
            assert wait_until(lambda: (engine.running, engine.waiting) == expected)
        r = httpx.post(url + "/v1/chat/completions", json=ask(max_tokens=4), timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full" and r.headers["retry-after"]
        assert "medtune_queue_depth 1.0" in httpx.get(url + "/metrics").text
        for s in holders:
            s.close()
        assert wait_until(lambda: engine.running == 0 and engine.waiting == 0)


# ----------------------------------------------------------------------------- metrics, schema, CORS, logs

def test_metrics_count_requests_and_tokens(served):
    post(served, ask(max_tokens=5, ignore_eos=True))
    text = httpx.get(served.url + "/metrics", headers=AUTH).text
    for name in ("medtune_requests_total", "medtune_generation_tokens_total", "medtune_prompt_tokens_total",
                 "medtune_request_latency_seconds_bucket", "medtune_time_to_first_token_seconds_bucket",
                 "medtune_queue_depth", "medtune_running_requests"):
        assert name in text
    assert _outcomes(served, "length") >= 1


def test_openapi_schema_matches_behaviour(served):
    schema = httpx.get(served.url + "/openapi.json").json()
    op = schema["paths"]["/v1/chat/completions"]["post"]
    assert {"200", "400", "401", "404", "413", "429"} <= set(op["responses"]) and "422" not in json.dumps(schema)
    assert op["responses"]["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert "text/event-stream" in op["responses"]["200"]["content"]
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert request["required"] == ["messages"]
    assert {"department", "ignore_eos", "seed", "stop", "stream"} <= set(request["properties"])
    assert request["properties"]["temperature"]["anyOf"][0]["maximum"] == 2.0
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert op["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/health"]["get"]


def test_cors_only_with_an_origin(loaded, served):
    preflight = {"Origin": "https://chat.example", "Access-Control-Request-Method": "POST"}
    r = httpx.options(served.url + "/v1/chat/completions", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    with running(make_app(loaded, api_key=None, cors_origin=["https://chat.example"])) as url:
        r = httpx.options(url + "/v1/chat/completions", headers=preflight)
        assert r.headers["access-control-allow-origin"] == "https://chat.example"


def test_content_not_logged_unless_asked(loaded, served, caplog):
    question = "我的腰疼了好几天，弯腰更疼"
    with caplog.at_level("INFO"):
        post(served, ask(question, max_tokens=3))
    assert "medtune.serve" in caplog.text and question not in caplog.text
    caplog.clear()
    with running(make_app(loaded, api_key=None, log_content=True)) as url, caplog.at_level("INFO"):
        httpx.post(url + "/v1/chat/completions", json=ask(question, max_tokens=3), timeout=60)
    assert question in caplog.text
