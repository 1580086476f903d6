"""A chat or text model as one GGUF file (llama.cpp, Ollama, LM Studio) and an Ollama Modelfile beside it.

    export_gguf(model, "gguf-out", template, "gpt2", stops=("\\n",))  # gguf-out/gguf-out.gguf + gguf-out/Modelfile

The GGUF is llama.cpp's `gpt2` architecture, written with PyPI's `gguf` package (gguf-py, llama.cpp's own writer):
    tensors    token_embd, position_embd, blk.N.{attn_norm, attn_qkv, attn_output, ffn_norm, ffn_up, ffn_down},
               output_norm (weights and biases; a bias=False model gets zero biases); the head is tied, so there is
               no `output` tensor (llama.cpp reuses token_embd). Only the real vocabulary's rows are written, not
               the padding (50257 of 50304). Matrices in the chosen type (GGUF_TYPES); norms, biases and the
               position embedding stay F32, as llama.cpp's converter does
    metadata   context length = block_size (llama.cpp's context must not exceed it), GPT-2's BPE tokenizer (its
               vocabulary and merges from tiktoken's ranks, the `gpt-2` pre-tokenizer), <|endoftext|> as a control
               token and the end-of-generation token (no BOS added), the chat template as Jinja in
               tokenizer.chat_template (so llama.cpp's chat endpoint renders a conversation as sample.py does) and
               sample.py's sampling defaults (general.sampling.*)

GGUF has no place for stop strings: llama.cpp stops on end-of-generation tokens, and with GPT-2's vocabulary our
templates end a turn with text ("\\n", "\\nHuman:"). Pass them as `stop` to llama.cpp; the Modelfile carries them for
Ollama (`PARAMETER stop`), with a TEMPLATE (Go text/template) that renders what the chat template renders.
A template's special tokens (chat.template_encoder: chatml_special's <|im_start|>, <|im_end|>) are control tokens,
the one a turn_end starts with the end-of-turn token llama.cpp stops on.
"""
import os

import gguf

from . import chat
from .errors import ConfigError, OutputExistsError
from .files import atomic_write, disk_error, temp_name
from .hf_gpt2 import HF_CONV1D, hf_state_dict
from .hf_tokenizer import gpt2_vocab_and_merges
from .tokenizer import describe

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")  # --gguf_type; the first is the default
LAYER_NORM_EPS = 1e-5  # model.LayerNorm's
# sample.py's defaults (tests/test_gguf.py checks that they agree), under Ollama's parameter names
SAMPLING = {"temperature": 0.8, "top_k": 200, "top_p": 1.0, "repeat_penalty": 1.0, "num_predict": 150}
# transformers' GPT-2 names (hf_state_dict's) -> llama.cpp's
BLOCK_NAMES = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP_NAMES = {"wte": "token_embd", "wpe": "position_embd", "ln_f": "output_norm"}


def gguf_name(hf_name):
    """llama.cpp's name of a tensor of hf_state_dict: transformer.h.3.attn.c_attn.weight -> blk.3.attn_qkv.weight."""
    parts = hf_name.removeprefix("transformer.").split(".")
    kind = parts[-1]
    if parts[0] == "h":
        return f"blk.{parts[1]}.{BLOCK_NAMES['.'.join(parts[2:-1])]}.{kind}"
    return f"{TOP_NAMES[parts[0]]}.{kind}"


def check_gguf_type(gguf_type):
    if gguf_type not in GGUF_TYPES:
        raise ConfigError(f"--gguf_type={gguf_type}: unknown type (one of {', '.join(GGUF_TYPES)})")


def gguf_tensors(model, gguf_type, n_vocab=chat.VOCAB_SIZE):
    """[(llama.cpp name, numpy array as stored, GGMLQuantizationType)] of our GPT, in the file's order."""
    wanted = gguf.GGMLQuantizationType[gguf_type.upper()]
    tensors = []
    for name, p in hf_state_dict(model, n_vocab).items():
        if name.endswith(HF_CONV1D):
            p = p.t()  # back to (out, in): ggml's (ne0 = in, ne1 = out), what llama.cpp reads
        data = p.float().contiguous().numpy()
        name = gguf_name(name)
        qtype = gguf.GGMLQuantizationType.F32
        if data.ndim == 2 and not name.startswith("position_embd"):
            qtype = wanted
        try:
            stored = gguf.quants.quantize(data, qtype)
        except gguf.QuantError:  # a row length that is no multiple of Q8_0's block of 32: F16, as llama.cpp does
            qtype = gguf.GGMLQuantizationType.F16
            stored = gguf.quants.quantize(data, qtype)
        tensors.append((name, stored, qtype))
    return tensors


