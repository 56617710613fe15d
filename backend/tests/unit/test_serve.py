"""`sft serve` on a tiny Llama, spoken to with the real `openai` client over loopback: answers against
`sft generate`, streaming, 8 clients at once, bad requests, the API key, SIGTERM with an answer in flight."""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import yaml
from helpers import build_tiny_tokenizer, save_tiny_model, tiny_llama

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from app.sft.cli import main  # noqa: E402
from app.sft.config import SFTConfig  # noqa: E402
from app.sft.generation import Generator  # noqa: E402
from app.sft.serve import StopCutter, create_app  # noqa: E402
from app.sft.templates import AlpacaTemplate, chat_template_for  # noqa: E402

BACKEND = Path(__file__).resolve().parents[2]
QUESTION = "what is the capital of france ?"
NAME = "tiny"
KEY = "sk-test-9f8e7d"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model folder with the config a merged alpaca run carries (prompts in the alpaca template)."""
    directory = save_tiny_model(tmp_path_factory.mktemp("served"))
    settings = {"base_model": str(directory), "dataset_format": "alpaca", "max_seq_length": 64}
    (directory / "config.yaml").write_text(yaml.safe_dump(settings), encoding="utf-8")
    return directory


class Server:
    """`create_app` under uvicorn in a thread, on a loopback socket bound here (no port race)."""

    def __init__(self, generator: Generator, api_key: str | None = None) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}/v1"
        app = create_app(generator, model_name=NAME, api_key=api_key)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="info"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(20)
        self.socket.close()


@pytest.fixture(scope="module")
def generator(model_dir: Path) -> Generator:
    return Generator.load(model_dir)


@pytest.fixture(scope="module")
def server(generator: Generator) -> Iterator[Server]:
    with Server(generator) as running:
        yield running


def client(server: Server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key=api_key, max_retries=0, timeout=60)


def sft_generate(model_dir: Path, capsys: pytest.CaptureFixture, *args: str) -> str:
    capsys.readouterr()
    assert main(["generate", str(model_dir), "--prompt", QUESTION, *args]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def ask(server: Server, **settings) -> openai.types.chat.ChatCompletion:
    settings = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "temperature": 0,
                "max_tokens": 6, **settings}
    return client(server).chat.completions.create(**settings)


def test_greedy_answers_are_what_sft_generate_prints(server, model_dir, generator, capsys):
    expected = sft_generate(model_dir, capsys, "--max-new-tokens", "6")
    assert expected  # the tiny model says something, so the comparison means something
    answer = ask(server)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].message.role == "assistant"
    assert answer.model == NAME and answer.object == "chat.completion"
    prompt_tokens = generator.prompt_length(QUESTION)
    assert answer.usage.prompt_tokens == prompt_tokens
    assert 1 <= answer.usage.completion_tokens <= 6
    assert answer.usage.total_tokens == prompt_tokens + answer.usage.completion_tokens
    assert answer.choices[0].finish_reason == ("length" if answer.usage.completion_tokens == 6 else "stop")
    with_system = sft_generate(model_dir, capsys, "--max-new-tokens", "6", "--system", "say yes")
    messages = [{"role": "system", "content": "say yes"}, {"role": "user", "content": QUESTION}]
    assert ask(server, messages=messages).choices[0].message.content == with_system


def test_streamed_answer_is_the_same_text_and_ends_with_done(server, model_dir, capsys):
    expected = sft_generate(model_dir, capsys, "--max-new-tokens", "6")
    chunks = list(ask(server, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    # The raw event stream ends with OpenAI's terminator.
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in events)


def test_stop_strings_seed_and_models(server):
    full = ask(server, max_tokens=8).choices[0].message.content
    words = full.split()
    assert len(words) >= 2
    cut = ask(server, max_tokens=8, stop=[words[1]])
    assert words[1] not in cut.choices[0].message.content
    assert full.startswith(cut.choices[0].message.content)
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in ask(server, max_tokens=8, stop=words[1],
                                                                        stream=True) if c.choices)
    assert streamed.strip() == cut.choices[0].message.content
    sampled = [ask(server, temperature=1.0, seed=7, max_tokens=8).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]
    models = client(server).models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client(server).models.retrieve(NAME).id == NAME


def test_stop_cutter_holds_back_what_could_begin_a_stop_string():
    cutter = StopCutter(["END"])
    assert [cutter.feed(piece) for piece in ("ab", "cE", "N", "x", "yEN", "Dz")] == ["ab", "c", "", "ENx", "y", ""]
    assert cutter.finish() == ""
    cutter = StopCutter([])
    assert cutter.feed("abc") == "abc" and cutter.finish() == ""


def test_a_long_stop_string_does_not_stall_the_stream():
    """The stop strings come from the client: a 400,000-character one costs each piece of the answer time in
    proportion to the piece held back, not to the stop string's length squared (seconds a piece, during which the
    server answered nobody)."""
    cutter = StopCutter(["ab" * 200_000])
    began = time.monotonic()
    assert [cutter.feed(word) for word in ("paris ", "is ", "a", "b", " city ", "in ", "a")] == [
        "paris ", "is ", "", "", "ab city ", "in ", ""]
    assert cutter.finish() == "a"
    assert time.monotonic() - began < 1


def test_eight_concurrent_clients_all_get_complete_answers(server):
    expected = ask(server, max_tokens=5).choices[0].message.content
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: ask(server, max_tokens=5, stream=i % 2 == 1), range(8)))
    for i, answer in enumerate(answers):
        if i % 2:
            chunks = list(answer)
            assert "".join(c.choices[0].delta.content or "" for c in chunks).strip() == expected
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        else:
            assert answer.choices[0].message.content == expected


def error_of(response: httpx.Response) -> dict:
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


@pytest.mark.parametrize("body, status, param, says", [
    ("{not json", 400, None, "not valid JSON"),
    ({"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "'gpt-4' does not exist"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens",
     "greater than or equal to 1"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi " * 300}]}, 400, "messages",
     "longer than the model's context of 256 tokens"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500}, 400, "max_tokens",
     "exceed the model's context of 256 tokens"),
    ({"model": NAME, "messages": []}, 400, "messages", "at least 1"),
    ({"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "messages.0.role", "'user'"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "temperature": -1}, 400, "temperature",
     "greater than or equal to 0"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": [5]}, 400, "stop.0", "valid string"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": 5}, 400, "stop",
     "a string or a list of strings"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content.0.type", "Input should be 'text'"),
    ({"model": NAME, "messages": [{"role": "assistant", "content": None}]}, 400, "messages.0.content",
     "a string or a list of content parts"),
    ({"model": NAME, "messages": [{"role": "user", "content": "caf\u00e9 \ud800"}]}, 400, "messages.0.content",
     "lone surrogate at character 5"),
    ({"model": NAME, "messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, 400,
     "messages.0.content.0.text", "lone surrogate"),
    ({"model": "\ud800", "messages": [{"role": "user", "content": "hi"}]}, 400, "model", "lone surrogate"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stop": ["\ud800"]}, 400, "stop.0",
     "lone surrogate"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": True}}, 400,
     "stream_options", "only allowed when stream is true"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": True,
      "stream_options": {"include_usage": "perhaps"}}, 400, "stream_options.include_usage", "valid boolean"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "seed": 2**64}, 400, "seed",
     "less than or equal to 18446744073709551615"),
    ({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1, "stream": True}, 400,
     "seed", "greater than or equal to -9223372036854775808"),
])
def test_bad_requests_get_an_openai_error_naming_the_field(server, body, status, param, says):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}/chat/completions", content=content,
                          headers={"content-type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = error_of(response)
    assert error["param"] == param and says in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_routes_and_methods_get_an_openai_error(server):
    assert error_of(httpx.get(f"{server.url}/completions/nothing", timeout=60))["message"].endswith("Not Found")
    response = httpx.get(f"{server.url}/chat/completions", timeout=60)
    assert response.status_code == 405 and "Method Not Allowed" in error_of(response)["message"]


def test_bad_requests_through_the_openai_client(server):
    with pytest.raises(openai.NotFoundError) as raised:
        ask(server, model="gpt-4")
    assert raised.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as raised:
        ask(server, messages=[{"role": "user", "content": "hi " * 300}])
    assert raised.value.body["code"] == "context_length_exceeded"
    assert "301 tokens" in raised.value.body["message"] or "tokens, longer than" in raised.value.body["message"]


def test_api_key_is_required_and_never_logged(generator, caplog):
    caplog.set_level(logging.DEBUG)
    with Server(generator, api_key=KEY) as keyed:
        for bad in ("", "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x"):
            headers = {"authorization": bad} if bad else {}
            for method, path in (("GET", "/models"), ("POST", "/chat/completions")):
                response = httpx.request(method, f"{keyed.url}{path}", headers=headers, content="{bad json",
                                         timeout=60)
                assert response.status_code == 401, (bad, path)
                assert error_of(response)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(keyed, api_key="wrong").models.list()
        answer = client(keyed, api_key=KEY).chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": QUESTION}], max_tokens=3, temperature=0)
        assert answer.choices[0].message.content is not None
    assert KEY not in caplog.text


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_finishes_the_answer_in_flight_then_exits_0(model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(BACKEND), "SFT_API_KEY": KEY}
    log = tmp_path / "server.log"
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", "app.sft", "serve", str(model_dir), "--port", str(port),
                                    "--model-name", NAME], env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"{url}/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        remote = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60)
        streams = [remote.chat.completions.create(model=NAME, messages=[{"role": "user", "content": QUESTION}],
                                                  max_tokens=220, temperature=0, stream=True) for _ in range(4)]
        # Each answer has begun (its first event came); they are generated one after another, so most of the
        # tokens are still to come when SIGTERM arrives.
        firsts = [next(iter(stream)) for stream in streams]
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        arrivals = []
        for first, stream in zip(firsts, streams, strict=True):
            chunks = [first]
            for chunk in stream:
                chunks.append(chunk)
                arrivals.append(time.monotonic())
            assert chunks[-1].choices[0].finish_reason == "length"
            assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 100
        assert max(arrivals) > signalled  # answers were in flight at the signal, and were finished
        assert process.wait(60) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert "127.0.0.1" in text and "(API key required)" in text and KEY not in text


def test_help_names_the_routes_the_loopback_default_and_vllm(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    for expected in ("/v1/chat/completions", "default 127.0.0.1", "SFT_API_KEY", "vllm serve outputs/demo/merged"):
        assert expected in out


def test_a_plain_text_model_is_refused_before_serving(model_dir, capsys):
    assert main(["serve", str(model_dir), "--set", "dataset_format=completion", "--port", str(free_port())]) == 2
    assert "serve needs a model trained on alpaca or chat data" in capsys.readouterr().err


def test_a_failing_answer_gets_an_openai_server_error_and_the_next_request_is_served(model_dir):
    """A run that diverged saved NaN weights: sampling from it fails inside generation. The client gets OpenAI's
    error shape (not a plain-text 500), in a stream too, and the worker goes on answering."""
    diverged = Generator.load(model_dir)
    with torch.no_grad():
        diverged.model.lm_head.weight.fill_(float("nan"))
    body = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3, "temperature": 1}
    with Server(diverged) as running:
        response = httpx.post(f"{running.url}/chat/completions", json=body, timeout=60)
        assert response.status_code == 500 and response.headers["content-type"] == "application/json"
        error = error_of(response)
        assert error["type"] == "server_error" and error["message"].startswith("the answer failed: RuntimeError")
        with httpx.stream("POST", f"{running.url}/chat/completions", json={**body, "stream": True},
                          timeout=60) as streamed:
            events = [json.loads(line[6:]) for line in streamed.iter_lines() if line.startswith("data: {")]
        assert set(events[-1]["error"]) == {"message", "type", "param", "code"}
        assert events[-1]["error"]["type"] == "server_error"
        greedy = httpx.post(f"{running.url}/chat/completions", json={**body, "temperature": 0}, timeout=60)
        assert greedy.status_code == 200 and greedy.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_vanishing_temperature_answers_greedily_instead_of_failing(server):
    """OpenAI takes any temperature in [0, 2]; dividing the logits by 1e-300 overflows them, so (as in vLLM) a
    temperature this close to 0 decodes greedily."""
    greedy = ask(server, max_tokens=5).choices[0].message.content
    for tiny in (1e-300, 1e-45, 1e-6):
        assert ask(server, max_tokens=5, temperature=tiny).choices[0].message.content == greedy


@pytest.mark.parametrize("content, content_type", [
    (json.dumps({"model": NAME, "messages": [{"role": "user", "content": "hi"}]}), "application/x-www-form-urlencoded"),
    ("[1, 2]", "application/json"),
    ("", "application/json"),
])
def test_a_body_that_is_not_a_json_object_is_told_what_to_send(server, content, content_type):
    """`curl -d '{...}'` without `-H 'Content-Type: application/json'` sends a form: the error says what is needed."""
    response = httpx.post(f"{server.url}/chat/completions", content=content, headers={"content-type": content_type},
                          timeout=60)
    assert response.status_code == 400
    error = error_of(response)
    assert "the request body should be a JSON object sent with Content-Type: application/json" in error["message"]
    assert f"(this one: {content_type}" in error["message"]


LONG = {"model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 220, "temperature": 0}
"""A request the tiny model answers with all 220 tokens (a quarter of a second)."""


def counting_forwards(model_dir: Path) -> tuple[Generator, list[int]]:
    """A generator of the tiny model, and the list its every forward pass appends to."""
    watched = Generator.load(model_dir)
    forwards: list[int] = []
    watched.model.register_forward_hook(lambda *_: forwards.append(1))
    return watched, forwards


def test_a_client_that_disconnects_mid_stream_stops_its_answer_and_the_next_is_served(model_dir, caplog):
    """Ctrl-C in a streaming chat: the worker stops generating for nobody (as vLLM aborts the request) and answers
    the next request at once; nothing is logged as an error."""
    watched, forwards = counting_forwards(model_dir)
    with Server(watched) as running:
        url = f"{running.url}/chat/completions"
        expected = httpx.post(url, json={**LONG, "max_tokens": 3}, timeout=60).json()["choices"][0]["message"]
        forwards.clear()
        with httpx.stream("POST", url, json={**LONG, "stream": True}, timeout=60) as streamed:
            lines = streamed.iter_lines()
            while '"content": ""' in (line := next(lines)) or not line:  # up to the first piece of the answer
                pass
        following = httpx.post(url, json={**LONG, "max_tokens": 3}, timeout=60)
        assert following.status_code == 200 and following.json()["choices"][0]["message"] == expected
        assert len(forwards) < 50  # the abandoned answer's 220 tokens were not all generated
    gc.collect()  # an abandoned answer's failure is not left to be reported as never retrieved
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_every_chunk_of_a_stream_has_the_same_id_and_created_time(server):
    """OpenAI: "each chunk has the same timestamp". A stream queued behind long answers starts at once (its first
    chunk) and ends seconds later."""
    with ThreadPoolExecutor(6) as pool:
        queued = [pool.submit(httpx.post, f"{server.url}/chat/completions", json=LONG, timeout=60)
                  for _ in range(6)]
        time.sleep(0.1)
        chunks = list(ask(server, max_tokens=3, stream=True))  # spans the queue's answers: over a second here
        assert all(answer.result().status_code == 200 for answer in queued)
    assert len({chunk.created for chunk in chunks}) == 1 and len({chunk.id for chunk in chunks}) == 1


def test_a_long_prompt_being_tokenized_does_not_hold_up_the_other_clients(server):
    """Reading a 1,200,000-word prompt takes seconds; meanwhile the server goes on answering (here /v1/models),
    rather than every client, streams included, waiting for it."""
    long_body = {"model": NAME, "messages": [{"role": "user", "content": "hi " * 1_200_000}]}
    with ThreadPoolExecutor(1) as pool:
        refused = pool.submit(httpx.post, f"{server.url}/chat/completions", json=long_body, timeout=120)
        time.sleep(0.3)  # its body has arrived; its tokens are being counted
        began = time.monotonic()
        assert httpx.get(f"{server.url}/models", timeout=60).status_code == 200
        assert time.monotonic() - began < 1
        assert error_of(refused.result())["code"] == "context_length_exceeded"


def test_a_request_whose_client_gave_up_while_queued_is_not_answered(model_dir, caplog):
    """The openai client gives up after its timeout (and sends the request again): the copy it left in the queue
    costs the worker nothing."""
    watched, forwards = counting_forwards(model_dir)
    with Server(watched) as running, ThreadPoolExecutor(3) as pool:
        url = f"{running.url}/chat/completions"
        ahead = [pool.submit(httpx.post, url, json=LONG, timeout=60) for _ in range(3)]
        time.sleep(0.1)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(url, json=LONG, timeout=0.1)  # waits behind the three, and gives up
        assert [answer.result().json()["usage"]["completion_tokens"] for answer in ahead] == [220] * 3
        assert httpx.post(url, json={**LONG, "max_tokens": 1}, timeout=60).status_code == 200
    assert len(forwards) == 3 * 220 + 1
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_optional_fields_sent_as_null_mean_their_defaults(server):
    """OpenAI's API (and vLLM) take null for its optional fields; some clients send every field they know."""
    nulls = dict.fromkeys(("temperature", "top_p", "n", "stream", "stream_options", "seed", "stop",
                           "max_completion_tokens"))
    response = httpx.post(f"{server.url}/chat/completions", timeout=60, json={
        "model": NAME, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3, **nulls})
    assert response.status_code == 200, response.text
    assert response.json()["object"] == "chat.completion" and response.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("template_name, use_chat_template", [("alpaca", True), ("tokenizer", False)])
def test_a_conversation_the_chat_template_refuses_is_a_400_naming_messages(template_name, use_chat_template):
    """A merged run renders prompts with the chat template saved in its tokenizer, a bare model with its own; a
    conversation the template refuses (its raise_exception: here a system message after the first) is the
    client's error, as with a template object, not a server error."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = chat_template_for(AlpacaTemplate(), tokenizer)
    config = SFTConfig(base_model="tiny", dataset_format="alpaca" if use_chat_template else "chat",
                       template_name=template_name)
    served = Generator(tiny_llama(), tokenizer, config, use_chat_template=use_chat_template)
    assert served.use_chat_template == use_chat_template and served.template.name == template_name
    with Server(served) as running:
        assert ask(running, max_tokens=2).choices[0].finish_reason in ("stop", "length")
        response = httpx.post(f"{running.url}/chat/completions", timeout=60, json={
            "model": NAME, "messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "no"}]})
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["param"] == "messages" and "unsupported role system" in error["message"]
