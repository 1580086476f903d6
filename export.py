"""Export a fine-tuned checkpoint (a chat / text model, or a
classifier) as a Hugging Face GPT-2 model directory.

    python export.py --out=hf-model                          # newest run's best checkpoint in out_dir
    python export.py --ckpt=out/finetuned_20260101_120000.pt --out=hf-model --check

The directory loads as it is with `transformers.GPT2LMHeadModel.from_pretrained(DIR)` and
`AutoTokenizer.from_pretrained(DIR)`, and back into this project with `--init_from=DIR`:

    config.json, generation_config.json      GPT-2 config (n_positions = the trained block_size); eos_token_id 50256
                                             (a trained tokenizer's: its own vocab_size and <|endoftext|> id)
    model.safetensors                        weights under transformers' names, Conv1D layout; the head is tied
    vocab.json, merges.txt, tokenizer.json   the GPT-2 tokenizer, built from tiktoken's own ranks (no download), or
                                             the checkpoint's trained one (prepare.py --task=tokenizer)
    tokenizer_config.json                    with a chat_template that renders exactly this project's template
    special_tokens_map.json

Padded vocabulary rows (50257..50303) are dropped, a bias=False model gets zero biases (exactly
equivalent), and the directory is written beside --out first and moved into place at the end. An
existing --out is replaced only if it holds nothing but a previous export; --force writes into any
directory (other files there are kept). --check compares the logits of the export with the
checkpoint's (ours, and transformers' when installed). Push it to the Hub with `hf upload USER/REPO
DIR` (see the README).

A classifier's checkpoint (train.py on a dataset prepared with --task=classify) exports as
transformers' GPT2ForSequenceClassification: config.json with id2label / label2id (our label names)
and pad_token_id, the head as `score`, no generation_config.json, and a tokenizer that encodes as
training did (each text's tokens then <|endoftext|>, padded with an added <|pad|> token, a long text
keeping its end); docs/classification.md#export.

A LoRA checkpoint exports its merged model the same way. With --adapter_only it writes only the
adapters, as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors) that loads
onto the base with `peft.PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(BASE), DIR)`.
The rows of a template's new special tokens (chatml_special) go in as PEFT's trainable_token_indices: resize the
base to hold them first (docs/huggingface.md#special-tokens). In a full export they are added tokens of the
tokenizer, and generation_config stops on them.

--format=gguf writes a chat or text model (LoRA merged) as DIR/<DIR's name>.gguf for llama.cpp /
Ollama / LM Studio (--gguf_type=f16|bf16|q8_0|f32) and DIR/Modelfile for Ollama: docs/gguf.md.
"""
import json
import os
import shutil

import torch
from safetensors.torch import save, save_file

import configurator
from chat_gpt2 import chat
from chat_gpt2.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chat_gpt2.errors import ConfigError, OutputExistsError
from chat_gpt2.files import atomic_write, disk_error, temporary_dir
from chat_gpt2.gguf_export import check_gguf_type, export_gguf
from chat_gpt2.hf_gpt2 import HF_CLASSIFIER, PAD_ID, from_pretrained, hf_config, hf_state_dict
from chat_gpt2.hf_tokenizer import tokenizer_files
from chat_gpt2.lora import peft_adapter

