"""Export a fine-tuned checkpoint as a Hugging Face GPT-2 model directory.

    python export.py --out=hf-model                          # newest run's best checkpoint in out_dir
    python export.py --ckpt=out/finetuned_20260101_120000.pt --out=hf-model --check

The directory loads as it is with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, and back into this project with `--init_from=DIR`:

    config.json, generation_config.json      GPT-2 config (n_positions = the trained block_size); eos_token_id 50256
    model.safetensors                        weights under transformers' names, Conv1D layout; the head is tied
    vocab.json, merges.txt, tokenizer.json   the GPT-2 tokenizer, built from tiktoken's own ranks (no download)
    tokenizer_config.json                    with a chat_template that renders exactly this project's template
    special_tokens_map.json

Padded vocabulary rows (50257..50303) are dropped, a bias=False model gets zero biases (exactly equivalent), and
the directory is written beside --out first and moved into place at the end. An existing --out is replaced only
if it holds nothing but a previous export; --force writes into any directory (other files there are kept).
--check compares the logits of the export with the checkpoint's (ours, and transformers' when installed).
Push it to the Hub with `hf upload USER/REPO DIR` (see the README).
"""
import functools
import json
import os
import shutil

import torch

import chat
import configurator
from model import HF_CONV1D, find_checkpoint, load_checkpoint, model_from_checkpoint

DEFAULTS = dict(
    out_dir="out", ckpt="",  # ckpt "": the newest run's best checkpoint in out_dir
    out="",  # the directory to write (required)
    force=False,  # write into an existing directory that holds other files (they are kept)
    check=False,  # after writing, compare logits: export vs checkpoint (ours, and transformers' if installed)
)
EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt",
                "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
EOT_TEXT = "<|endoftext|>"


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer: GPT-2's byte-level BPE files, rebuilt from tiktoken's ranks


def bytes_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable unicode characters (vocab.json's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def _bpe_parts(token, ranks, max_rank):
    """Split token (bytes) the way BPE builds it using only the merges ranked below max_rank (tiktoken's algorithm:
    repeatedly merge the adjacent pair whose concatenation has the lowest rank)."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1])
            if rank is not None and rank < best_rank:
                best, best_rank = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


@functools.lru_cache(maxsize=2)
def gpt2_vocab_and_merges(enc):
    """(vocab: {token string: id}, merges: ["a b", ...] in priority order) of a tiktoken byte-level BPE encoding.

    Every multi-byte token is the merge of the two tokens BPE has built from its bytes just before it (using the
    lower-ranked merges only); ranks >= 256 are GPT-2's merges in order, so merge i makes token 256 + i. The result
    equals OpenAI's encoder.json / vocab.bpe (tests/test_export.py). Cached: do not modify what it returns."""
    ranks = enc._mergeable_ranks  # bytes -> rank; tiktoken's public API has no accessor for it
    byte_char = bytes_to_unicode()

    def text(b):
        return "".join(byte_char[x] for x in b)

    vocab = {text(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise RuntimeError(f"cannot recover the BPE merge that makes token {rank} {token!r}: got {parts}")
        merges.append(f"{text(parts[0])} {text(parts[1])}")
    for name, rank in enc._special_tokens.items():
        vocab[name] = rank
    return vocab, merges


def tokenizer_files(enc, template, block_size):
    """{filename: JSON-able object or text} for a GPT-2 tokenizer that AutoTokenizer loads without a download."""
    vocab, merges = gpt2_vocab_and_merges(enc)
    eot = {"content": EOT_TEXT, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True,
           "special": True}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer_json = {  # the `tokenizers` serialisation of GPT-2's fast tokenizer
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": chat.EOT, **eot}],
        "normalizer": None, "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False}, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    tokenizer_config = {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": False, "add_bos_token": False,
        "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT,
        "model_max_length": block_size, "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {str(chat.EOT): eot},
        "chat_template": chat_template(template),
    }
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT, "pad_token": EOT_TEXT}
    return {
        "vocab.json": vocab,
        "merges.txt": "#version: 0.2\n" + "\n".join(merges) + "\n",
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": tokenizer_config,
        "special_tokens_map.json": special,
    }


def chat_template(template=chat.TEMPLATE):
    """A Jinja chat_template rendering exactly what chat.py renders with `template` (contents stripped, the
    `<|endoftext|>` closing a finished conversation, `Assistant:` as the generation prompt)."""
    def lit(text):  # a Jinja string literal
        return json.dumps(text, ensure_ascii=False)

    def role_text(key, content="message['content'] | trim"):
        before, _, after = template[key].partition("{content}")
        return f"{{{{ {lit(before)} + ({content}) + {lit(after)} }}}}"

    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}" + role_text("system") +
        "{%- elif message['role'] == 'user' -%}" + role_text("user") +
        "{%- elif message['role'] == 'assistant' -%}"
        f"{{{{ {lit(template['assistant_label'])} }}}}" + role_text("assistant") +
        f"{{{{ {lit(template['turn_end'])} }}}}"
        "{%- else -%}{{ raise_exception('unknown role: ' + message['role']) }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        f"{{%- if add_generation_prompt -%}}{{{{ {lit(template['assistant_label'])} }}}}"
        f"{{%- else -%}}{{{{ {lit(template['eot'])} }}}}{{%- endif -%}}"
    )


