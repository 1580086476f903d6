"""serve.py's log-probabilities: OpenAI's shapes on chat and completions, echo, and the values
against our own model's log-probabilities of the same tokens (what lm-eval's local-completions
scores with)."""
import math

import pytest
import torch

from chat_gpt2 import chat
from chat_gpt2.batcher import scored_tokens
from chat_gpt2.engine import Completion
from test_serve import GREEDY, HELLO, ckpt, post, server, service  # noqa: F401  (fixtures)

openai = pytest.importorskip("openai")


def model_logprobs(service, ids):
    """log P(ids[i] | ids[:i]) for i >= 1 and the full distributions, from the model itself (fp32)."""
    model = service.engine.model
    with torch.no_grad():
        logits = model.lm_head(model.hidden_states(torch.tensor([ids])))[0].float()
    logits[:, chat.VOCAB_SIZE:] = float("-inf")
    logp = logits.log_softmax(-1)
    return [logp[i - 1, ids[i]].item() for i in range(1, len(ids))], logp


def test_completion_echo_logprobs_are_the_models(server, service):  # noqa: F811
    enc = chat.get_encoder()
    prompt = enc.encode_ordinary("Once upon a time there was")
    r = post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "logprobs": 3, "echo": True,
                                         **GREEDY})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    n = len(prompt) + r.json()["usage"]["completion_tokens"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) == n
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert "".join(lp["tokens"]) == choice["text"] and choice["text"].startswith("Once upon a time there was")
    assert lp["text_offset"] == [len("".join(lp["tokens"][:i])) for i in range(n)]
    ids = enc.encode_ordinary(choice["text"])
    assert len(ids) == n  # these tokens re-encode to themselves (ASCII words)
    expected, logp = model_logprobs(service, ids)
    assert lp["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
    for i in range(1, n):
        top = lp["top_logprobs"][i]
        assert len(top) == 3 and list(top.values()) == sorted(top.values(), reverse=True)
        best = torch.topk(logp[i - 1], 3)
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
        if i >= len(prompt):  # greedy: the generated token is the most likely one
            assert lp["token_logprobs"][i] == pytest.approx(max(top.values()), abs=1e-6)


def test_lm_eval_local_completions_request(server, service):  # noqa: F811
    """What lm-eval's local-completions sends for loglikelihood: token-id prompts (context +
    continuation), max_tokens 1, echo, logprobs 1; it sums token_logprobs[ctxlen:-1] and checks
    greediness against top_logprobs."""
    enc = chat.get_encoder()
    pairs = [("The capital of France is", " Paris"), ("Two plus two is", " four and not five")]
    prompts = [enc.encode_ordinary(c) + enc.encode_ordinary(x) for c, x in pairs]
    r = post(server, "/v1/completions", {"model": "tiny", "prompt": prompts, "temperature": 0, "max_tokens": 1,
                                         "logprobs": 1, "seed": 1234, "echo": True})
    assert r.status_code == 200, r.text
    for choice, (context, _), ids in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), pairs, prompts):
        ctxlen = len(enc.encode_ordinary(context))
        got = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        expected, logp = model_logprobs(service, ids)
        assert len(got) == len(ids) - ctxlen
        assert sum(got) == pytest.approx(sum(expected[ctxlen - 1:]), abs=1e-3)
        greedy = all(logp[i - 1].argmax().item() == ids[i] for i in range(ctxlen, len(ids)))
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        assert greedy == all(tok == max(top.values()) for tok, top in zip(got, tops))


def test_chat_logprobs_with_the_openai_client(server, service):  # noqa: F811
    from chat_gpt2.server import ChatRequest
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    r = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, logprobs=True, top_logprobs=2,
                                       **GREEDY)
    content = r.choices[0].logprobs.content
    assert len(content) >= r.usage.completion_tokens and content
    req = ChatRequest(messages=HELLO, max_tokens=6, **GREEDY)
    prompt = service.chat_prompt(req.messages, service.params(req, chat_stop=True))
    reply = [chat.get_encoder().encode_single_token(bytes(t.bytes)) for t in content]
    expected, _ = model_logprobs(service, prompt + reply)
    assert [t.logprob for t in content] == pytest.approx(expected[len(prompt) - 1:], abs=1e-4)
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-6)
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
    assert all(math.isfinite(t.logprob) and t.logprob <= 0 for t in content)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=6, **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content


def test_logprobs_refusals(server):  # noqa: F811
    for path, body, param in (
            ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "stream": True}, "logprobs"),
            ("/v1/chat/completions", {"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
            ("/v1/chat/completions", {"messages": HELLO, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
            ("/v1/completions", {"prompt": "Hi", "logprobs": 6}, "logprobs"),
            ("/v1/completions", {"prompt": "Hi", "echo": True, "stream": True}, "echo"),
            ("/v1/completions", {"prompt": [1] * 127, "echo": True, "max_tokens": 2}, "prompt")):
        r = post(server, path, body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = post(server, "/v1/completions", {"prompt": [1] * 127, "echo": True, "max_tokens": 1, "logprobs": 0})
    assert r.status_code == 200 and len(r.json()["choices"][0]["logprobs"]["tokens"]) >= 127


def test_a_reply_ended_by_end_of_text_is_scored_with_it():
    enc = chat.get_encoder()
    reply = Completion(enc, stops=("\n",))
    for token in enc.encode_ordinary(" Hello") + [chat.EOT]:
        reply.add(token)
    assert scored_tokens(reply) == enc.encode_ordinary(" Hello") + [chat.EOT]
    cut = Completion(enc, stops=("lo",))
    for token in enc.encode_ordinary(" Hello"):
        cut.add(token)
    assert cut.finish_reason == "stop" and scored_tokens(cut) == enc.encode_ordinary(" Hello")
