"""chat_gpt2/engine.py and sampling.py, the generation core: the KV cache == the uncached reference
(the oracle, below), the crop policy, the sampling options and math, stop strings and streaming,
rows joining and leaving, half precision (weights and KV cache converted), the PromptCache."""
from dataclasses import fields

import pytest
import torch
import torch.nn.functional as F

import helpers
from chat_gpt2 import chat
from chat_gpt2 import inference
from chat_gpt2.errors import ConfigError
from chat_gpt2.engine import Decoder, Engine, KVCache, PromptCache, Request, cache_dtype, crop_start
from chat_gpt2.sampling import (SAMPLING_KEYS, SERVER_ONLY, SamplingParams, adjust_logits, sample_next, sampling_defaults,
                                sampling_help)
from chat_gpt2.inference import load_engine
from model import GPT, REFINE_TOP, GPTConfig

NEG_INF = float("-inf")


@torch.no_grad()
def reference(model, prompt, new, n=1, generator=None, **sampling):
    """The oracle: n replies' tokens to prompt without a KV cache. Every step runs each row's whole
    window (cropped by crop_start) through the model; the rows still going draw together (as a
    Decoder's rows of one request do); a row ends at <|endoftext|> (not included); the padded
    vocabulary is never sampled."""
    params = SamplingParams(max_new_tokens=new, **sampling)
    generator = generator if generator is not None else params.generator()
    rows, replies, live, start = [list(prompt) for _ in range(n)], [[] for _ in range(n)], [*range(n)], 0
    for _ in range(new):
        if not live:
            break
        start = crop_start(len(rows[live[0]]), start, model.config.block_size)  # live rows: one length
        logits = model(torch.tensor([rows[r][start:] for r in live]))[0][:, -1].float()
        logits[:, chat.VOCAB_SIZE:] = NEG_INF
        history = torch.tensor([rows[r] for r in live]) if params.repetition_penalty != 1.0 else None
        for r, token in zip(list(live), sample_next(logits, params, history, generator).tolist()):
            if token == chat.EOT:
                live.remove(r)
            else:
                rows[r].append(token)
                replies[r].append(token)
    return replies


def decoded(model, prompt, new, n=1, generator=None, **sampling):
    """The same through the Engine (one request, n replies): their tokens."""
    request = Request(prompt, SamplingParams(max_new_tokens=new, stop=(), **sampling), n, generator)
    Engine(model).complete([request])
    return [reply.tokens for reply in request.replies]


def adjust(logits, history=None, **sampling):
    """adjust_logits with the sampling options as keywords (temperature 1 unless given)."""
    return adjust_logits(logits, SamplingParams(**{"temperature": 1.0, **sampling}), history)


def draw(logits, history=None, generator=None, **sampling):
    return sample_next(logits, SamplingParams(**{"temperature": 1.0, **sampling}), history, generator)


