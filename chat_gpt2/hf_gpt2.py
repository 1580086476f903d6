"""Hugging Face GPT-2 <-> our GPT, both directions in one place.

In: init_from names a Hugging Face GPT-2 checkpoint: 'gpt2' .. 'gpt2-xl', any Hub repo id of a GPT-2
model, or a local directory with config.json + model.safetensors (or pytorch_model.bin, or their
sharded *.index.json forms). Files come through huggingface_hub (its cache; HF_HUB_OFFLINE=1
honoured); transformers is not needed.
Out: hf_config and hf_state_dict give transformers' GPT2LMHeadModel config and weights for
export.py, or for a classifier (classifier.GPTClassifier) GPT2ForSequenceClassification's.

Hugging Face stores the attention and MLP matmuls as Conv1D, (in, out): they are
transposed to and from our nn.Linear (out, in) by the one name list HF_CONV1D.
"""
import json
import os
from dataclasses import dataclass

import torch

from . import chat
from .errors import PretrainedError
from model import GPT, GPTConfig

OPENAI_GPT2 = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
HF_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# fixed by the weights
PRETRAINED_SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias")
# may differ from the checkpoint (block_size: crop)
PRETRAINED_TUNABLE_KEYS = ("dropout", "block_size", "flash")
HF_CLASSIFIER = "GPT2ForSequenceClassification"  # what export.py writes for a classifier
PAD_ID = chat.VOCAB_SIZE  # a classifier export's <|pad|>: the first id past GPT-2's vocabulary
EXPORT_NOTE = "chat_gpt2_export.json"  # in every export (export.py), with its special tokens
INIT_FROM_HELP = (f"init_from takes 'scratch', 'resume', a GPT-2 name ({', '.join(OPENAI_GPT2)}), "
                  f"a Hugging Face repo id, or a local Hugging Face GPT-2 checkpoint directory")


@dataclass
class PretrainedFiles:
    source: str  # for messages: "directory 'x'" or "Hub repo 'gpt2'"
    config: str  # path of config.json
    weights: list  # paths of the weight files (several when sharded)


def _local_help(name="gpt2"):
    local = f"{name.split('/')[-1]}-local"
    # not the TF / Flax / ONNX copies
    files = " config.json model.safetensors" if name in OPENAI_GPT2 else ""
    return (f"Offline: `hf download {name}{files} --local-dir {local}` on a machine with internet, "
            f"then --init_from=/path/to/{local} (HF_HUB_OFFLINE=1 skips the Hub's retries; "
            f"--init_from=scratch trains without pretrained weights)")


def _weight_files(folder, source, exists=os.path.isfile):
    """The weight files of a checkpoint folder (all shards when there
    is an index), or None when there are none."""
    for name in HF_WEIGHT_FILES:
        path = os.path.join(folder, name)
        if not exists(path):
            continue
        if not name.endswith(".index.json"):
            return [path]
        try:
            with open(path) as f:
                shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise PretrainedError(f"{source}: unreadable {name} "
                                  f"({type(e).__name__}: {e})") from None
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise PretrainedError(f"{source}: {name} lists shards that are missing: "
                                  f"{', '.join(missing[:3])}")
        return [os.path.join(folder, s) for s in shards]
    return None


def _resolve_local(folder):
    source = f"directory {folder!r}"
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PretrainedError(f"{source} has no config.json: expected a Hugging Face GPT-2 "
                              f"checkpoint (config.json + model.safetensors or pytorch_model.bin), "
                              f"as written by save_pretrained() or export.py")
    weights = _weight_files(folder, source)
    if weights is None:
        raise PretrainedError(f"{source} has config.json but no weights: "
                              f"expected one of {', '.join(HF_WEIGHT_FILES)}")
    return PretrainedFiles(source, os.path.join(folder, "config.json"), weights)


