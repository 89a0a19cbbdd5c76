"""`moeplan serve`: the real server in a subprocess on a loopback port, with the embedded model, talked to
with the official `openai` client (and raw HTTP where a client would not send what is tested).

One server serves the whole module (its start-up is checked too: 503 while loading); tests that stop a
server start their own.
"""
from __future__ import annotations

import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import psutil
import pytest

from planner.cli import main

ROOT = Path(__file__).resolve().parent.parent.parent
PLAN, MODEL, NAME = "plans/tiny-moe.yaml", "models/tiny-moe", "tiny-moe"
KEY = "test-key-123"
LONG_PROMPT = "import os\n"  # greedy decoding runs the whole context from here without an end-of-text token


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    loading_health: tuple[int, dict] | None = None  # (status, body) seen before the model had loaded
    loading_completion: tuple[int, dict] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | str | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
            response = conn.getresponse()
            data = response.read()
            return response.status, json.loads(data) if data.startswith(b"{") else {"text": data.decode()}
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line and not line.startswith("#")}

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status, body = self.raw("GET", "/health")
            if body["running"] == 0 and body["waiting"] == 0:
                return
            time.sleep(0.02)
        raise AssertionError("the server did not become idle")


def start_server(tmp_path: Path, plan: Path, *extra: str) -> Server:
    port = free_port()
    log = tmp_path / f"serve-{port}.log"
    proc = subprocess.Popen([sys.executable, "-m", "planner.cli", "serve", str(plan), "--model", MODEL, "--port",
                             str(port), *extra], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    server = Server(proc, port, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            status, body = server.raw("GET", "/health")
        except OSError:  # not listening yet
            time.sleep(0.02)
            continue
        if status == 200:
            return server
        if server.loading_health is None:  # loading: the API answers 503 in OpenAI's shape meanwhile
            server.loading_health = (status, body)
            server.loading_completion = server.raw("POST", "/v1/completions",
                                                   json.dumps({"model": NAME, "prompt": "x"}))
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("the server did not come up: " + log.read_text())


def stop(server: Server) -> int:
    server.proc.send_signal(signal.SIGINT)
    try:
        return server.proc.wait(timeout=60)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()


@pytest.fixture(scope="module")
def plan(tmp_path_factory) -> Path:
    """The shipped plan with one CPU thread: two threads on a busy two-core machine decode 10-20x slower
    (bench/results/serve_load*.md), and the tests share their machine."""
    import yaml

    data = yaml.safe_load((ROOT / PLAN).read_text())
    data["hardware"]["cpu_threads"] = 1
    out = tmp_path_factory.mktemp("plan") / "tiny-moe-1-thread.yaml"
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, plan) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("serve"), plan, "--api-key", KEY, "--max-queue", "1")
    yield srv
    stop(srv)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ROOT / MODEL)


# ---- start-up ---------------------------------------------------------------------------------------
def test_answers_503_while_loading_then_ok(server):
    assert server.loading_health is not None, "the port opened only after loading (expected 503 meanwhile)"
    assert server.loading_health == (503, {"status": "loading", "model": NAME, "waiting": 0, "running": 0})
    status, body = server.loading_completion
    assert status == 503 and body["error"]["type"] == "unavailable_error" and "loading" in body["error"]["message"]
    assert server.raw("GET", "/health") == (200, {"status": "ok", "model": NAME, "waiting": 0, "running": 0})


def test_binds_loopback_only_by_default(server):
    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections("tcp") if c.status == "LISTEN"]
    assert [(a.ip, a.port) for a in listening] == [("127.0.0.1", server.port)]


def test_warns_at_start_that_the_model_has_no_chat_template(server):
    assert "no chat template" in server.log.read_text()


# ---- models, completions, chat ---------------------------------------------------------------------
def test_models_lists_the_plan_model(server):
    client = server.client()
    assert [m.id for m in client.models.list()] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_counts_usage(server, tokenizer):
    prompt = "def fibonacci(n):"
    done = server.client().completions.create(model=NAME, prompt=prompt, max_tokens=7, temperature=0)
    choice = done.choices[0]
    assert done.model == NAME and done.object == "text_completion" and choice.finish_reason == "length"
    assert done.usage.prompt_tokens == len(tokenizer(prompt)["input_ids"])
    assert done.usage.completion_tokens == 7 and done.usage.total_tokens == done.usage.prompt_tokens + 7
    assert choice.text