def add_tokenizer(writer, enc, template, chat_model):
    """GPT-2's (or a trained) byte-level BPE as llama.cpp reads it: tokens (vocab.json's strings) by id, merges,
    types (<|endoftext|> and the template's special tokens as control tokens), <|endoftext|> as EOS, the
    template's end of turn (<|im_end|>) or <|endoftext|> as EOT, no BOS or EOS added to a prompt."""
    vocab, merges = gpt2_vocab_and_merges(enc)
    # an id that is no token (GPT-2's free one before a template's special tokens) gets an unused placeholder
    gaps = set((~chat.is_token(enc, enc.n_vocab)).nonzero()[0].tolist())
    vocab = {**{f"<|unused_{i}|>": i for i in gaps}, **vocab}
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(enc.n_vocab)):
        raise ValueError(f"the {enc.name!r} tokenizer's ids are not 0..{enc.n_vocab - 1}: it cannot go into a GGUF")
    # <|endoftext|> and the template's special tokens (chat.declared_tokens) are the data's: control tokens; a
    # trained tokenizer's others are never made from text (as in the HF export, hf_tokenizer.tokenizer_files):
    # unused placeholders, or llama.cpp would read "[PAD]" in a prompt as that token (it knows such names)
    declared = chat.declared_tokens(enc)
    special = {enc.eot_token, *declared.values()}
    unused = gaps | (set(enc._special_tokens.values()) - special)
    tokens = [f"<|unused_{i}|>" if i in unused else token for i, token in enumerate(tokens)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(tokens)
    writer.add_token_merges(merges)
    writer.add_token_types([gguf.TokenType.CONTROL if i in special else gguf.TokenType.UNUSED if i in unused
                            else gguf.TokenType.NORMAL for i in range(len(tokens))])
    for add in (writer.add_bos_token_id, writer.add_eos_token_id, writer.add_pad_token_id):
        add(enc.eot_token)
    # the end of a turn: a special token the template's turn_end starts with (ChatML's <|im_end|>), else <|endoftext|>
    turn_end = (template or {}).get("turn_end", "")
    writer.add_eot_token_id(next((i for m, i in declared.items() if turn_end.startswith(m)), enc.eot_token))
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if chat_model:
        writer.add_chat_template(chat.chat_template(template))


def write_gguf(model, path, template=chat.TEMPLATE, tokenizer=chat.TOKENIZER, gguf_type="f16", name="model",
               chat_model=True):
    """Write model (our GPT) to path as a GGUF file (see the module docstring), atomically."""
    check_gguf_type(gguf_type)
    config, enc = model.config, chat.template_encoder(template, chat.get_encoder(tokenizer))  # + its special tokens
    if not (isinstance(tokenizer, str) or tokenizer.get("split") == "gpt2"):
        raise ConfigError(f"--format=gguf: the tokenizer {describe(tokenizer)} does not split text "
                          "as GPT-2 does: llama.cpp's `gpt-2` pre-tokenizer cannot describe it")
    tensors = gguf_tensors(model, gguf_type, enc.n_vocab)
    if tensors[0][1].shape[0] != enc.n_vocab:
        raise ValueError(f"the embedding has {tensors[0][1].shape[0]} rows for a {enc.n_vocab}-token tokenizer")
    writer = gguf.GGUFWriter(None, "gpt2")
    writer.add_name(name)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(LAYER_NORM_EPS)
    writer.add_file_type(gguf.LlamaFileType[{"f32": "ALL_F32"}.get(gguf_type, f"MOSTLY_{gguf_type.upper()}")])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_sampling_temp(SAMPLING["temperature"])
    writer.add_sampling_top_k(SAMPLING["top_k"])
    writer.add_sampling_top_p(SAMPLING["top_p"])
    writer.add_sampling_penalty_repeat(SAMPLING["repeat_penalty"])
    add_tokenizer(writer, enc, template, chat_model)
    for tensor_name, data, qtype in tensors:
        writer.add_tensor(tensor_name, data, raw_dtype=qtype)
    tmp = temp_name(path)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    except OSError as e:
        full = disk_error(e, f"writing {path}")
        if full is None:
            raise
        raise full from None
    finally:
        writer.close()
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------------------------------------------------
# The Ollama Modelfile


def go_string(text):
    """text as a Go string literal: what a Modelfile's TEMPLATE can hold whatever text is (Ollama's parser takes
    the template verbatim but drops unprintable characters, so they are written as escapes)."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return '"' + "".join(out) + '"'


def go_template(template):
    """An Ollama TEMPLATE (Go text/template over .Messages) rendering what chat.render_text renders for a
    conversation with the generation prompt: each message in place, the template's default system message when
    the first message is not a system one, and `Assistant:` after a last user (or system) message. A last assistant
    message is left open (Ollama continues it). Ollama passes messages as they are, without stripping them."""
    def lit(text):
        return f"{{{{ {go_string(text)} }}}}" if text else ""

    def role(key, extra=""):
        before, _, after = template[key].partition("{content}")
        return lit(extra) + lit(before) + "{{ .Content }}" + lit(after)

    default = template.get("default_system", "")
    lines = [
        *([f'{{{{- if not (and .Messages (eq (index .Messages 0).Role "system")) }}}}'
           f'{lit(chat.fill(template["system"], default))}{{{{ end }}}}'] if default else []),
        "{{- range $i, $m := .Messages }}",
        "{{- $last := eq (len (slice $.Messages $i)) 1 }}",
        '{{- if eq .Role "system" }}' + role("system"),
        '{{- else if eq .Role "user" }}' + role("user"),
        '{{- else if eq .Role "assistant" }}' + role("assistant", template["assistant_label"])
        + (f"{{{{ if not $last }}}}{lit(template['turn_end'])}{{{{ end }}}}" if template["turn_end"] else ""),
        "{{- end }}",
        f'{{{{- if and $last (ne .Role "assistant") }}}}{lit(template["assistant_label"])}{{{{ end }}}}',
        "{{- end }}",
    ]
    return "\n".join(lines)


def modelfile_value(text, what):
    """A Modelfile argument in quotes. Ollama's parser reads quoted text verbatim (no escapes: a newline is a
    newline), with triple quotes when the text holds a quote; unprintable characters it drops, so they are refused."""
    if any(not (c.isprintable() or c in "\n\t") for c in text) or '"""' in text:
        raise ConfigError(f"{what} {text!r} cannot be written in an Ollama Modelfile (it holds an unprintable "
                          f"character or three quotes in a row)")
    return f'"""{text}"""' if '"' in text else f'"{text}"'