def _resolve_hub(name):
    """Download (or find in the huggingface_hub cache) config.json and the weights of a Hub repo."""
    import logging
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HFValidationError,
                                        LocalEntryNotFoundError, RepositoryNotFoundError)

    offline = bool(constants.HF_HUB_OFFLINE)
    # the cache may hold either
    candidates = [name] + ([f"openai-community/{name}"] if name in OPENAI_GPT2 else [])
    tried, local_only = [], offline
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)  # no page of retry warnings offline: we explain below
    try:
        for repo in candidates:
            def fetch(filename):
                return hf_hub_download(repo, filename, local_files_only=local_only)
            try:
                config = fetch("config.json")
                weights = None
                for filename in HF_WEIGHT_FILES:
                    try:
                        path = fetch(filename)
                    except EntryNotFoundError:  # not in this repo (or not cached): next format
                        continue
                    if filename.endswith(".index.json"):
                        with open(path) as f:
                            shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
                        weights = [fetch(shard) for shard in shards]
                    else:
                        weights = [path]
                    break
                if weights is None:
                    tried.append(f"Hub repo {repo!r}: config.json but no "
                                 f"{' / '.join(HF_WEIGHT_FILES)}"
                                 + (" in the local cache" if local_only else ""))
                    continue
                return PretrainedFiles(f"Hub repo {repo!r}", config, weights)
            except HFValidationError:
                tried.append(f"{repo!r} is neither a local directory nor a valid Hub repo id")
            except RepositoryNotFoundError:
                tried.append(f"Hub repo {repo!r} does not exist "
                             "(or is private: log in with `hf auth login`)")
            except LocalEntryNotFoundError:
                why = "HF_HUB_OFFLINE is set" if offline else "the Hub could not be reached"
                tried.append(f"Hub repo {repo!r}: not in the Hugging Face cache and {why}")
                local_only = True  # one network timeout is enough: only the cache from now on
            except EntryNotFoundError:
                tried.append(f"Hub repo {repo!r} has no config.json: not a transformers model")
            except Exception as e:  # gated repos, HTTP errors, disk full, ...: keep it to one line
                tried.append(f"Hub repo {repo!r}: {type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}")
    finally:
        hub_logger.setLevel(level)
    known = name in OPENAI_GPT2 or "/" in name
    raise PretrainedError(f"could not load pretrained model {name!r}. Tried: {'; '.join(tried)}. "
                          f"{_local_help(name if known else 'gpt2')}"
                          + ("" if known else f". {INIT_FROM_HELP}"))


def resolve_pretrained(name_or_dir):
    """PretrainedFiles for a local checkpoint directory, a Hub repo id, or one of OPENAI_GPT2."""
    name = str(name_or_dir)
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        return _resolve_local(path)
    if os.path.exists(path):
        raise PretrainedError(f"init_from {name!r} is a file: pass the directory that holds "
                              f"config.json and the weights, not the file itself")
    looks_like_path = (name.startswith((".", "/", "~")) or "\\" in name or name.count("/") > 1
                       or name.endswith("/"))
    if looks_like_path:
        raise PretrainedError(f"no such directory: {name!r}. {INIT_FROM_HELP}")
    return _resolve_hub(name)


def pretrained_config(files, overrides=None):
    """GPTConfig of a Hugging Face GPT-2 checkpoint, checked for what our GPT implements.

    overrides: dropout / flash replace the checkpoint's; block_size crops the position embeddings;
    n_layer, n_head, n_embd, vocab_size, bias must equal the checkpoint's (a pretrained model's
    shape cannot change)."""
    try:
        with open(files.config) as f:
            hf = json.load(f)
        if not isinstance(hf, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{files.source}: unreadable config.json "
                              f"({type(e).__name__}: {e})") from None
    src = files.source
    if hf.get("model_type") != "gpt2":
        raise PretrainedError(f"{src}: config.json has model_type {hf.get('model_type')!r}, "
                              f"not 'gpt2': only GPT-2 checkpoints can be loaded into this model")
    # a classifier export: its pad row, no language-model head
    if HF_CLASSIFIER in (hf.get("architectures") or ()):
        raise PretrainedError(f"{src} is a text classifier ({HF_CLASSIFIER}): "
                              f"start a run from its checkpoint file instead "
                              f"(--init_from=PATH/finetuned_*.pt)")
    try:
        n_layer, n_head, n_embd = int(hf["n_layer"]), int(hf["n_head"]), int(hf["n_embd"])
        n_positions, vocab_size = (int(hf.get("n_positions", hf.get("n_ctx", 1024))),
                                   int(hf.get("vocab_size", 50257)))
    except (KeyError, TypeError, ValueError) as e:
        raise PretrainedError(f"{src}: config.json lacks a usable {e}: "
                              f"not a GPT-2 config") from None
    unsupported = {  # settings of transformers' GPT2 that our GPT does not implement
        "activation_function": (hf.get("activation_function", "gelu_new")
                                in ("gelu_new", "gelu_pytorch_tanh")),
        "n_inner": hf.get("n_inner") in (None, 4 * n_embd),
        "layer_norm_epsilon": abs(float(hf.get("layer_norm_epsilon", 1e-5)) - 1e-5) < 1e-12,
        "scale_attn_weights": hf.get("scale_attn_weights", True) is True,
        "scale_attn_by_inverse_layer_idx": not hf.get("scale_attn_by_inverse_layer_idx", False),
        "add_cross_attention": not hf.get("add_cross_attention", False),
        "tie_word_embeddings": hf.get("tie_word_embeddings", True) is True,
    }
    bad = [f"{k}={hf.get(k)!r}" for k, ok in unsupported.items() if not ok]
    if bad:
        raise PretrainedError(f"{src}: config.json sets {', '.join(bad)}, "
                              f"which this GPT-2 implementation does not support")
    if vocab_size < chat.VOCAB_SIZE:  # more: rows of added special tokens (export_special_tokens)
        raise PretrainedError(f"{src}: vocab_size {vocab_size}, not GPT-2's {chat.VOCAB_SIZE} (or "
                              f"more, with added special tokens): the model must use the GPT-2 "
                              f"tokenizer this project encodes data with")
    config = GPTConfig(block_size=n_positions, vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head, n_embd=n_embd, dropout=0.0, bias=True)
    _apply_overrides(config, overrides or {}, src, n_positions)
    return config


