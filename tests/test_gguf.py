"""export.py --format=gguf (chat_gpt2/gguf_export.py), checked by llama.cpp itself (llama-cpp-python,
requirements-dev.txt) and its Ollama Modelfile's TEMPLATE by Go's text/template (tests/gotemplate/main.go).

The tiny random models (helpers.tiny_model: block_size 64, a padded 50304-row vocabulary) generate nonsense, but
nonsense that depends on the whole context: equal tokens mean equal models. `ours_*` are the only calls into our
model: the reference is full forward passes (helpers.greedy_tokens), not the engine."""
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

import helpers
from chat_gpt2 import chat, gguf_export
from chat_gpt2.errors import ConfigError, OutputExistsError

gguf = pytest.importorskip("gguf")

VOCAB = chat.VOCAB_SIZE
PROMPTS = ("Human: What is the capital of France?\nAssistant:", "Once upon a time there was a", "def add(a, b):\n",
           "1, 2, 3, 4,")
CONVERSATIONS = (
    [{"role": "user", "content": "What is 7 plus 5?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a \"joke\" {{ .Content }}"}],
)


# ---------------------------------------------------------------------------------------------------------------
# Ours (the reference) and llama.cpp's


def ours_greedy(model, ids, n):
    return helpers.greedy_tokens(model, ids, n)


@torch.no_grad()
def ours_logits(model, ids):
    """Next-token logits after each position of ids, (len(ids), VOCAB)."""
    return model(torch.tensor([ids]), all_logits=True)[0][0, :, :VOCAB].numpy()


def ours_reply(model, messages, template, n, stops):
    return helpers.greedy_reply(model, chat.render_prompt(messages, template), n, stops)


@pytest.fixture(scope="module")
def llama_cpp():
    return pytest.importorskip("llama_cpp")


def load(llama_cpp, path, n_ctx=64, logits_all=False):
    """path in llama.cpp with a context of n_ctx tokens (never more than the model's block_size), keys and values
    cached in float32 (llama.cpp's default f16 cache rounds them: a near tie can then go the other way). llama.cpp
    rounds its cache up to 256 positions and would run past the model's last one (and abort): every call below
    keeps prompt + reply within the block itself."""
    f32 = llama_cpp.GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=max(n_ctx, 1), n_threads=1,
                           logits_all=logits_all, type_k=f32, type_v=f32, verbose=False)


def llama_greedy(llm, ids, n):
    """llama.cpp's own greedy sampler (temperature 0): up to n new tokens, ending before <|endoftext|>."""
    out = []
    for token in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if token == chat.EOT or len(out) == n:
            break
        out.append(token)
        if len(out) == n:
            break
    return out


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.fixture(scope="module")
def model():
    return helpers.tiny_model(seed=1)


@torch.no_grad()
def ascii_only(model):
    """model with the embedding rows of tokens that are not ASCII text zeroed: their logit is 0, below the best
    one, so replies are ASCII (for comparing texts: a token that is part of a UTF-8 character decodes to U+FFFD in
    tiktoken, to nothing in llama-cpp-python)."""
    enc = chat.get_encoder()
    for t in range(VOCAB):
        if not enc.decode_single_token_bytes(t).isascii():
            model.transformer.wte.weight[t] = 0
    return model


@pytest.fixture(scope="module")
def chat_model():
    return ascii_only(helpers.tiny_model(seed=1, block_size=128))  # room for Alpaca's and ChatML's longer prompts


@pytest.fixture(scope="module")
def exports(model, tmp_path_factory):
    """{gguf_type: path of the GGUF} of model, with the default template and a newline stop."""
    root = tmp_path_factory.mktemp("gguf")
    return {t: gguf_export.export_gguf(model, str(root / t), stops=("\n",), gguf_type=t)
            for t in gguf_export.GGUF_TYPES}


def prompt_ids(text):
    return chat.get_encoder().encode_ordinary(text)


# ---------------------------------------------------------------------------------------------------------------
# The file itself


def field(reader, key):
    f = reader.get_field(key)
    return f.contents() if f is not None else None