DEFAULTS = dict(  # `python export.py --help` prints these comments
    out_dir="out",  # the run's folder: its newest best checkpoint is exported unless --ckpt says which
    ckpt="",  # a checkpoint file (finetuned_*.pt); "" = the newest best one in out_dir
    out="",  # the directory to write (required)
    force=False,  # write into an existing directory that holds other files (they are kept)
    check=False,  # after writing, compare logits: export vs checkpoint (ours, and transformers' if installed)
    adapter_only=False,  # a LoRA checkpoint: write its adapters as a PEFT adapter directory, not the merged model
    format="hf",  # hf: a Hugging Face model directory; gguf: DIR/<DIR's name>.gguf + DIR/Modelfile (docs/gguf.md)
    gguf_type="f16",  # --format=gguf: the matrices' type, f16, bf16, q8_0 or f32
)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
EXPORT_FILES = ("chat_gpt2_export.json", "config.json", "generation_config.json", "model.safetensors", "vocab.json",
                "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# ----------------------------------------------------------------------------------------------------------------
# Writing


MARKER = EXPORT_FILES[0]  # written into every export: only a folder holding it is ours to replace


def _is_previous_export(path):
    names = os.listdir(path)
    return MARKER in names and set(names) <= set(EXPORT_FILES)


def resolve_out(out, force):
    """The real directory to write (a symlink to a folder: that
    folder) and whether something is there already."""
    out = os.path.abspath(out)
    if os.path.islink(out) and not os.path.exists(out):
        raise OutputExistsError(f"--out {out} is a symlink to {os.readlink(out)}, which does not exist")
    out = os.path.realpath(out)
    if os.path.exists(out) and not os.path.isdir(out):
        raise OutputExistsError(f"--out {out} is a file: pass a directory")
    replace = bool(os.path.isdir(out) and os.listdir(out))
    if replace and not force and not _is_previous_export(out):
        raise OutputExistsError(f"--out {out} is not empty and holds no previous export of this project: pick "
                                f"another directory, or pass --force to write the export files into it (other files "
                                f"are kept)")
    return out, replace


def export(model, out, template=chat.TEMPLATE, tokenizer=chat.TOKENIZER, force=False, special_tokens=None):
    """Write model (our GPT) as a Hugging Face GPT-2 directory at out, with the tokenizer (and the special tokens
    the checkpoint records, {marker: id}) and chat template. It is built beside out and moved into place whole: a
    failure (a full disk) leaves what was there untouched."""
    out, replace = resolve_out(out, force)
    enc = chat.with_special_tokens(chat.get_encoder(tokenizer), special_tokens)
    try:
        with temporary_dir(os.path.dirname(out), f".{os.path.basename(out)}.tmp") as tmp:
            _write_export(model, tmp, template, enc)
            if not replace:  # new or empty directory: one rename
                if os.path.isdir(out):
                    os.rmdir(out)
                os.replace(tmp, out)
            elif not _is_previous_export(out):  # --force: keep the directory's other files (README, .git, ...)
                for name in EXPORT_FILES:  # and no export file of an earlier export that this one does not write
                    if os.path.exists(os.path.join(tmp, name)):
                        os.replace(os.path.join(tmp, name), os.path.join(out, name))
                    elif os.path.isfile(os.path.join(out, name)):
                        os.remove(os.path.join(out, name))
            else:  # a previous export: swap the directories, then delete the old one
                old = f"{tmp}.old"
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
    except Exception as e:  # safetensors reports a full disk as its own error type
        full = disk_error(e, f"exporting to {out}")
        if full is None:
            raise
        raise full from None


def generation_config(enc):
    """generation_config.json: generate stops on chat.stop_ids (<|endoftext|>, a template's <|im_start|>, <|im_end|>)
    and never samples an id that is no token (the free one before added special tokens)."""
    stops = chat.stop_ids(enc)
    config = {"bos_token_id": enc.eot_token, "eos_token_id": stops[0] if len(stops) == 1 else stops,
              "pad_token_id": enc.eot_token}
    gaps = [int(i) for i in (~chat.is_token(enc, enc.n_vocab)).nonzero()[0]]
    return {**config, "suppress_tokens": gaps} if gaps else config


def _write_export(model, folder, template, enc):
    labels = getattr(model, "labels", None)  # a classifier (classifier.GPTClassifier)
    vocab_size = chat.VOCAB_SIZE if labels else enc.n_vocab
    save_file(hf_state_dict(model, vocab_size), os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    umask = os.umask(0o022)
    os.umask(umask)
    os.chmod(os.path.join(folder, "model.safetensors"), 0o666 & ~umask)  # safetensors writes it 0600
    files = {
        "config.json": hf_config(model.config, labels, vocab_size, enc.eot_token, chat.stop_ids(enc)),
        **({} if labels else {"generation_config.json": generation_config(enc)}),
        **tokenizer_files(enc, template, model.config.block_size, classify=bool(labels)),
    }
    added = chat.declared_tokens(enc)  # the template's special tokens (a trained tokenizer's others: its own)
    files[MARKER] = {"format": "chat_gpt2 export", "files": [MARKER, "model.safetensors", *files],
                     **({"special_tokens": added} if added else {})}
    for name, content in files.items():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            if isinstance(content, str):
                f.write(content)
            else:
                json.dump(content, f, indent=None if name.startswith(("tokenizer.json", "vocab")) else 2,
                          ensure_ascii=False)


def export_adapter(ckpt, out, force=False):
    """Write a LoRA checkpoint's adapters as a PEFT adapter directory
    at out. Returns the base's name or path."""
    if "lora" not in ckpt:
        raise ConfigError("--adapter_only needs a LoRA checkpoint (trained with --lora_rank > 0); this one holds a "
                          "full model: export it without --adapter_only")
    base = ckpt["base"]["init_from"]
    if base == "scratch":
        raise ConfigError("--adapter_only: this run's base was a random (init_from=scratch) model, which exists "
                          "nowhere outside this project: export the merged model instead (drop --adapter_only)")
    if ckpt.get("trained_rows"):
        print(f"the adapters train the rows of new tokens {ckpt['trained_rows']}: resize the base first, "
              f"base.resize_token_embeddings({max(ckpt['trained_rows']) + 1}), then PeftModel.from_pretrained")
    model = model_from_checkpoint(ckpt, merge=False)
    config, tensors = peft_adapter(model, base)
    out = os.path.abspath(out)
    if os.path.isfile(out) or (os.path.isdir(out) and set(os.listdir(out)) - set(ADAPTER_FILES) and not force):
        raise OutputExistsError(f"--out {out} exists and holds other files than an adapter: pick another "
                                f"directory, or pass --force to write the adapter files into it")
    os.makedirs(out, exist_ok=True)
    with atomic_write(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with atomic_write(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
        f.write(save(tensors, metadata={"format": "pt"}))
    return base


@torch.no_grad()
def check_export(model, out, seed=0, tokenizer=chat.TOKENIZER):
    """Max abs logit difference between our model and the export, loaded back by init_from (GPT-2's vocabulary
    only) and (if installed) by transformers, on random tokens. Returns {name: difference}."""
    T, n_vocab = min(64, model.config.block_size), chat.get_encoder(tokenizer).n_vocab
    idx = torch.randint(0, n_vocab, (2, T), generator=torch.Generator().manual_seed(seed))
    if getattr(model, "labels", None):
        return check_classifier_export(model, out, idx)
    ours = model(idx, all_logits=True)[0]  # cut below to the rows the export holds
    diffs = {}
    if isinstance(tokenizer, str):  # init_from=DIR reads GPT-2's vocabulary (a trained one: its checkpoint)
        back = from_pretrained(out).eval()(idx, all_logits=True)[0]
        diffs["init_from=DIR"] = (back - ours[..., :back.size(-1)]).abs().max().item()
    try:
        from transformers import GPT2LMHeadModel
    except ImportError:
        return diffs
    hf = GPT2LMHeadModel.from_pretrained(out).eval()
    logits = hf(idx).logits
    diffs["transformers"] = (logits - ours[..., :logits.size(-1)]).abs().max().item()
    return diffs


@torch.no_grad()
def check_classifier_export(model, out, idx):
    """check_export for a classifier: class logits of the rows of idx cut to different lengths and
    right-padded with the pad token, ours vs transformers' GPT2ForSequenceClassification (the export
    loads nowhere else)."""
    try:
        from transformers import GPT2ForSequenceClassification
    except ImportError:
        return {}
    lengths = torch.tensor([idx.size(1), max(1, idx.size(1) // 3)])
    real = torch.arange(idx.size(1)) < lengths[:, None]
    padded = idx.masked_fill(~real, PAD_ID)
    hf = GPT2ForSequenceClassification.from_pretrained(out).eval()
    logits = hf(input_ids=padded, attention_mask=real.long()).logits
    return {"transformers": (logits - model.classify(idx, lengths)).abs().max().item()}


def export_gguf_checkpoint(path, ckpt, cfg):
    """--format=gguf: the checkpoint's model (LoRA merged) as a GGUF file and an Ollama Modelfile."""
    if "classify" in ckpt:
        raise ConfigError(f"--format=gguf: {path} is a classifier, which llama.cpp cannot run: export it as a "
                          f"Hugging Face directory (drop --format)")
    model = model_from_checkpoint(ckpt).eval()
    stop = ckpt.get("default_stop", chat.NEWLINE_STOP)  # None: a text model (no stop, no chat template)
    gguf = export_gguf(model, cfg["out"], ckpt.get("template", chat.TEMPLATE), ckpt.get("tokenizer", chat.TOKENIZER),
                       (stop,) if stop else (), cfg["gguf_type"], cfg["force"], chat_model=stop is not None)
    print(f"exported {path} -> {gguf} ({cfg['gguf_type']}, {os.path.getsize(gguf) / 1e6:.1f} MB, context "
          f"{model.config.block_size}) and {os.path.join(os.path.dirname(gguf), 'Modelfile')}")


def main(argv=None):
    cfg, _ = configurator.load(DEFAULTS, argv, prog="export.py")
    if not cfg["out"]:
        raise ConfigError("where to? pass --out=DIR (the Hugging Face model directory to write)")
    if cfg["format"] not in ("hf", "gguf"):
        raise ConfigError(f"--format={cfg['format']}: unknown format (hf or gguf)")
    if cfg["format"] == "gguf":
        check_gguf_type(cfg["gguf_type"])
        if cfg["adapter_only"] or cfg["check"]:
            raise ConfigError("--format=gguf writes the merged model and has no --check (docs/gguf.md checks it in "
                              "llama.cpp): drop --adapter_only / --check")
    path = cfg["ckpt"] or find_checkpoint(cfg["out_dir"])
    ckpt = load_checkpoint(path)
    if cfg["format"] == "gguf":
        export_gguf_checkpoint(path, ckpt, cfg)
        return
    if cfg["adapter_only"]:
        base = export_adapter(ckpt, cfg["out"], cfg["force"])
        print(f"exported the LoRA adapters of {path} -> {cfg['out']} (PEFT; base {base}"
              + ("" if os.path.isdir(base) or not os.path.exists(base) else
                 ": one of our checkpoints, export it too and load the adapters onto that") + ")")
        return
    model = model_from_checkpoint(ckpt).eval()
    ckpt.pop("model"), ckpt.pop("optimizer", None)  # free them: the export makes its own copies of the weights
    export(model, cfg["out"], ckpt.get("template", chat.TEMPLATE), ckpt.get("tokenizer", chat.TOKENIZER),
           cfg["force"], ckpt.get("special_tokens"))
    labels = getattr(model, "labels", None)
    print(f"exported {path} -> {cfg['out']} ({model.get_num_params(non_embedding=False) / 1e6:.2f}M parameters, "
          f"block_size {model.config.block_size}"
          + (f"; {HF_CLASSIFIER}, labels {', '.join(labels)})" if labels else ")"))
    if cfg["check"]:
        figures = check_export(model, cfg["out"], tokenizer=ckpt.get("tokenizer", chat.TOKENIZER))
        for name, diff in figures.items():
            print(f"check: max abs logit difference, checkpoint vs export loaded by {name}: {diff:.3g}")
        if not figures:
            print("check: transformers is not installed: nothing loads a classifier export to compare with")


if __name__ == "__main__":
    configurator.run(main)