def _apply_overrides(config, overrides, src, n_positions):
    """Apply a run's overrides to a pretrained config: dropout / flash replace the checkpoint's,
    block_size crops its n_positions, the shape keys must equal the checkpoint's."""
    for key, value in overrides.items():
        if key in PRETRAINED_SHAPE_KEYS:
            if value != getattr(config, key):
                raise PretrainedError(f"{key}={value!r} was requested but {src} has "
                                      f"{key}={getattr(config, key)!r}: a pretrained model's shape "
                                      f"is fixed; drop --{key} (or use --init_from=scratch)")
        elif key == "block_size":
            if value > n_positions:
                raise PretrainedError(f"block_size {value} exceeds the {n_positions} positions "
                                      f"{src} was trained with: use --block_size={n_positions} "
                                      f"or less")
            config.block_size = value
        elif key in PRETRAINED_TUNABLE_KEYS:
            setattr(config, key, value)
        else:
            raise PretrainedError(f"cannot override {key!r} of a pretrained model")


def _hf_tensors(path):
    """Yield (name, tensor) from one weight file, one tensor at a time
    (memory-mapped: never a second full copy)."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # the legacy (pre-zip) format cannot be mapped: read it whole
            raise
        state = torch.load(path, map_location="cpu", weights_only=True)
    while state:
        name = next(iter(state))
        yield name, state.pop(name)


def load_pretrained_weights(model, files):
    """Copy a Hugging Face GPT-2 state into model's parameters tensor
    by tensor; every parameter must be filled."""
    params = dict(model.named_parameters())  # the tied head appears once, as transformer.wte.weight
    loaded = set()
    block_size = model.config.block_size
    with torch.no_grad():
        for path in files.weights:
            try:
                for hf_name, tensor in _hf_tensors(path):
                    name = (hf_name[len("transformer."):] if hf_name.startswith("transformer.")
                            else hf_name)
                    if (name.endswith((".attn.bias", ".attn.masked_bias"))
                            or name == "lm_head.weight"):
                        continue  # causal-mask buffers of old checkpoints; the head is tied to wte
                    name = f"transformer.{name}"
                    if name not in params:
                        raise PretrainedError(f"{files.source}: unexpected tensor {hf_name!r}: "
                                              f"not a GPT2LMHeadModel checkpoint this model can "
                                              f"load")
                    if name.endswith(HF_CONV1D):
                        tensor = tensor.t()
                    elif name == "transformer.wpe.weight":
                        # crop the position embeddings to a smaller block_size
                        tensor = tensor[:block_size]
                    if tensor.shape != params[name].shape:
                        raise PretrainedError(f"{files.source}: {hf_name} has shape "
                                              f"{tuple(tensor.shape)}, expected "
                                              f"{tuple(params[name].shape)}")
                    params[name].copy_(tensor)
                    loaded.add(name)
            except PretrainedError:
                raise
            except Exception as e:
                raise PretrainedError(f"{files.source}: could not read {os.path.basename(path)} "
                                      f"({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    missing = sorted(set(params) - loaded)
    if missing:
        raise PretrainedError(f"{files.source}: the weights lack {len(missing)} tensors, "
                              f"e.g. {', '.join(missing[:3])}")
    return model


def from_pretrained(name_or_dir, overrides=None):
    """A GPT holding Hugging Face GPT-2 weights (see
    resolve_pretrained and pretrained_config), on the CPU.

    The model is built on the meta device and filled from the memory-mapped file tensor by tensor,
    so loading holds one copy of the weights (plus one tensor), and no time goes into a random
    initialisation that is overwritten."""
    files = (name_or_dir if isinstance(name_or_dir, PretrainedFiles)
             else resolve_pretrained(name_or_dir))
    config = pretrained_config(files, overrides)
    with torch.device("meta"):
        model = GPT(config)
    assert not list(model.buffers()), "GPT gained buffers: from_pretrained must initialise them"
    model.to_empty(device="cpu")
    model.transformer.wte.weight = model.lm_head.weight  # to_empty unties the shared parameter
    model.special_tokens = export_special_tokens(files)
    return load_pretrained_weights(model, files)


def export_special_tokens(files):
    """{marker: id} of the special tokens an export of ours added (its EXPORT_NOTE says), else {}:
    a run from it keeps their trained rows."""
    path = os.path.join(os.path.dirname(files.config), EXPORT_NOTE)
    try:
        with open(path, encoding="utf-8") as f:
            return dict(json.load(f).get("special_tokens") or {})
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


# --------------------------------------------------------------------------------------------------
# Out: our GPT as transformers' GPT2LMHeadModel (export.py)


def hf_config(config, labels=None, n_vocab=chat.VOCAB_SIZE, eot=chat.EOT, stops=()):
    """config.json for transformers' GPT2LMHeadModel from our GPTConfig, with n_vocab rows (the
    tokenizer's: GPT-2's, a trained one's (tokenizer.py), more for a template's special tokens),
    eot its <|endoftext|> and stops the ids generation stops on (chat.stop_ids; default eot); with
    labels (a classifier's class names in head order), for GPT2ForSequenceClassification: id2label
    / label2id, and a pad token of its own, PAD_ID (one embedding row more). transformers reads each
    row's last token that is not pad_token_id: that must be the <|endoftext|> our head reads, so the
    pad cannot be <|endoftext|> as in the language-model export."""
    eos = list(stops) or [eot]
    hf = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": n_vocab, "n_positions": config.block_size, "n_ctx": config.block_size,
        "n_embd": config.n_embd, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_inner": None,
        "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "initializer_range": 0.02,
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True, "use_cache": True, "torch_dtype": "float32",
        "bos_token_id": eot, "eos_token_id": eos[0] if len(eos) == 1 else eos,
    }
    if labels is not None:
        hf.update({"architectures": [HF_CLASSIFIER], "vocab_size": PAD_ID + 1,
                   "pad_token_id": PAD_ID,
                   "id2label": {str(i): label for i, label in enumerate(labels)},
                   "label2id": {label: i for i, label in enumerate(labels)},
                   "problem_type": "single_label_classification"})
    return hf


def hf_state_dict(model, n_vocab=chat.VOCAB_SIZE):
    """Our weights under transformers' GPT-2 names: Conv1D weights transposed to (in, out), the
    token embedding cut to the tokenizer's n_vocab rows (GPT-2's 50257, more with a template's
    special tokens), zero biases for a bias=False model; no lm_head.weight
    (tied to wte). A classifier's `score` keeps its name (GPT2ForSequenceClassification's, bias-free
    too) and wte gets a zero row for PAD_ID: the padding's embedding is never read (it follows the
    last real token, and attention is causal)."""
    if model.config.vocab_size < n_vocab:
        raise ValueError(f"the model's vocabulary ({model.config.vocab_size}) is smaller than "
                         f"its tokenizer's {n_vocab}: it cannot be exported as a GPT-2 model")
    classifier = getattr(model, "labels", None) is not None
    state = {}
    # the tied head appears once, as transformer.wte.weight
    for name, p in model.named_parameters():
        p = p.detach()
        if name.endswith(HF_CONV1D):
            p = p.t()
        elif name == "transformer.wte.weight":
            p = p[:n_vocab]
            if classifier:
                p = torch.cat([p, p.new_zeros(PAD_ID + 1 - chat.VOCAB_SIZE, p.size(1))])
        state[name] = p.contiguous()
    if not model.config.bias:
        C = model.config.n_embd
        widths = {"ln_1": C, "ln_2": C, "attn.c_attn": 3 * C, "attn.c_proj": C,
                  "mlp.c_fc": 4 * C, "mlp.c_proj": C}
        for i in range(model.config.n_layer):
            for module, width in widths.items():
                state[f"transformer.h.{i}.{module}.bias"] = torch.zeros(width)
        state["transformer.ln_f.bias"] = torch.zeros(C)
    return state