def generate_batch(model, prompts, max_new_tokens, stop=(), on_text=None, generator=None, **sampling):
    """The replies (stripped text) to prompts, one request each, decoded together; on_text(row, text)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop, **sampling)
    stream = lambda row: None if on_text is None else lambda choice, text: on_text(row, text)  # noqa: E731
    requests = [Request(prompt, params, 1, generator, stream(row)) for row, prompt in enumerate(prompts)]
    Engine(model).complete(requests)
    return [request.replies[0].text.strip() for request in requests]


def generate_replies(model, prompt, max_new_tokens, stop=(), num_samples=1, generator=None, **sampling):
    params = SamplingParams(max_new_tokens=max_new_tokens, stop=stop, **sampling)
    request = Request(prompt, params, num_samples, generator)
    Engine(model).complete([request])
    return [reply.text.strip() for reply in request.replies]


def prompts(batch, length, seed=0):
    return torch.randint(0, 50257, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return helpers.tiny_model(block_size=32)


# ---------------------------------------------------------------------------------------------------------------
# KV cache == the uncached reference


SAMPLING = {
    "greedy": dict(temperature=0.0),
    "greedy+penalty": dict(temperature=0.0, repetition_penalty=1.5),
    "sampled": dict(temperature=1.0),
    "top_k+top_p+penalty": dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.3),
}


@pytest.mark.parametrize("prompt_len, new", [(5, 20), (10, 70), (45, 10)],
                         ids=["inside-block", "past-block-several-rebuilds", "prompt-longer-than-block"])
@pytest.mark.parametrize("mode", SAMPLING)
def test_cached_equals_uncached(model, prompt_len, new, mode):
    prompt = prompts(1, prompt_len)[0].tolist()
    runs = [run(model, prompt, new, n=2, generator=torch.Generator().manual_seed(7), **SAMPLING[mode])
            for run in (decoded, reference)]
    assert runs[0] == runs[1]
    assert len(set(runs[0][0])) > 3  # a real test: the model does not just repeat one token


@pytest.mark.parametrize("tiny_model", [dict(block_size=16, flash=False)], indirect=True, ids=["manual"])
def test_cached_equals_uncached_manual_attention(tiny_model):
    prompt = prompts(1, 6)[0].tolist()
    greedy = dict(temperature=0.0)
    assert decoded(tiny_model, prompt, 30, **greedy) == reference(tiny_model, prompt, 30, **greedy)


def test_long_generation_rebuilds_the_window_many_times():
    model = helpers.tiny_model(block_size=8, n_layer=1, vocab_size=256)  # small head: fast steps
    kwargs = dict(temperature=0.0, repetition_penalty=1.2)
    assert decoded(model, [1, 2, 3], 300, **kwargs) == reference(model, [1, 2, 3], 300, **kwargs)


def test_seed_makes_sampling_reproducible(model):
    prompt = prompts(1, 5)[0].tolist()
    run = [decoded(model, prompt, 20, temperature=1.0, generator=torch.Generator().manual_seed(s))
           for s in (1, 1, 2)]
    assert run[0] == run[1] and run[0] != run[2]
    assert decoded(model, prompt, 20, temperature=1.0, seed=1) == run[0]  # params.seed: the same generator


def test_crop_policy():
    assert crop_start(32, 0, 32) == 0  # fits: nothing dropped
    assert crop_start(33, 0, 32) == 33 - 24  # over: keep the newest 3/4 of the window
    assert crop_start(40, 9, 32) == 9  # the window stays put until it is full again
    assert crop_start(42, 9, 32) == 42 - 24
    assert crop_start(5, 0, 1) == 4 and crop_start(3, 0, 2) == 1  # tiny windows keep at least one token


def test_generation_follows_the_crop_policy_and_never_fails(model):
    """An independent, obvious implementation of the documented policy gives the same tokens."""
    for block_size, prompt_len in ((32, 30), (4, 3), (1, 2)):
        small = helpers.tiny_model(block_size=block_size)
        seq, start = prompts(1, prompt_len)[0].tolist(), 0
        expected = []
        for _ in range(40):
            start = crop_start(len(seq), start, block_size)
            with torch.no_grad():
                logits, _ = small(torch.tensor([seq[start:]]))
            seq.append(int(logits[0, -1, :chat.VOCAB_SIZE].argmax()))
            expected.append(seq[-1])
        got = decoded(small, prompts(1, prompt_len)[0].tolist(), 40, temperature=0.0)
        assert got[0] == expected, block_size


@pytest.mark.parametrize("tiny_model", [dict(block_size=16)], indirect=True, ids=["block16"])
def test_padded_vocabulary_is_never_sampled(tiny_model):
    model = tiny_model
    with torch.no_grad():
        model.lm_head.weight[chat.VOCAB_SIZE:] = 100.0  # the padding rows would win every argmax
    out = decoded(model, prompts(1, 4)[0].tolist(), 10, n=2, temperature=1.0)
    assert max(max(row) for row in out) < chat.VOCAB_SIZE and len(out[0]) == 10


def test_empty_prompt_and_bad_options_fail_clearly(model):
    with pytest.raises(ValueError, match="empty prompt"):
        Request([], SamplingParams(max_new_tokens=3))
    for bad, match in ((dict(temperature=-1.0), "temperature"), (dict(top_p=1.5), "top_p"),
                       (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(top_k=-2), "top_k"),
                       (dict(max_new_tokens=0), "max_new_tokens")):
        with pytest.raises(ValueError, match=f"^{match} must be "):
            SamplingParams(**bad)
    assert SamplingParams(top_k=None).top_k == 0 and SamplingParams(stop="x").stop == ("x",)


def test_sampling_options_are_declared_once():
    """The scripts' sampling keys, their --help lines and the chat's /set help come from
    SamplingParams (a script may change a default); /set takes the options but stop and seed."""
    import eval as eval_py
    import sample
    import serve
    names = [f.name for f in fields(SamplingParams) if f.name not in SERVER_ONLY]  # not logit_bias
    for script in (sample, eval_py, serve):
        taken = [key for key in script.DEFAULTS if key in names]
        assert taken == [name for name in names if script is not serve or name != "stop"]
    assert sample.DEFAULTS["top_k"] == 200 and eval_py.DEFAULTS["temperature"] == 0.0
    assert SamplingParams().top_k == 0 and serve.DEFAULTS["seed"] is None
    assert SAMPLING_KEYS == ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
    assert all(f"{key:<20}{sampling_help()[key]}" in sample.CHAT_HELP for key in SAMPLING_KEYS)
    with pytest.raises(TypeError, match="top_z"):
        sampling_defaults(top_z=1)


# ---------------------------------------------------------------------------------------------------------------
# Sampling math on hand-made logits


def test_logit_bias_is_added_first_bans_and_forces():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [0.0, 1.0, 0.0, 0.0]])
    params = SamplingParams(temperature=0.0, logit_bias={"3": -100, 1: 100})
    assert params.logit_bias == ((1, 100.0), (3, -100.0)) and hash(params)  # hashable: grouped by it
    assert torch.equal(adjust_logits(logits, params), logits + torch.tensor([0.0, 100.0, 0.0, -100.0]))
    assert sample_next(logits, params).tolist() == [1, 1]
    banned = SamplingParams(temperature=0.0, logit_bias={3: -100})
    assert sample_next(logits, banned).tolist() == [0, 1]  # row 0's argmax 3 is banned
    # before the penalty: token 1 biased to 99 is then divided by 2, as in transformers' order
    out = adjust_logits(logits[:1], SamplingParams(temperature=0.0, repetition_penalty=2.0,
                                                   logit_bias={1: 100}), torch.tensor([[1]]))
    assert out[0, 1].item() == 49.5
    for bad in ({3: 101}, {-1: 1}, {"x": 1}, [(1,)]):
        with pytest.raises(ConfigError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    out = adjust(logits, torch.tensor([[0, 1, 1]]), temperature=0.0, repetition_penalty=2.0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]  # repeated ids are penalised once, unseen ones untouched
    assert logits.tolist() == [[2.0, -1.0, 0.5, 3.0]]  # the input is not modified
    # greedy decides after the penalty: 3 -> 1.5 loses to 2.9
    assert draw(torch.tensor([[3.0, 2.9]]), torch.tensor([[0]]), temperature=0.0,
                repetition_penalty=2.0).tolist() == [1]


def test_temperature_and_top_k():
    logits = torch.tensor([[1.0, 4.0, 2.0, 3.0]])
    assert adjust(logits, temperature=2.0).tolist() == [[0.5, 2.0, 1.0, 1.5]]
    assert adjust(logits, top_k=2).tolist() == [[NEG_INF, 4.0, NEG_INF, 3.0]]
    assert adjust(logits, top_k=10).tolist() == logits.tolist()  # k above the vocabulary: no-op


@pytest.mark.parametrize("top_p, kept", [(1.0, [0, 1, 2, 3]), (0.85, [0, 1, 2]), (0.75, [0, 1]), (0.4, [0]),
                                         (0.0, [0])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])  # sorted: 1 (0.5), 3 (0.3), 0 (0.15), 2 (0.05)
    order = [1, 3, 0, 2]
    out = adjust(probs.log(), top_p=top_p)
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == sorted(order[i] for i in kept)


def test_top_k_then_top_p_renormalises():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    # after top-k 3 the probabilities are 0.526, 0.316, 0.158: 0.526 + 0.316 >= 0.8 keeps two
    out = adjust(probs.log(), top_k=3, top_p=0.8)
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False]


def test_matches_transformers_logits_processors():
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    logits, history = torch.randn(3, 500) * 3, torch.randint(0, 500, (3, 40))
    processors = [tf.RepetitionPenaltyLogitsProcessor(1.3), tf.TemperatureLogitsWarper(0.7),
                  tf.TopKLogitsWarper(100), tf.TopPLogitsWarper(0.9)]
    expected = logits.clone()
    for p in processors:
        expected = p(history, expected)
    ours = adjust(logits, history, temperature=0.7, top_k=100, top_p=0.9, repetition_penalty=1.3)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(expected))
    assert torch.allclose(ours[torch.isfinite(ours)], expected[torch.isfinite(expected)])


def test_sampling_draws_only_kept_tokens_with_their_probabilities():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    draws = draw(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(draws, minlength=4).float() / len(draws)
    assert counts[3] == 0
    assert torch.allclose(counts[:3], probs[:3] / probs[:3].sum(), atol=0.03)


# ---------------------------------------------------------------------------------------------------------------
# Stop strings and streaming, with a model that emits scripted text


class ScriptedModel(torch.nn.Module):
    """Row r (its prompt starts with token r) says scripts[r], one token a step, then <|endoftext|>. Each token fed
    is also its own key, so the KV cache (masked per row) hands it the row's whole history, as
    attention would see it."""

    def __init__(self, prompt_len, scripts):
        super().__init__()
        self.config = GPTConfig(block_size=1024, n_layer=1, n_head=1, n_embd=8)
        self.prompt_len, self.scripts = prompt_len, scripts

    def forward(self, idx, kv_cache):
        kv_cache.positions(idx.size(1))
        keys = idx[:, None, :, None].float()  # (B, heads 1, T, 1)
        seen, _, mask = kv_cache.append(0, keys, keys)
        everything = torch.ones(seen.shape[0], seen.shape[2], dtype=torch.bool)
        visible = everything if mask is None else mask[:, 0, -1]
        histories = [row[0, :, 0][v].long().tolist() for row, v in zip(seen, visible)]
        logits = torch.full((idx.size(0), 1, self.config.vocab_size), -1e4)
        for row, history in enumerate(histories):
            script, i = self.scripts[history[0]], len(history) - self.prompt_len
            logits[row, 0, script[i] if i < len(script) else chat.EOT] = 0.0
        return logits, None

    def hidden_states(self, idx, kv_cache):  # a prefill: the keys go in the cache, nothing reads it
        return self.forward(idx, kv_cache)[0]


def scripted(texts, prompt_len=3):
    enc = chat.get_encoder()
    return ScriptedModel(prompt_len, [enc.encode_ordinary(t) for t in texts])


def stream(texts, stop, max_new_tokens=100):
    """(replies, streamed text per row, every streamed chunk) of generate_batch on scripted texts."""
    model = scripted(texts)
    chunks = []
    prompts = [[row, 2, 3] for row in range(len(texts))]  # the first token picks the row's script
    replies = generate_batch(model, prompts, max_new_tokens, stop, temperature=0.0,
                             on_text=lambda row, text: chunks.append((row, text)))
    shown = ["".join(t for r, t in chunks if r == row) for row in range(len(texts))]
    return replies, shown, chunks


def test_stop_string_spanning_several_tokens():
    stop = "<|im_end|>"
    assert len(chat.get_encoder().encode_ordinary(" ok" + stop)) > 3
    replies, shown, chunks = stream([" Sure thing<|im_end|> and more"], [stop])
    assert replies == ["Sure thing"] and shown == ["Sure thing"]
    assert not any("<" in text for _, text in chunks)  # no part of the stop string is ever shown


def test_turn_stop_and_per_row_stopping():
    texts = [" 12\nHuman: next question", " fine\n\nthen more text", " the end"]
    replies, shown, _ = stream(texts, ["\nHuman:", "\n\n"])
    assert replies == ["12", "fine", "the end"]  # each row stops on its own; the last at <|endoftext|>
    assert shown == replies


def test_prefix_of_a_stop_that_is_not_a_stop_is_shown():
    replies, shown, _ = stream([" a <|important|> b"], ["<|im_end|>"])
    assert replies == shown == ["a <|important|> b"]
    # running out of tokens while the tail looks like the start of a stop string: the tail is still shown
    replies, shown, _ = stream([" a <|im"], ["<|im_end|>"], max_new_tokens=len(chat.get_encoder().encode(" a <|im")))
    assert replies == shown == ["a <|im"]


def test_multibyte_characters_stream_whole():
    text = " 東京 means Tokyo ✓"
    assert len(chat.get_encoder().encode_ordinary(text)) > len(text.split())  # characters span several tokens
    replies, shown, chunks = stream([text], [])
    assert replies == shown == [text.strip()]
    assert not any("\ufffd" in t for _, t in chunks)


# ---------------------------------------------------------------------------------------------------------------
# Batches


def test_greedy_batch_equals_one_by_one(model):
    rows = prompts(3, 6, seed=3).tolist()
    batch = generate_batch(model, rows, 12, stop=[], temperature=0.0)
    alone = [generate_replies(model, row, 12, stop=[], temperature=0.0)[0] for row in rows]
    assert batch == alone and len(set(batch)) == 3
    same = generate_replies(model, rows[0], 12, stop=[], num_samples=3, temperature=0.0)
    assert same == [alone[0]] * 3
    sampled = generate_replies(model, rows[0], 12, stop=[], num_samples=3, temperature=1.0,
                               generator=torch.Generator().manual_seed(0))
    assert len(set(sampled)) > 1  # rows of a batch are sampled independently


# ---------------------------------------------------------------------------------------------------------------
# Rows of different lengths and sampling options, joining and leaving (the Decoder behind Engine and serve.py)

LENGTHS = (1, 3, 9, 20, 30, 45)  # block_size 32: 30 + 12 new tokens crops mid-way, 45 crops from the start
MIXED = [dict(temperature=0.0), dict(temperature=0.0, repetition_penalty=1.5),
         dict(temperature=1.0, seed=5), dict(temperature=0.8, top_k=50, top_p=0.9, seed=6),
         dict(temperature=1.0, seed=7, repetition_penalty=1.3)]


def requests(specs, new=12):
    """Fresh engine Requests from (prompt, sampling, n) triples; each seeded one draws from its own seed."""
    return [Request(prompt, SamplingParams(max_new_tokens=new, stop=(), **sampling), n)
            for prompt, sampling, n in specs]


def tokens_after(engine, specs, new=12):
    """Each request's replies' tokens, decoded together by one Engine.complete call."""
    reqs = requests(specs, new)
    engine.complete(reqs)
    return [[reply.tokens for reply in request.replies] for request in reqs]


def test_greedy_rows_of_different_lengths_equal_alone_and_the_reference(model):
    rows = [prompts(1, n, seed=n)[0].tolist() for n in LENGTHS]
    engine = Engine(model)
    batched = tokens_after(engine, [(row, dict(temperature=0.0), 1) for row in rows])
    for row, got in zip(rows, batched):
        assert got == tokens_after(engine, [(row, dict(temperature=0.0), 1)])[0]
        assert got == reference(model, row, 12, temperature=0.0)  # one crop_start policy
    assert len({tuple(got[0]) for got in batched}) == len(rows)


def test_mixed_sampling_options_and_seeds_equal_alone(model):
    sampling = [MIXED[i % len(MIXED)] for i in range(len(LENGTHS))]
    specs = [(prompts(1, n, seed=n)[0].tolist(), s, 2 if "seed" in s else 1) for n, s in zip(LENGTHS, sampling)]
    specs.append((prompts(1, 11, seed=11)[0].tolist(), MIXED[2], 1))  # the same options and seed as another row
    engine = Engine(model)
    batched = tokens_after(engine, specs)
    assert batched == [tokens_after(engine, [spec])[0] for spec in specs]
    assert batched[2][0] != batched[2][1]  # a seeded request's choices are drawn apart
    assert [reference(model, prompt, 12, n, **sampling) for prompt, sampling, n in specs] == batched


def test_a_request_joins_mid_decode_and_rows_leave_at_once(model):
    engine = Engine(model)
    first, second = [(prompts(1, n, seed=n)[0].tolist(), MIXED[i], 1) for i, n in enumerate((4, 17))]
    decoder = Decoder(engine, max_rows=2)
    long_one, short_one = requests([first], new=30)[0], requests([second], new=5)[0]
    decoder.add(long_one)
    for _ in range(7):
        assert decoder.step() == []
    decoder.add(short_one)  # joins the running batch
    with pytest.raises(ValueError, match="do not fit"):
        decoder.add(requests([second])[0])
    ended = [decoder.step() for _ in range(5)]
    assert ended[-1] == [short_one] and len(decoder.rows) == 1  # it left at once, the long one goes on
    decoder.add(requests([second])[0])  # its slot is free again
    while decoder.rows:
        decoder.step()
    assert [r.tokens for r in long_one.replies] == tokens_after(engine, [first], new=30)[0]
    assert [r.tokens for r in short_one.replies] == tokens_after(engine, [second], new=5)[0]


def test_a_joining_prompt_computes_no_logits_until_its_first_step(model, monkeypatch):
    """add() only fills the cache (GPT.hidden_states): the LM head, most of a small model's cost per position, runs
    once per step, for the rows' last tokens."""
    heads = []
    real = model.logits
    monkeypatch.setattr(model, "logits", lambda x: heads.append(tuple(x.shape[:2])) or real(x))
    decoder = Decoder(Engine(model), max_rows=3)
    decoder.add(requests([(prompts(1, 9)[0].tolist(), dict(temperature=0.0), 2)], new=3)[0])
    assert heads == []
    decoder.step()
    assert heads == [(2, 1)]  # both rows, one position each


