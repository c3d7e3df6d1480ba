"""The OpenAI API end to end: the real `openai` client (and raw httpx for bad input) against a real
uvicorn server running the reference engine on the tiny two-member ensemble (conftest.py)."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ensemble.protocol import RequestOutput, SamplingOptions

PROMPT = "The quick brown fox"
MAX_LEN = 1024  # tiny Qwen2 max_position_embeddings


async def collect_engine(engine, prompt_ids: list[int], options: SamplingOptions) -> RequestOutput:
    """Run one request on the engine directly (no HTTP) and return its final output."""
    last = None
    async for out in engine.generate(prompt_ids, options, "direct-check"):
        last = out
    return last


def test_models_lists_the_ensemble_with_members(client: openai.OpenAI, torch_server) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["pair", "alpha", "beta"]  # the ensemble, then each member by name
    assert [m.model_dump().get("parent") for m in models[1:]] == ["pair", "pair"]
    card = models[0].model_dump()
    assert card["id"] == "pair" and card["object"] == "model" and card["max_model_len"] == MAX_LEN
    ens = card["ensemble"]
    assert [m["name"] for m in ens["members"]] == ["alpha", "beta"]
    assert ens["weights"] == [1.0, 2.0] and ens["rule"] == "prob_mean" and ens["engine"] == "reference"


def test_health_and_metrics_need_no_key(torch_server) -> None:
    assert httpx.get(f"{torch_server.url}/health").status_code == 200
    text = httpx.get(f"{torch_server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds",
                 "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
                 "vllm:request_success_total"):
        assert f'{name}' in text, name
    assert 'model_name="pair"' in text


def test_completion_basic_with_usage(client: openai.OpenAI, torch_server) -> None:
    before = torch_server.metric("vllm:generation_tokens_total")
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and out.model == "pair" and out.id.startswith("cmpl-")
    assert choice.finish_reason == "length" and isinstance(choice.text, str) and choice.text
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 4 and out.usage.total_tokens == 9
    assert torch_server.metric("vllm:generation_tokens_total") - before == 5
    assert torch_server.metric("vllm:request_success_total", finished_reason="length") >= 1


def test_metrics_export_the_ensemble_counters(client: openai.OpenAI, torch_server) -> None:
    """After a completion, /metrics carries pooled tokens, per-member agreement and pooling time."""
    before = {name: torch_server.metric(name) for name in ("chorus:pooled_tokens_total",
                                                           "chorus:pooling_time_seconds_count")}
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.usage.completion_tokens == 4
    pooled = torch_server.metric("chorus:pooled_tokens_total")
    assert pooled - before["chorus:pooled_tokens_total"] == 4
    assert torch_server.metric("chorus:pooling_time_seconds_count") - before["chorus:pooling_time_seconds_count"] == 4
    assert torch_server.metric("chorus:pooling_time_seconds_sum") > 0.0
    families = text_string_to_metric_families(httpx.get(f"{torch_server.url}/metrics").text)
    members = {s.labels["member"] for f in families for s in f.samples if s.name == "chorus:member_agreement_total"}
    assert members == {"alpha", "beta"}
    for member in members:
        agreed = torch_server.metric("chorus:member_agreement_total", member=member)
        assert 0 <= agreed <= pooled
        assert torch_server.metric("chorus:member_agreement_ratio", member=member) == pytest.approx(agreed / pooled)


def test_completion_logprobs_equal_the_engines(client: openai.OpenAI, torch_server) -> None:
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    ids = torch_server.run(torch_server.state.ready.tokenization.encode(PROMPT, True))
    direct = torch_server.run(collect_engine(torch_server.engine, ids, SamplingOptions(
        max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True)))
    completion = direct.outputs[0]
    assert "".join(lp.tokens) == completion.text == out.choices[0].text
    for got, want in zip(lp.token_logprobs, completion.logprobs):
        assert math.isclose(got, want.logprob, abs_tol=1e-6)
    for top, want in zip(lp.top_logprobs, completion.logprobs):
        assert len(top) >= 3  # top 3 plus the chosen token when it is not among them
        tok = torch_server.state.ready.tokenization
        for tid, value in want.top:
            assert math.isclose(top[tok.token_str(tid)], value, abs_tol=1e-6)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=2, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) for v in lp.token_logprobs[1:])
    assert len(lp.tokens) == out.usage.prompt_tokens + out.usage.completion_tokens
    assert "".join(lp.tokens) == choice.text


def test_echo_with_max_tokens_zero_scores_the_prompt_alone(client: openai.OpenAI, http: httpx.Client) -> None:
    """vLLM's `max_tokens: 0` with `echo` (sent by newer lm-eval clients): the prompt and its
    log-probs, nothing generated; the prompt's scores equal those of `max_tokens: 1`."""
    one = client.completions.create(model="pair", prompt=PROMPT, max_tokens=1, temperature=0, echo=True, logprobs=1)
    zero = client.completions.create(model="pair", prompt=PROMPT, max_tokens=0, temperature=0, echo=True, logprobs=1)
    choice = zero.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert zero.usage.completion_tokens == 0 and len(choice.logprobs.tokens) == zero.usage.prompt_tokens
    assert choice.logprobs.token_logprobs == one.choices[0].logprobs.token_logprobs[:-1]
    assert choice.logprobs.top_logprobs == one.choices[0].logprobs.top_logprobs[:-1]
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    batch = http.post("/v1/completions", json={"prompt": [ids, ids[:2]], "max_tokens": 0, "echo": True}).json()
    assert [c["text"] for c in batch["choices"]] == [PROMPT, "The quick"] and batch["choices"][0]["logprobs"] is None
    chunks = list(client.completions.create(model="pair", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT
    assert chunks[-1].choices[0].finish_reason == "length"
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == choice.logprobs.token_logprobs


def test_max_tokens_zero_without_echo_is_a_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    assert "echo" in r.json()["error"]["message"]


def test_echo_without_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert out.choices[0].text.startswith(PROMPT) and out.choices[0].logprobs is None


def test_n_and_batch_prompts(client: openai.OpenAI) -> None:
    out = client.completions.create(model="pair", prompt=["Hello", "One two"], n=2, max_tokens=3, temperature=1.0,
                                    seed=3, extra_body={"ignore_eos": True})
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.completion_tokens == 12
    assert out.usage.prompt_tokens == 1 + 2


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        out = client.completions.create(model="pair", prompt=PROMPT, n=2, max_tokens=4, temperature=1.0, seed=seed,
                                        extra_body={"ignore_eos": True})
        return [c.text for c in out.choices]

    a, b, c = sample(11), sample(11), sample(12)
    assert a == b and a != c


def test_stop_string_ends_the_completion(client: openai.OpenAI) -> None:
    free = client.completions.create(model="pair", prompt=PROMPT, max_tokens=8, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = free[2:5] if len(free) >= 5 else free[-1]
    out = client.completions.create(model="pair", prompt=PROMPT, max_tokens=8, temperature=0, stop=[stop],
                                    extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert choice.finish_reason == "stop" and stop not in choice.text and free.startswith(choice.text)
    assert choice.model_extra.get("stop_reason") == stop


def test_completion_streaming_with_usage(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="pair", prompt=PROMPT, max_tokens=5, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    chunks = list(client.completions.create(model="pair", prompt=PROMPT, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.usage is None for c in text_chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 4


def test_completion_streaming_logprobs_offsets_continue(client: openai.OpenAI) -> None:
    chunks = [c for c in client.completions.create(model="pair", prompt=PROMPT, max_tokens=4, temperature=0,
                                                   stream=True, logprobs=1, extra_body={"ignore_eos": True})]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    tokens = [t for c in chunks for t in c.choices[0].logprobs.tokens]
    assert len(tokens) == 4 and offsets[0] == 0
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_chat_completion(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Hi there"}],
                                         max_tokens=4, temperature=0)
    msg = out.choices[0].message
    assert out.object == "chat.completion" and msg.role == "assistant" and isinstance(msg.content, str)
    assert out.usage.completion_tokens <= 4 and out.usage.prompt_tokens > 5


def test_chat_uses_the_template_and_max_completion_tokens(client: openai.OpenAI, http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    tokenized = http.post("/tokenize", json={"messages": messages}).json()
    out = client.chat.completions.create(model="pair", messages=messages, max_completion_tokens=2, temperature=0)
    assert out.usage.prompt_tokens == tokenized["count"] and out.usage.completion_tokens <= 2
    no_gen = http.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).json()
    assert no_gen["count"] < tokenized["count"]


def test_chat_echo_prepends_the_continued_assistant_message(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Well, "}]
    args = dict(model="pair", messages=messages, max_tokens=3, temperature=0,
                extra_body={"add_generation_prompt": False, "continue_final_message": True, "ignore_eos": True})
    plain = client.chat.completions.create(**args).choices[0].message.content
    echoed = client.chat.completions.create(**{**args, "extra_body": {**args["extra_body"], "echo": True}})
    assert echoed.choices[0].message.content == "Well, " + plain
    streamed = client.chat.completions.create(**{**args, "extra_body": {**args["extra_body"], "echo": True}},
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == "Well, " + plain
    # The last message is the user's: nothing to echo when the assistant answers.
    user_only = dict(model="pair", messages=messages[:1], max_tokens=3, temperature=0)
    assert (client.chat.completions.create(**user_only, extra_body={"echo": True}).choices[0].message.content
            == client.chat.completions.create(**user_only).choices[0].message.content)


def test_chat_logprobs_shape(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert isinstance(entry.token, str) and entry.logprob <= 0 and isinstance(entry.bytes, list)
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace") == out.choices[0].message.content


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="pair", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0, stream=True,
        stream_options={"include_usage": True}, n=2))
    assert chunks[0].choices[0].delta.role == "assistant"
    by_index: dict[int, str] = {}
    finish = {}
    for c in chunks:
        for ch in c.choices:
            by_index[ch.index] = by_index.get(ch.index, "") + (ch.delta.content or "")
            if ch.finish_reason:
                finish[ch.index] = ch.finish_reason
    assert set(by_index) == {0, 1} and set(finish) == {0, 1}
    assert by_index[0] == by_index[1]  # greedy: both completions agree
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert 2 <= usage.completion_tokens <= 8 and usage.completion_tokens % 2 == 0


def test_ensemble_extras_reach_the_engine(client: openai.OpenAI, torch_server) -> None:
    base = dict(model="pair", prompt=PROMPT, max_tokens=3, temperature=0, logprobs=0)
    default = client.completions.create(**base).choices[0].logprobs.token_logprobs
    geo = client.completions.create(**base, extra_body={"pooling": "logprob_mean"}).choices[0].logprobs.token_logprobs
    only_beta = client.completions.create(**base, extra_body={"member_weights": {"alpha": 0, "beta": 1},
                                                              "return_member_logprobs": True})
    assert default != geo
    choice = only_beta.choices[0].model_dump()
    members = choice["member_logprobs"]
    assert len(members) == 3 and set(members[0]) == {"alpha", "beta"}
    for pooled, per_member in zip(choice["logprobs"]["token_logprobs"], members):
        assert math.isclose(pooled, per_member["beta"], abs_tol=1e-5)  # all the weight on beta
    assert torch_server.metric("chorus:member_chosen_logprob_count", member="beta") >= 3


def test_engine_request_error_is_a_400(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "x", "member_weights": [1, -1]})
    assert r.status_code == 400 and "negative weights" in r.json()["error"]["message"]


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "hello world", "return_token_strs": True}).json()
    assert r == {"count": 2, "max_model_len": MAX_LEN, "tokens": r["tokens"], "token_strs": ["hello", "Ġworld"]}
    back = http.post("/detokenize", json={"tokens": r["tokens"]}).json()
    assert back == {"prompt": "hello world"}
    assert http.post("/detokenize", json={"tokens": [10**7]}).status_code == 400


# ----------------------------------------------------------------------------- errors


def test_wrong_api_key_is_401(torch_server) -> None:
    bad = openai.OpenAI(base_url=f"{torch_server.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.models.list()
    assert err.value.status_code == 401
    body = httpx.post(f"{torch_server.url}/v1/completions", json={"prompt": "x"}).json()
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["code"] == "invalid_api_key"
    assert httpx.post(f"{torch_server.url}/tokenize", json={"prompt": "x"}).status_code == 401


@pytest.mark.parametrize(
    "content, param",
    [
        (b'{"prompt": "x", "max_tokens": 8', None),  # broken JSON
        (b"", None),
        (b"[1, 2]", None),
        (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
        (b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
        (b'{"prompt": "x", "n": 1000}', "n"),
        (b'{"prompt": 5}', "prompt"),
        (b'{"prompt": [1, 99999999]}', "prompt"),
        (b'{"prompt": [1, 108742018124409536]}', "prompt"),  # found by the schema fuzz: was a 500
        (b'{"prompt": [[5], [1, 108742018124409536]]}', "prompt"),
        (b'{"prompt": "x", "top_p": 1.5}', "top_p"),
        (b'{"prompt": "x", "temperature": NaN}', "temperature"),
        (b'{"prompt": "x", "stop": [""]}', "stop"),
        (b'{"prompt": "x", "member_weights": {"alpha": 1}}', "member_weights"),
    ],
)
def test_bad_input_is_400_in_openai_shape(http: httpx.Client, content: bytes, param) -> None:
    r = http.post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] == param


def test_oversize_prompt_is_400_with_the_numbers(http: httpx.Client, client: openai.OpenAI) -> None:
    prompt = [9707] * 1000  # token ids: an exact prompt length
    r = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 30})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    assert f"maximum context length is {MAX_LEN} tokens" in err["message"]
    assert "1030 tokens (1000 in the prompt, 30 in the completion)" in err["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="pair", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_LEN)
    assert exc.value.code == "context_length_exceeded"


def test_a_member_is_served_alone_by_its_name(client: openai.OpenAI, http: httpx.Client, torch_server) -> None:
    """`model: "alpha"` answers with that member's own next-token distribution (temperature 1, no
    pooling), computed here with transformers from the member's folder, and says so in `model`."""
    import torch
    from transformers import AutoModelForCausalLM

    out = client.completions.create(model="alpha", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=5,
                                    extra_body={"ignore_eos": True})
    assert out.model == "alpha"
    engine = torch_server.engine
    ids = torch_server.run(torch_server.state.ready.tokenization.encode(PROMPT, True))
    member = AutoModelForCausalLM.from_pretrained(engine.manifest.members[0].path, torch_dtype=torch.float32)
    with torch.no_grad():
        logits = member(torch.tensor([ids])).logits[0, -1, : engine.manifest.vocab_size]
    own = torch.log_softmax(logits.float(), dim=-1)
    tok = torch_server.state.ready.tokenization
    best = [(tok.token_str(int(i)), float(own[i])) for i in own.topk(5).indices]
    got = out.choices[0].logprobs.top_logprobs[0]
    for text, value in best:
        assert math.isclose(got[text], value, abs_tol=1e-4), (text, got.get(text), value)
    assert out.choices[0].logprobs.tokens[0] == best[0][0]
    chunks = list(client.chat.completions.create(model="beta", messages=[{"role": "user", "content": "Hi"}],
                                                 max_tokens=2, stream=True))
    assert {c.model for c in chunks} == {"beta"}
    for extra, param in (({"member_weights": {"alpha": 1.0}}, "member_weights"), ({"pooling": "prob_mean"}, "pooling")):
        r = http.post("/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 1, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_unknown_model_is_404_and_unknown_route_too(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "serves `pair`, `alpha`, `beta`" in r.json()["error"]["message"]
    assert http.get("/v1/nothing").status_code == 404
    assert http.get("/v1/completions").status_code == 405


def test_chat_bad_messages(http: httpx.Client) -> None:
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                 {"messages": [{"role": "user", "content": "x"}], "chat_template": "{{ 1 }}"}):
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, (body, r.text)