def test_gguf_holds_the_gpt2_architecture_tokenizer_template_and_real_vocabulary_rows(model, exports):
    reader = gguf.GGUFReader(exports["f32"])  # slow (seconds): it parses the 100k strings of the tokenizer
    assert field(reader, "general.architecture") == "gpt2"
    assert field(reader, "gpt2.context_length") == model.config.block_size
    assert (field(reader, "gpt2.block_count"), field(reader, "gpt2.embedding_length")) == (2, 32)
    assert field(reader, "tokenizer.ggml.model") == "gpt2" and field(reader, "tokenizer.ggml.pre") == "gpt-2"
    tokens, types = field(reader, "tokenizer.ggml.tokens"), field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == VOCAB and tokens[chat.EOT] == "<|endoftext|>" and tokens[50] == "S"
    assert types[chat.EOT] == gguf.TokenType.CONTROL and set(types[:chat.EOT]) == {gguf.TokenType.NORMAL}
    assert field(reader, "tokenizer.ggml.eos_token_id") == field(reader, "tokenizer.ggml.eot_token_id") == chat.EOT
    assert field(reader, "tokenizer.ggml.add_bos_token") is False
    assert field(reader, "tokenizer.chat_template") == chat.chat_template(chat.TEMPLATE)
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert len(tensors) == 2 + 2 + 12 * 2  # the embeddings, output_norm's weight and bias, 12 per block
    assert model.config.vocab_size == 50304 and tensors["token_embd.weight"].shape == (VOCAB, 32)
    np.testing.assert_array_equal(tensors["token_embd.weight"], model.transformer.wte.weight.detach()[:VOCAB])
    np.testing.assert_array_equal(tensors["blk.0.attn_qkv.weight"], model.transformer.h[0].attn.c_attn.weight.detach())


def test_q8_0_quantizes_the_matrices_only(model):
    kinds = {name: qtype.name for name, _, qtype in gguf_export.gguf_tensors(model, "q8_0")}
    assert kinds["token_embd.weight"] == kinds["blk.1.ffn_down.weight"] == kinds["blk.0.attn_qkv.weight"] == "Q8_0"
    assert kinds["position_embd.weight"] == kinds["blk.0.attn_qkv.bias"] == kinds["output_norm.weight"] == "F32"
    odd = {name: qtype.name for name, _, qtype in gguf_export.gguf_tensors(helpers.tiny_model(n_embd=48), "q8_0")}
    assert odd["token_embd.weight"] == odd["blk.0.attn_qkv.weight"] == "F16"  # rows of 48: not in blocks of 32
    assert odd["blk.0.ffn_down.weight"] == "Q8_0"  # rows of 4 * 48


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp runs it as we do


@pytest.mark.parametrize("gguf_type, tolerance", [("f32", 1e-3), ("f16", 3e-3)])
def test_llama_cpp_greedy_tokens_and_logits_equal_ours(llama_cpp, model, exports, gguf_type, tolerance):
    llm = load(llama_cpp, exports[gguf_type], logits_all=True)
    assert int(llm.metadata["gpt2.context_length"]) == model.config.block_size
    for text in PROMPTS:
        ids = prompt_ids(text)
        assert llm.tokenize(text.encode(), add_bos=False) == ids  # llama.cpp's gpt-2 pre-tokenizer = tiktoken's
        n = model.config.block_size - len(ids)
        ours = ours_greedy(model, ids, n)
        assert len(ours) >= 32
        assert llama_greedy(llm, ids, n) == ours, text
        seq = ids + ours[:-1]
        theirs, mine = llama_logits(llm, seq), ours_logits(model, seq)
        assert np.abs(theirs - mine).max() < tolerance * np.abs(mine).max()
        assert (theirs.argmax(-1) == mine.argmax(-1)).all()


def test_q8_0_picks_our_greedy_tokens(llama_cpp, model, exports):
    """Along our greedy continuation of each prompt, the share of positions where llama.cpp's Q8_0 model picks our
    token too (the same context each time: a first difference does not derail the rest)."""
    llm = load(llama_cpp, exports["q8_0"], logits_all=True)
    same = total = 0
    for text in PROMPTS:
        ids = prompt_ids(text)
        ours = ours_greedy(model, ids, model.config.block_size - len(ids))
        picks = llama_logits(llm, ids + ours[:-1])[len(ids) - 1:].argmax(-1)
        same, total = same + int((picks == np.array(ours)).sum()), total + len(ours)
    print(f"Q8_0: {same}/{total} = {same / total:.1%} of our greedy tokens")
    assert same / total >= 0.9


def test_bf16_loads_and_mostly_agrees(llama_cpp, model, exports):
    llm = load(llama_cpp, exports["bf16"], logits_all=True)
    ids = prompt_ids(PROMPTS[0])
    assert (llama_logits(llm, ids).argmax(-1) == ours_logits(model, ids).argmax(-1)).mean() >= 0.9