# ----------------------------------------------------------------------------------------------------------------
# Model: config.json and the weights under transformers' names


def hf_config(config):
    """config.json for transformers' GPT2LMHeadModel from our GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": chat.VOCAB_SIZE, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head, "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": chat.EOT, "eos_token_id": chat.EOT,
    }


def hf_state_dict(model):
    """Our weights under transformers' GPT-2 names: Conv1D weights transposed to (in, out), the token embedding
    cut to GPT-2's 50257 rows, zero biases for a bias=False model; no lm_head.weight (tied to wte)."""
    if model.config.vocab_size < chat.VOCAB_SIZE:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than GPT-2's "
                         f"{chat.VOCAB_SIZE}: it cannot be exported as a GPT-2 model")
    state = {}
    for name, p in model.named_parameters():  # the tied head appears once, as transformer.wte.weight
        p = p.detach()
        if name.endswith(HF_CONV1D):
            p = p.t()
        elif name == "transformer.wte.weight":
            p = p[:chat.VOCAB_SIZE]
        state[name] = p.contiguous()
    if not model.config.bias:
        C = model.config.n_embd
        widths = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C, "mlp.c_fc": 4 * C, "mlp.c_proj": C}
        for i in range(model.config.n_layer):
            for module, width in widths.items():
                state[f"transformer.h.{i}.{module}.bias"] = torch.zeros(width)
        state["transformer.ln_f.bias"] = torch.zeros(C)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Writing


def _is_previous_export(path):
    names = os.listdir(path)
    return "config.json" in names and set(names) <= set(EXPORT_FILES)


def export(model, out, template=chat.TEMPLATE, tokenizer=chat.TOKENIZER, force=False):
    """Write model (our GPT) as a Hugging Face GPT-2 directory at out, with the tokenizer and chat template."""
    out = os.path.abspath(out)
    if os.path.isfile(out):
        raise FileExistsError(f"--out {out} is a file: pass a directory")
    replace = os.path.isdir(out) and os.listdir(out)
    if replace and not force and not _is_previous_export(out):
        raise FileExistsError(f"--out {out} is not empty and does not look like a previous export: pick another "
                              f"directory, or pass --force to write the export files into it (other files are kept)")
    from safetensors.torch import save_file

    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(out)}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        save_file(hf_state_dict(model), os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        umask = os.umask(0o022)
        os.umask(umask)
        os.chmod(os.path.join(tmp, "model.safetensors"), 0o666 & ~umask)  # safetensors writes it 0600
        files = {
            "config.json": hf_config(model.config),
            "generation_config.json": {"bos_token_id": chat.EOT, "eos_token_id": chat.EOT, "pad_token_id": chat.EOT},
            **tokenizer_files(chat.get_encoder(tokenizer), template, model.config.block_size),
        }
        for name, content in files.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                if isinstance(content, str):
                    f.write(content)
                else:
                    json.dump(content, f, indent=None if name.startswith(("tokenizer.json", "vocab")) else 2,
                              ensure_ascii=False)
        if not replace:  # new or empty directory: one rename
            if os.path.isdir(out):
                os.rmdir(out)
            os.replace(tmp, out)
        elif force and not _is_previous_export(out):  # keep the directory's other files (README, .git, ...)
            for name in EXPORT_FILES:
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
        else:  # a previous export: swap the directories, then delete the old one
            old = f"{tmp}.old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@torch.no_grad()
def check_export(model, out, seed=0):
    """Max abs logit difference between our model and the export, loaded back by init_from and (if installed) by
    transformers, on random tokens. Returns {name: difference}."""
    from model import from_pretrained
    T = min(64, model.config.block_size)
    idx = torch.randint(0, chat.VOCAB_SIZE, (2, T), generator=torch.Generator().manual_seed(seed))
    ours = model(idx, all_logits=True)[0][..., :chat.VOCAB_SIZE]
    diffs = {"init_from=DIR": (from_pretrained(out).eval()(idx, all_logits=True)[0] - ours).abs().max().item()}
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return diffs
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    diffs["transformers"] = (hf(idx).logits - ours).abs().max().item()
    return diffs


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="export.py")
    if not cfg["out"]:
        raise ValueError("where to? pass --out=DIR (the Hugging Face model directory to write)")
    path = cfg["ckpt"] or find_checkpoint(cfg["out_dir"])
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt).eval()
    ckpt.pop("model"), ckpt.pop("optimizer", None)  # free them: the export makes its own copies of the weights
    export(model, cfg["out"], ckpt.get("template", chat.TEMPLATE), ckpt.get("tokenizer", chat.TOKENIZER),
           cfg["force"])
    print(f"exported {path} -> {cfg['out']} ({model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"block_size {model.config.block_size})")
    if cfg["check"]:
        for name, diff in check_export(model, cfg["out"]).items():
            print(f"check: max abs logit difference, checkpoint vs export loaded by {name}: {diff:.3g}")


if __name__ == "__main__":
    configurator.run(main)