def test_streamed_text_equals_moeplan_run_json(server, plan, capsys, monkeypatch):
    prompt, args = "class Cache:", dict(max_tokens=16, temperature=0.8, top_p=0.9, seed=5)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(["run", str(plan), "--model", MODEL, "--prompt", prompt, "--max-new-tokens", "16", "--temperature", "0.8",
                 "--top-p", "0.9", "--seed", "5", "--json"]) == 0
    expected = json.loads(capsys.readouterr().out)
    chunks = list(server.client().completions.create(model=NAME, prompt=prompt, stream=True, **args))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == expected["text"]
    assert chunks[-1].usage.completion_tokens == len(expected["generated_ids"])
    assert chunks[-1].usage.prompt_tokens == expected["prompt_tokens"]
    whole = server.client().completions.create(model=NAME, prompt=prompt, **args)
    assert whole.choices[0].text == expected["text"]


def test_same_seed_same_text_other_seed_other_text(server):
    client = server.client()
    texts = [client.completions.create(model=NAME, prompt="def main", max_tokens=8, temperature=1.0,
                                       seed=seed).choices[0].text for seed in (11, 11, 12)]
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


def test_stop_string_ends_the_text_before_it(server):
    client = server.client()
    free = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=16, temperature=0)
    text = free.choices[0].text
    stop = text[6:11]  # several characters, likely spanning tokens: the server must hold back a partial match
    expected = text[:text.find(stop)]
    stopped = client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=16, temperature=0,
                                        stop=[stop, "never appears"])
    assert stopped.choices[0].text == expected and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < 16
    chunks = list(client.completions.create(model=NAME, prompt="def fibonacci(n):", max_tokens=16, temperature=0,
                                            stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_chat_streamed_and_not_with_the_fallback_format(server, tokenizer):
    client = server.client()
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Sort a list."}]
    whole = client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0)
    fallback = "System: You write Python.\n\nUser: Sort a list.\n\nAssistant:"
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage.prompt_tokens == len(tokenizer(fallback)["input_ids"])
    assert whole.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    assert all(c.object == "chat.completion.chunk" for c in chunks)


# ---- errors ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body,param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"[" * 100_000, None),
    (json.dumps({"prompt": "x"}), "model"),
    (json.dumps({"model": NAME}), "prompt"),
    (json.dumps({"model": NAME, "prompt": "x", "temperature": -1}), "temperature"),
    (json.dumps({"model": NAME, "prompt": "x", "top_p": 0}), "top_p"),
    (json.dumps({"model": NAME, "prompt": "x", "max_tokens": 0}), "max_tokens"),
    (json.dumps({"model": NAME, "prompt": "x", "max_token": 5}), "max_token"),
    (json.dumps({"model": NAME, "prompt": "x", "n": 2}), "n"),
    (json.dumps({"model": NAME, "prompt": "x", "stop": ["a", ""]}), "stop[1]"),
    (json.dumps({"model": NAME, "prompt": ["a", "b"]}), "prompt"),
    (json.dumps({"model": NAME, "prompt": [1, 99999]}), "prompt"),
])
def test_malformed_requests_are_400_naming_the_field(server, body, param):
    status, reply = server.raw("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert status == 400, reply
    assert reply["error"]["type"] == "invalid_request_error" and reply["error"]["param"] == param
    assert reply["error"]["message"]


def test_bad_chat_message_is_400(server):
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().chat.completions.create(model=NAME, messages=[{"role": "robot", "content": "hi"}])
    assert caught.value.body["param"] == "messages[0].role"


def test_unknown_model_is_404(server):
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().completions.create(model="gpt-4", prompt="x")
    assert caught.value.body["code"] == "model_not_found" and NAME in caught.value.body["message"]
    status, reply = server.raw("GET", "/v1/nothing-here")
    assert status == 404 and "error" in reply


def test_prompt_longer_than_the_context_is_400_with_the_numbers(server, tokenizer):
    prompt = "for i in range(10):\n" * 40
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    assert prompt_tokens > 256
    with pytest.raises(openai.BadRequestError) as caught:
        server.client().completions.create(model=NAME, prompt=prompt, max_tokens=10)
    message = caught.value.body["message"]
    assert caught.value.body["code"] == "context_length_exceeded"
    assert "256" in message and str(prompt_tokens) in message and str(prompt_tokens + 10) in message
    with pytest.raises(openai.BadRequestError):  # a chat too long for any reply
        server.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": prompt}])


def test_wrong_or_missing_key_is_401(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    status, reply = server.raw("GET", "/v1/models", headers={"Authorization": ""})
    assert status == 401 and reply["error"]["code"] == "invalid_api_key"
    assert server.raw("GET", "/health")[0] == 200  # health checks need no key


def test_queue_past_its_bound_is_429_and_disconnect_stops_generation(server):
    client = server.client()
    server.wait_idle()
    before = server.metrics()
    running = client.completions.create(model=NAME, prompt=LONG_PROMPT, max_tokens=240, temperature=0, stream=True)
    first = next(iter(running))  # generating now
    assert first.choices[0].text is not None
    waiting: list = []
    behind = threading.Thread(target=lambda: waiting.append(
        client.completions.create(model=NAME, prompt="x", max_tokens=2, temperature=0)))
    behind.start()
    deadline = time.monotonic() + 30
    while server.raw("GET", "/health")[1]["waiting"] < 1:  # --max-queue 1: one may wait
        assert time.monotonic() < deadline
        time.sleep(0.005)
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model=NAME, prompt="x", max_tokens=2)
    assert caught.value.body["code"] == "queue_full"
    running.close()  # the client goes away: its generation stops at the next token
    behind.join(timeout=120)
    assert waiting and waiting[0].usage.completion_tokens >= 1  # the waiting request was then served
    server.wait_idle()
    after = server.metrics()
    cancelled = 'moeplan_requests_total{finish_reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 1
    generated = after["moeplan_generated_tokens_total"] - before["moeplan_generated_tokens_total"]
    assert generated < 240 / 2, f"{generated} tokens generated: the cancelled stream ran on"


def test_disconnect_stops_a_non_streamed_generation_too(server):
    server.wait_idle()
    before = server.metrics()
    body = json.dumps({"model": NAME, "prompt": LONG_PROMPT, "max_tokens": 240, "temperature": 0}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer " + KEY.encode() +
                     b"\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 60
        while server.metrics()["moeplan_requests_running"] == 0:  # generating now
            assert time.monotonic() < deadline
            time.sleep(0.005)
    server.wait_idle()
    after = server.metrics()
    cancelled = 'moeplan_requests_total{finish_reason="cancelled"}'
    assert after[cancelled] - before.get(cancelled, 0) == 1
    assert after["moeplan_generated_tokens_total"] - before["moeplan_generated_tokens_total"] < 240 / 2


def test_metrics_in_prometheus_format(server):
    server.client().completions.create(model=NAME, prompt="import sys", max_tokens=4, temperature=0)
    metrics = server.metrics()
    layers = {k for k in metrics if k.startswith("moeplan_cache_misses_total{")}
    assert layers == {f'moeplan_cache_misses_total{{layer="{i}"}}' for i in range(4)}  # tiny-moe: 4 MoE layers
    assert sum(metrics[k] for k in layers) > 0
    assert all(f'moeplan_cache_hits_total{{layer="{i}"}}' in metrics for i in range(4))
    assert metrics["moeplan_generated_tokens_total"] >= 4 and metrics["moeplan_decode_tokens_per_second"] > 0
    assert metrics["moeplan_queue_length"] == 0 and "moeplan_time_to_first_token_seconds_count" in metrics


def test_chat_page_is_served(server):
    status, reply = server.raw("GET", "/")
    assert status == 200 and "/v1/chat/completions" in reply["text"]


# ---- stopping -------------------------------------------------------------------------------------------
def test_ctrl_c_drains_the_running_stream_and_exits_0(tmp_path, plan):
    server = start_server(tmp_path, plan)
    client = server.client()
    stream = iter(client.completions.create(model=NAME, prompt=LONG_PROMPT, max_tokens=12, temperature=0,
                                            stream=True))
    pieces = [next(stream).choices[0].text]
    server.proc.send_signal(signal.SIGINT)
    pieces += [c.choices[0].text for c in stream]
    assert server.proc.wait(timeout=60) == 0
    text = server.log.read_text()
    assert "Traceback" not in text and "stopped" in text
    with pytest.raises(openai.APIConnectionError):
        client.models.list()
    assert len("".join(pieces)) > 0


def test_user_errors_are_one_line_exit_1(tmp_path):
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "planner.cli", "serve", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300)

    missing_plan = serve(str(tmp_path / "nope.yaml"))
    assert missing_plan.returncode == 1 and "no such plan file" in missing_plan.stderr
    assert len(missing_plan.stderr.strip().splitlines()) == 1

    missing_model = serve(PLAN, "--model", str(tmp_path / "no-model"), "--port", str(free_port()))
    assert missing_model.returncode == 1 and "Traceback" not in missing_model.stderr
    assert re.match(r"moeplan serve: error: .*no such model folder", missing_model.stderr.strip().splitlines()[-1])

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = serve(PLAN, "--port", str(taken.getsockname()[1]))
    assert busy.returncode == 1 and "cannot listen on 127.0.0.1" in busy.stderr
    assert serve(PLAN, "--port", "70000").returncode == 2