def test_llama_cpp_context_defaults_to_the_block_size(llama_cpp, exports):
    assert load(llama_cpp, exports["f16"], n_ctx=0).context_params.n_ctx == 64  # 0: the model's context length


@pytest.mark.parametrize("name", list(chat.BUILTIN_TEMPLATES))
def test_chat_completion_on_the_gguf_template_is_our_greedy_reply(llama_cpp, chat_model, tmp_path, name):
    """llama.cpp's chat endpoint formats with the GGUF's tokenizer.chat_template; with our stop strings its greedy
    reply is sample.py's (the reference: helpers.greedy_reply). A random model never writes the template's stop, so
    a word from the middle of its reply is a stop string too: both must cut the reply there."""
    template, model = chat.BUILTIN_TEMPLATES[name], chat_model
    path = gguf_export.export_gguf(model, str(tmp_path / name), template, stops=(template["stop"],), gguf_type="f32")
    llm = load(llama_cpp, path, n_ctx=model.config.block_size)
    assert llm.chat_format == "chat_template.default"  # the GGUF's own template, not one llama-cpp-python knows
    for messages in CONVERSATIONS:
        ids, n = chat.render_prompt(messages, template), 24
        assert llm.tokenize(chat.render_text(messages, template, True).encode(), add_bos=False, special=True) == ids
        assert len(ids) + n <= model.config.block_size
        words = ours_reply(model, messages, template, n, (template["stop"],)).split()
        stops = (template["stop"], words[len(words) // 2])
        theirs = llm.create_chat_completion(messages, temperature=0.0, max_tokens=n, stop=list(stops))
        reply = theirs["choices"][0]["message"]["content"].strip()
        assert reply == ours_reply(model, messages, template, n, stops)
        assert theirs["choices"][0]["finish_reason"] == "stop"
        assert 0 < len(reply.split()) < len(words)


# ---------------------------------------------------------------------------------------------------------------
# The Ollama Modelfile: its TEMPLATE rendered by Go's text/template, as Ollama does


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    """render(template, conversations) -> [text]: tests/gotemplate/main.go, built once."""
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (Debian: apt-get install golang-go; .ci/run installs it)")
    exe = str(tmp_path_factory.mktemp("go") / "gotemplate")
    source = os.path.join(helpers.REPO, "tests", "gotemplate", "main.go")
    subprocess.run(["go", "build", "-o", exe, source], check=True, capture_output=True, timeout=300)

    def render(template, conversations):
        done = subprocess.run([exe], input=json.dumps({"template": template, "conversations": conversations}),
                              capture_output=True, text=True, check=True, timeout=60)
        return json.loads(done.stdout)
    return render


def ollama_expected(messages, template):
    """Our rendering of what Ollama sends the model: the generation prompt after a user message; a last assistant
    message left open (Ollama continues it)."""
    if messages[-1]["role"] != "assistant":
        return chat.render_text(messages, template, add_generation_prompt=True)
    text = chat.render_text(messages, template)
    return text[:len(text) - len(template["turn_end"])]


@pytest.mark.parametrize("name", list(chat.BUILTIN_TEMPLATES) + ["custom"])
def test_modelfile_template_renders_as_our_template(go_render, name):
    template = chat.BUILTIN_TEMPLATES.get(name) or {
        **chat.TEMPLATE, "system": "<<SYS>>\t{content}\u2028\"\"\"\n", "default_system": "Be {{ kind }}.",
        "user": "\\U: {content} \\n\n", "assistant_label": "A\"", "turn_end": "\u0007end\n"}
    conversations = [*CONVERSATIONS, CONVERSATIONS[2][:2], [{"role": "system", "content": "Only this."}]]
    rendered = go_render(gguf_export.go_template(template), [list(c) for c in conversations])
    assert rendered == [ollama_expected(c, template) for c in conversations]


def test_modelfile_stops_sampling_and_context(model, exports):
    text = open(os.path.join(os.path.dirname(exports["f16"]), "Modelfile"), encoding="utf-8").read()
    assert "FROM ./f16.gguf\n" in text and 'TEMPLATE """{{- range $i, $m := .Messages }}' in text
    assert 'PARAMETER stop "\n"\n' in text  # Ollama's parser reads quoted text verbatim: a real newline
    assert f"PARAMETER num_ctx {model.config.block_size}\n" in text
    import sample
    for ours, theirs in [("temperature", "temperature"), ("top_k", "top_k"), ("top_p", "top_p"),
                         ("repetition_penalty", "repeat_penalty"), ("max_new_tokens", "num_predict")]:
        assert gguf_export.SAMPLING[theirs] == sample.DEFAULTS[ours]
        assert f"PARAMETER {theirs} {sample.DEFAULTS[ours]:g}\n" in text


def test_modelfile_quotes_stops_as_ollama_reads_them():
    text = gguf_export.modelfile("m.gguf", chat.TEMPLATE, ("\nHuman:", 'say "x"'), 64)
    assert 'PARAMETER stop "\nHuman:"\n' in text and 'PARAMETER stop """say "x\""""\n' in text
    with pytest.raises(ConfigError, match="cannot be written in an Ollama Modelfile"):
        gguf_export.modelfile("m.gguf", chat.TEMPLATE, ("a\x00",), 64)


# ---------------------------------------------------------------------------------------------------------------
# export.py --format=gguf


@pytest.fixture(scope="module")
def text_ckpt(tmp_path_factory):
    return helpers.save_tiny_checkpoint(tmp_path_factory.mktemp("text") / "text.pt",
                                        ascii_only(helpers.tiny_model(seed=2)), default_stop=None)


def test_export_cli_text_model(llama_cpp, text_ckpt, tmp_path, capsys):
    import export
    out = tmp_path / "story-model"
    export.main([f"--ckpt={text_ckpt}", "--format=gguf", "--gguf_type=f32", f"--out={out}"])
    assert sorted(os.listdir(out)) == ["Modelfile", "story-model.gguf"]
    assert "story-model.gguf" in capsys.readouterr().out
    modelfile = (out / "Modelfile").read_text()
    assert 'TEMPLATE """{{ .Prompt }}"""' in modelfile and "PARAMETER stop" not in modelfile
    model, ids = helpers.model_of(text_ckpt), prompt_ids(PROMPTS[1])
    llm = load(llama_cpp, out / "story-model.gguf")
    assert "tokenizer.chat_template" not in llm.metadata and llm.metadata["general.name"] == "story-model"
    theirs = llm.create_completion(ids, max_tokens=40, temperature=0.0)["choices"][0]["text"]
    assert theirs == helpers.decode(ours_greedy(model, ids, 40))
    export.main([f"--ckpt={text_ckpt}", "--format=gguf", "--gguf_type=q8_0", f"--out={out}"])  # replaces its own
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="holds other files"):
        export.main([f"--ckpt={text_ckpt}", "--format=gguf", f"--out={out}"])


def test_export_cli_merges_lora(llama_cpp, tiny_dataset, tmp_path):
    import export
    from chat_gpt2.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
    run = str(tmp_path / "run")
    helpers.train_inprocess(helpers.tiny_train_args(tiny_dataset, run, max_iters=2, n_layer=1, lora_rank=2,
                                                    learning_rate=0.05))
    ckpt = load_checkpoint(find_checkpoint(run))
    assert "lora" in ckpt
    export.main([f"--out_dir={run}", "--format=gguf", "--gguf_type=f32", f"--out={tmp_path / 'lora'}"])
    merged, ids = model_from_checkpoint(ckpt).eval(), prompt_ids(PROMPTS[0])
    llm = load(llama_cpp, tmp_path / "lora" / "lora.gguf", n_ctx=32, logits_all=True)
    assert np.abs(llama_logits(llm, ids) - ours_logits(merged, ids)).max() < 1e-3


@pytest.mark.parametrize("flags, message", [
    (["--format=gguf", "--gguf_type=q4_0"], "--gguf_type=q4_0: unknown type"),
    (["--format=onnx"], "--format=onnx: unknown format"),
    (["--format=gguf", "--check"], "has no --check"),
])
def test_export_cli_refuses_bad_options(tiny_ckpt, tmp_path, flags, message):
    import export
    with pytest.raises(ConfigError, match=message) as e:
        export.main([f"--ckpt={tiny_ckpt}", f"--out={tmp_path / 'x'}", *flags])
    assert "\n" not in str(e.value) and not (tmp_path / "x").exists()


def test_export_cli_refuses_a_classifier(tmp_path):
    ckpt = helpers.save_tiny_classifier(tmp_path / "spam.pt", ["ham", "spam"])
    done = helpers.run([helpers.script("export.py"), f"--ckpt={ckpt}", "--format=gguf", f"--out={tmp_path / 'x'}"],
                       tmp_path, check=False)
    assert done.returncode != 0 and "is a classifier" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()