def modelfile(gguf_file, template, stops, block_size, chat_model=True):
    """The Modelfile's text: FROM the GGUF beside it, the TEMPLATE (a text model: the prompt as it is), a stop
    parameter per stop string, sample.py's sampling defaults, and the context = block_size."""
    lines = ["# Ollama: ollama create NAME -f Modelfile && ollama run NAME   (docs/gguf.md)",
             f"FROM ./{gguf_file}",
             f'TEMPLATE """{go_template(template) if chat_model else "{{ .Prompt }}"}"""']
    lines += [f"PARAMETER stop {modelfile_value(stop, 'the stop string')}" for stop in stops]
    lines += [f"PARAMETER {key} {value:g}" for key, value in SAMPLING.items()]
    lines.append(f"PARAMETER num_ctx {block_size}")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# The export directory


def gguf_out(out, force):
    """(directory, name) of a GGUF export to out: the name is the directory's. A directory holding other files than
    a previous GGUF export (*.gguf and Modelfile) is refused unless force (they are kept)."""
    out = os.path.realpath(os.path.abspath(out))
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExistsError(f"--out {out} is a file: pass a directory")
    others = [n for n in os.listdir(out) if n != "Modelfile" and not n.endswith(".gguf")] \
        if os.path.isdir(out) else []
    if others and not force:
        raise OutputExistsError(f"--out {out} holds other files than a GGUF export ({', '.join(sorted(others)[:3])}):"
                                f" pick another directory, or pass --force to write into it (other files are kept)")
    return out, os.path.basename(out) or "model"


def export_gguf(model, out, template=chat.TEMPLATE, tokenizer=chat.TOKENIZER, stops=(), gguf_type="f16",
                force=False, chat_model=True):
    """Write out/<name>.gguf and out/Modelfile (name: out's own name). stops: the checkpoint's stop strings; a text
    model (chat_model False) has no chat template. Returns the GGUF's path."""
    check_gguf_type(gguf_type)
    out, name = gguf_out(out, force)
    text = modelfile(f"{name}.gguf", template, stops, model.config.block_size, chat_model)  # checks the stops
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"{name}.gguf")
    write_gguf(model, path, template, tokenizer, gguf_type, name, chat_model)
    with atomic_write(os.path.join(out, "Modelfile")) as f:
        f.write(text)
    return path