def test_removed_request_frees_its_rows(model):
    decoder = Decoder(Engine(model), max_rows=3)
    spec = (prompts(1, 5)[0].tolist(), dict(temperature=0.0), 2)
    kept, dropped = requests([(spec[0], spec[1], 1), spec], new=20)
    decoder.add(kept)
    decoder.add(dropped)
    decoder.step()
    decoder.remove(dropped)  # the first of its rows moved: the kept row must go on undisturbed
    assert len(decoder.rows) == 1 and dropped.left == 0
    assert [r.finish_reason for r in dropped.replies] == ["length", "length"]
    while decoder.rows:
        decoder.step()
    assert kept.replies[0].tokens == tokens_after(Engine(model), [(spec[0], spec[1], 1)], new=20)[0][0]


def test_rows_cache_logits_match_each_row_alone(model):
    """One decode step of rows of different lengths through one KVCache == each row alone."""
    rows = [prompts(1, n, seed=n)[0].tolist() for n in (2, 7, 13)]
    alone = []
    with torch.no_grad():
        for row in rows:
            cache = KVCache(model.config)
            model(torch.tensor([row[:-1]]), kv_cache=cache)
            alone.append(model(torch.tensor([row[-1:]]), kv_cache=cache)[0][0, -1])
        together = KVCache(model.config, max_rows=4)
        for slot, row in enumerate(rows):  # each prefilled alone in its slot
            together.rows = slice(slot, slot + 1)
            model(torch.tensor([row[:-1]]), kv_cache=together)
        together.copy(3, 1)  # a fourth row: a copy of the second's keys, values and length
        together.rows = slice(0, 4)
        logits, _ = model(torch.tensor([row[-1:] for row in rows + rows[1:2]]), kv_cache=together)
    assert together.lengths.tolist() == [len(row) for row in rows + rows[1:2]]
    assert torch.allclose(logits[:, -1], torch.stack(alone + alone[1:2]), atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Half precision: --dtype=bfloat16|float16 converts the weights and the KV cache, not just autocast


def engine_for(ckpt, dtype):
    return load_engine({"out_dir": "", "ckpt": ckpt, "device": "cpu", "dtype": dtype})[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_weights_and_cache_are_converted(tiny_ckpt, dtype):
    engine = engine_for(tiny_ckpt, dtype)
    model, half = engine.model, getattr(torch, dtype)
    matmuls = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in model.named_parameters():  # the tied wte is lm_head's weight: named once, as wte
        in_matmul = name.rsplit(".", 1)[0] in matmuls or name == "transformer.wte.weight"
        assert p.dtype == (half if in_matmul else torch.float32), name  # norms, wpe: fp32
    assert model.transformer.wte.weight is model.lm_head.weight
    prompt = [1, 2, 3, 4]
    # the half-precision KV cache reproduces full recomputation
    assert decoded(model, prompt, 12, temperature=0.0) == reference(model, prompt, 12, temperature=0.0)
    # a cache of no dtype of its own holds the attention's; a CPU's (cache_dtype) is fp32, where
    # one query's attention over the cache runs faster, with the same tokens
    for own, held in ((None, half), (cache_dtype("cpu"), torch.float32)):
        cache = KVCache(engine.model.config, dtype=own)
        with torch.no_grad():
            engine.model(torch.tensor([prompt]), kv_cache=cache)
        assert cache.k[0].dtype == held
    assert Decoder(engine, 1).cache.dtype == torch.float32


def test_half_replies_agree_with_fp32_on_most_tokens(tiny_ckpt):
    full, half = engine_for(tiny_ckpt, "float32"), engine_for(tiny_ckpt, "bfloat16")
    rows = torch.randint(0, 50257, (8, 6), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0.0, max_new_tokens=16)
    firsts = []
    for engine in (full, half):
        requests = [Request(row, params) for row in rows]
        engine.complete(requests)
        firsts.append([request.replies[0].tokens[:1] for request in requests])
    same = sum(a == b for a, b in zip(*firsts))
    assert same >= 6  # the first token rarely flips; later ones may diverge


def test_half_weights_keep_the_residual_stream_and_logits_in_fp32(tiny_ckpt):
    """Between blocks the hidden states stay fp32 (each block's rounded output is added to an fp32 sum), inside
    them the matmuls and attention run in the weights' dtype, and the logits come out fp32."""
    model = engine_for(tiny_ckpt, "bfloat16").model
    seen = {}
    for name, module in [("block", model.transformer.h[0]), ("qkv", model.transformer.h[0].attn.c_attn),
                         ("ln_f", model.transformer.ln_f)]:
        module.register_forward_hook(lambda m, args, out, name=name: seen.update({name: out.dtype}))
    with torch.no_grad():
        logits, _ = model(torch.tensor([[1, 2, 3, 4]]))
    assert seen == {"block": torch.float32, "qkv": torch.bfloat16, "ln_f": torch.float32}
    assert logits.dtype == torch.float32


def test_half_logits_settle_a_near_tie_as_fp32_would():
    """Two logits 8.0 and 8.01 both round to bf16's 8.0 (its steps there are 0.0625): the plain bf16 head ties
    them and argmax takes the first; GPT.logits recomputes the top ones in fp32 and picks the larger."""
    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[10, 0] = 1.0
        model.lm_head.weight[20, 1] = 1.0
    model.to_half(torch.bfloat16)
    x = torch.zeros(1, 1, 8)
    x[0, 0, :2] = torch.tensor([8.0, 8.01])
    plain = model.lm_head(x).float()
    assert plain[0, 0, 10] == plain[0, 0, 20] and plain[0, 0].argmax() == 10
    with torch.no_grad():
        logits = model.logits(x)
    assert logits.dtype == torch.float32 and logits[0, 0].argmax() == 20
    assert logits[0, 0, 20].item() == pytest.approx(8.01, abs=1e-6)
    rest = torch.ones(64, dtype=torch.bool)
    rest[[10, 20]] = False
    assert torch.equal(logits[0, 0, rest], plain[0, 0, rest])  # zeros, exact in bf16 too


def test_half_logits_top_are_fp32_sums_of_the_half_weights(tiny_ckpt):
    """The REFINE_TOP largest logits are exactly the fp32 products of the (rounded) weights with ln_f's fp32
    output; every other logit is within bf16 rounding of it."""
    model = engine_for(tiny_ckpt, "bfloat16").model
    hidden = {}
    model.transformer.ln_f.register_forward_hook(lambda m, args, out: hidden.update(x=out))
    with torch.no_grad():
        logits, _ = model(torch.tensor([[5, 6, 7], [8, 9, 10]]))
        x = hidden["x"][:, [-1], :]
        exact = x @ model.lm_head.weight.float().t()
        top = model.lm_head(x).topk(REFINE_TOP, dim=-1).indices  # the plain bf16 head's top
    assert torch.allclose(logits.gather(-1, top), exact.gather(-1, top), rtol=0, atol=1e-5)
    assert torch.allclose(logits, exact, rtol=2 ** -8, atol=1e-3)
    assert torch.equal(logits.argmax(-1), exact.argmax(-1))


# ---------------------------------------------------------------------------------------------------------------
# PromptCache: a conversation's earlier turns are not run again


def test_prompt_cache_runs_only_new_tokens_and_replies_as_without(model, monkeypatch):
    engine, cache = Engine(model), PromptCache(model.config)
    params = SamplingParams(temperature=0.0, max_new_tokens=5, top_k=None)

    def turn(prompt, prompt_cache):
        request = Request(prompt, params, 1, None, None, prompt_cache)
        engine.complete([request])
        return request.replies[0].tokens

    first = prompts(1, 9, seed=1)[0].tolist()
    runs = helpers.counting_prefills(model, monkeypatch)
    reply = turn(first, cache)
    second = first + reply + prompts(1, 4, seed=2)[0].tolist()  # the next turn starts with the last one
    assert turn(second, cache) == turn(second, None)
    assert runs[0] == len(first) - 1  # the window but its last token, as always
    assert runs[1] == len(second) - len(first)  # from the first prompt's last token on: the rest was kept
    assert runs[2] == len(second) - 1  # without the cache: all of it
    other = [first[0] + 1] + second[1:]  # differs from the first token: nothing to keep
    assert turn(other, cache) == turn(other, None)
    assert runs[3] == runs[4] == len(other) - 1


def test_prompt_cache_after_an_interrupted_prefill_runs_it_all(model):
    cache, tokens = PromptCache(model.config), prompts(1, 8)[0].tolist()

    def interrupted(new, kv_cache):
        with torch.no_grad():
            kv_cache.positions(len(new))
            x = torch.zeros(1, len(new), model.config.n_embd)
            model.transformer.h[0](x, kv_cache)  # one layer of two
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.fill(tokens, interrupted)
    assert cache.ids == []
    runs = []
    with torch.no_grad():
        kv = cache.fill(tokens, lambda new, c: runs.append(len(new)) or model.hidden_states(torch.tensor([new]), c))
        fresh = KVCache(model.config)
        model.hidden_states(torch.tensor([tokens]), fresh)
    assert runs == [len(tokens)] and kv.lengths.tolist() == fresh.lengths.tolist() == [len(tokens)]
    n = len(tokens)
    assert all(torch.equal(a[:, :, :n], b[:, :, :n]) for a, b in zip(kv.k + kv.v, fresh.k + fresh.v))


def test_upcast_multiplies_prompts_in_fp32_and_decoding_steps_in_half():
    """to_half(upcast=True), for CPUs that convert bf16 in software: a prompt (more than FEW_ROWS rows) multiplies
    each weight in fp32 (it ran 5x slower in emulated bf16); a decoding step keeps the bf16 matmul (half the bytes
    to read)."""
    model = helpers.tiny_model().to_half(torch.bfloat16, upcast=True)
    layer = model.transformer.h[0].mlp.c_fc
    x = torch.randn(1, layer.FEW_ROWS + 1, model.config.n_embd)
    with torch.no_grad():
        many, one = layer(x), layer(x[:, :1])
        want = F.linear(x.bfloat16().float(), layer.weight.float(), layer.bias.float()).bfloat16()
        plain = torch.addmm(layer.bias[:, None], layer.weight, x[0, :1].bfloat16().t()).t()
    assert many.dtype == one.dtype == torch.bfloat16
    assert torch.equal(many, want) and torch.equal(one[0], plain)


@pytest.mark.parametrize("native", [True, False])
def test_load_engine_upcasts_only_where_the_cpu_lacks_bf16(tiny_ckpt, monkeypatch, native):
    monkeypatch.setattr(inference, "cpu_has_bf16", lambda: native)
    model = engine_for(tiny_ckpt, "bfloat16").model
    assert all(m.upcast is not native for m in model.modules() if isinstance(m, torch.nn.Linear))
    fp16 = engine_for(tiny_ckpt, "float16").model  # a CPU converts fp16 in software: always upcast
    assert all(m.upcast for m in fp16.modules() if isinstance(m, torch.nn.Linear))


def test_batched_rows_use_a_packed_copy_that_follows_the_weight():
    """3-16 rows without a gradient (a batch of decoded rows) multiply a copy of the weight laid out
    for oneDNN: the same product as F.linear, made again after the weight changed in place, none
    with a gradient; a model holding one deep-copies."""
    import copy
    from model import Linear
    torch.manual_seed(0)
    layer, x = Linear(32, 48), torch.randn(2, 6, 32)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is not None
        layer.weight.mul_(2)  # an optimizer step
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias))
        twin = copy.deepcopy(layer)
        torch.testing.assert_close(twin(x), layer(x))
        half = Linear(32, 48).to(torch.bfloat16)  # bf16 weights: one row too
        row = torch.randn(1, 32, dtype=torch.bfloat16)
        torch.testing.assert_close(half(row), F.linear(row, half.weight, half.bias))
        assert half._packed is not None
    fresh = Linear(32, 48)
    fresh(x).sum().backward()  # training: no copy
    assert fresh._packed is None and fresh.weight.grad is not None
