"""Preference pairs (a prompt, a chosen and a rejected response) for DPO / SimPO: the four record
layouts read, the pairs rendered like chat data and published as a dataset (prepare.py
--task=preference), read back in batches, and the math of the preference losses (the Preference
objective in objectives.py trains with them). docs/data.md#preference-pairs describes the files.

A pair is rendered as two conversations, prompt + chosen and prompt + rejected, with the chat
template (chat.render_batch): the prompt is everything before the last reply (masked), a response
is that reply with its turn end and the closing <|endoftext|> (learned)."""
import hashlib
import json
import os
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from . import chat
from .build import BLOCK_SIZES, build_and_publish, choose_val, special_meta
from .dataset import (PREFERENCE_FILES, SPLITS, format_fields, read_array, read_meta, read_tokens,
                      write_tokens)
from .errors import ConfigError, InputError, RecordError
from .lora import LoRALinear
from .records import ROLE_ALIASES, _text, _turns, iter_records, to_conversations

SIDES = ("prompt", "chosen", "rejected")
LOSSES = ("dpo", "simpo")  # --preference_loss

# --------------------------------------------------------------------------------------------------
# Records: the four layouts -> (prompt messages, chosen text, rejected text)

HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")  # Anthropic HH-RLHF's transcript markers


def _reply(record, key, where):
    """A response: a string, or (TRL's conversational layout) a list of one assistant message."""
    value = record.get(key)
    if not isinstance(value, list):
        return _text(record, key, where)
    if len(value) != 1 or not isinstance(value[0], dict) or \
            ROLE_ALIASES.get(str(value[0].get("role", "")).lower()) != "assistant":
        raise RecordError(where, f"field '{key}' must be a string or a list of one assistant "
                          "message", "wrong type")
    return _text(value[0], "content", where, f"{key}[0].content")


def _prompt_messages(record, where, template):
    """The prompt of a {prompt, chosen, rejected} or Alpaca record, as messages."""
    if "prompt" not in record:  # Alpaca: instruction and input make the user message
        keep = {k: record[k] for k in ("instruction", "input") if k in record}
        return to_conversations({**keep, "output": "-"}, where, template)[0][:1]
    prompt = record["prompt"]
    if not isinstance(prompt, list):
        return [{"role": "user", "content": _text(record, "prompt", where)}]
    if prompt and isinstance(prompt[-1], dict) and \
            ROLE_ALIASES.get(str(prompt[-1].get("role", "")).lower()) == "assistant":
        raise RecordError(where, "field 'prompt' must end with a user message", "roles out of order")
    end = [{"role": "assistant", "content": "-"}]  # _turns checks a conversation: it ends on a reply
    return _turns(prompt + end, where, "prompt", "role", "content")[:-1]


def _transcript(record, key, where):
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages."""
    text = _text(record, key, where)
    parts = HH_TURN.split("\n\n" + text.lstrip("\n"))
    if parts[0].strip() or len(parts) < 3:
        raise RecordError(where, f"field '{key}' is not a transcript of \"Human:\" / "
                          "\"Assistant:\" turns", "not a transcript")
    messages = [{"role": "user" if role == "Human" else "assistant", "content": content}
                for role, content in zip(parts[1::2], parts[2::2])]
    return _turns(messages, where, key, "role", "content")


def _shared_prompt(record, where):
    """HH-RLHF: the turns both transcripts share are the prompt, each last reply a response."""
    chosen, rejected = (_transcript(record, key, where) for key in ("chosen", "rejected"))
    if chosen[:-1] != rejected[:-1]:
        raise RecordError(where, "field 'rejected': the two transcripts share no prompt (they "
                          "must differ in the last assistant reply only)", "no shared prompt")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def to_pair(record, where, template=chat.TEMPLATE):
    """(prompt messages, chosen text, rejected text) of a preference record in any layout."""
    if not isinstance(record, dict):
        raise RecordError(where, f"a record must be a JSON object, got {type(record).__name__}",
                          "wrong type")
    if "prompt" in record or "instruction" in record:
        prompt = _prompt_messages(record, where, template)
        chosen, rejected = (_reply(record, key, where) for key in ("chosen", "rejected"))
    elif "chosen" in record or "rejected" in record:
        prompt, chosen, rejected = _shared_prompt(record, where)
    else:
        raise RecordError(where, f"not a preference pair, keys seen: {sorted(record)}; expected "
                          "prompt/chosen/rejected, instruction/input/chosen/rejected or two "
                          "transcripts chosen/rejected", "unknown schema")
    if chosen.strip() == rejected.strip():
        raise RecordError(where, "field 'rejected' is the same as 'chosen': a pair needs two "
                          "different responses", "identical responses")
    return prompt, chosen, rejected


def read_pairs(paths, template, skip_invalid, skipped):
    """(pairs, the sha256 of each input) of the inputs; a bad record raises RecordError, or with
    skip_invalid is counted in skipped by its reason."""
    pairs, hashes = [], {}
    for path in paths:
        hasher = hashlib.sha256()
        for where, record in iter_records(path, hasher):
            try:
                if isinstance(record, RecordError):
                    raise record
                pairs.append(to_pair(record, where, template))
            except RecordError as e:
                if not skip_invalid:
                    raise
                skipped[e.reason] += 1
        hashes[path] = hasher.hexdigest()
    return pairs, hashes


# --------------------------------------------------------------------------------------------------
# Rendering and publishing


def render_pairs(pairs, template):
    """[(prompt ids, chosen ids, rejected ids)] of the pairs: each side rendered whole with its
    prompt (render_batch), the response being the last run of learned tokens."""
    conversations = [prompt + [{"role": "assistant", "content": reply}]
                     for prompt, chosen, rejected in pairs for reply in (chosen, rejected)]
    rendered = chat.render_batch(conversations, template)
    sides = []
    for a, b in zip(rendered.starts[:-1], rendered.starts[1:]):
        ids, mask = rendered.ids[a:b], rendered.mask[a:b]
        start = int(np.flatnonzero(mask == 0)[-1]) + 1  # the response: after the last masked token
        sides.append((ids[:start], ids[start:]))
    # the prompt renders the same before either response (a token never crosses a learned edge)
    return [(c[0], c[1], r[1]) for c, r in zip(sides[::2], sides[1::2])]


def write_pairs(folder, split, rendered, vocab_size):
    """<split>_prompt.bin, _chosen.bin, _rejected.bin (ids back to back, token_dtype) and
    <split>_pairs.npy (int64 (pairs + 1, 3): where each pair's prompt / chosen / rejected starts).
    Returns the split's token count."""
    offsets = np.zeros((len(rendered) + 1, 3), dtype=np.int64)
    for i, side in enumerate(SIDES):
        parts = [pair[i] for pair in rendered]
        offsets[1:, i] = np.cumsum([len(p) for p in parts])
        flat = np.concatenate(parts) if parts else np.zeros(0)
        write_tokens(os.path.join(folder, f"{split}_{side}.bin"), flat, vocab_size)
    np.save(os.path.join(folder, f"{split}_pairs.npy"), offsets)
    return int(offsets[-1].sum())


def fit_pair(prompt, response, block_size):
    """(prompt, response) cut to fit block_size tokens together (the last one is a target only,
    so block_size + 1 ids): the end of the prompt is kept (at least one token, the reply's label),
    a response too long for what is left is cut (its end is lost). Returns (prompt, response,
    whether the response was cut)."""
    room = block_size + 1
    keep = max(1, min(len(prompt), room - len(response)))
    prompt = prompt[len(prompt) - keep:]
    return prompt, response[:room - len(prompt)], len(response) > room - len(prompt)


def length_summary(rendered):
    """meta.json's lengths: percentiles of a pair's longer side, and per block size the pairs that
    do not fit and those whose response is cut (fit_pair)."""
    longer = np.asarray([len(p) + max(len(c), len(r)) for p, c, r in rendered])
    cut = {str(b): sum(fit_pair(p, c, b)[2] or fit_pair(p, r, b)[2] for p, c, r in rendered)
           for b in BLOCK_SIZES}
    return {"length_percentiles": {f"p{q}": int(np.percentile(longer, q)) for q in (50, 90, 99, 100)},
            "longer_than_block_size": {str(b): int((longer > b + 1).sum()) for b in BLOCK_SIZES},
            "responses_cut": cut}


def build_preference_dataset(inputs, out_dir, val_fraction=0.1, val_file=None, seed=1337,
                             skip_invalid=False, template="human_assistant"):
    """Read, render, split train/val and publish a preference dataset at out_dir (all or
    nothing). Returns meta."""
    if not 0 < val_fraction < 1 and val_file is None:
        raise InputError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    template = template if isinstance(template, dict) else chat.load_template(template)
    return build_and_publish(out_dir, lambda tmp: _build(tmp, inputs, val_fraction, val_file, seed,
                                                         skip_invalid, template))


def _build(tmp, inputs, val_fraction, val_file, seed, skip_invalid, template):
    skipped = Counter()
    pairs, hashes = read_pairs(inputs, template, skip_invalid, skipped)
    if val_file is None:
        val = choose_val(len(pairs), val_fraction, seed)
        split = {"train": [p for i, p in enumerate(pairs) if i not in val],
                 "val": [p for i, p in enumerate(pairs) if i in val]}
    else:
        val_pairs, val_hashes = read_pairs([val_file], template, skip_invalid, skipped)
        split, hashes = {"train": pairs, "val": val_pairs}, {**hashes, **val_hashes}
    rendered = {s: render_pairs(split[s], template) for s in SPLITS}
    for s in SPLITS:
        if not rendered[s]:
            raise InputError(f"no usable preference pairs for the {s} split")
    vocab_size = chat.template_encoder(template).n_vocab  # the ids' range: GPT-2's + the markers
    tokens = {s: write_pairs(tmp, s, rendered[s], vocab_size) for s in SPLITS}
    multiline = any("\n" in reply.strip() for s in SPLITS for _, *replies in split[s]
                    for reply in replies)
    meta = {**format_fields(vocab_size), "kind": "preference",
            "pairs": {s: len(rendered[s]) for s in SPLITS},
            "tokens": tokens, "tokenizer": chat.TOKENIZER, "vocab_size": chat.VOCAB_SIZE,
            "template": template, **special_meta(template), "multiline_replies": multiline,
            "default_stop": chat.default_stop(multiline, template), "skipped": dict(skipped),
            **length_summary(rendered["train"] + rendered["val"]), "sources": hashes,
            "seed": seed, "val_fraction": None if val_file else val_fraction}
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return meta


# --------------------------------------------------------------------------------------------------
# Reading: batches of pairs


class PreferenceData:
    """One split of a preference dataset, memory-mapped. A batch of B pairs is (x, y, m, index):
    2B rows, the B chosen sequences then the B rejected ones (prompt + response, fit_pair'ed to
    block_size, right-padded), m 1 on the response's targets, index the pairs' numbers in the
    dataset (train's first, then val's: first is the split's first number)."""

    def __init__(self, folder, split, expected_pairs, first=0, meta=None):
        self.first, meta = first, meta or read_meta(folder, PREFERENCE_FILES)
        self.sides = {s: read_tokens(folder, f"{split}_{s}.bin", meta) for s in SIDES}
        path = os.path.join(folder, f"{split}_pairs.npy")
        self.offsets = read_array(path)
        if self.offsets.shape != (expected_pairs + 1, 3) or \
                any(self.offsets[-1, i] != len(self.sides[s]) for i, s in enumerate(SIDES)):
            raise InputError(f"{path}: does not match meta.json's {expected_pairs} pairs and the "
                             "token files: the dataset is incomplete, run prepare.py again")

    def __len__(self):
        return len(self.offsets) - 1

    def pair(self, i):
        """(prompt, chosen, rejected) ids of pair i, int64 arrays."""
        a, b = self.offsets[i], self.offsets[i + 1]
        return tuple(self.sides[s][a[k]:b[k]].astype(np.int64) for k, s in enumerate(SIDES))

    def batch(self, indexes, block_size):
        x, y, m = pair_batch([self.pair(i) for i in indexes], block_size)
        return x, y, m, torch.as_tensor(indexes, dtype=torch.long) + self.first

    def get_batch(self, batch_size, block_size, generator):
        indexes = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        return self.batch(indexes, block_size)

    def cut_responses(self, block_size):
        """How many pairs have a response cut at this block_size."""
        return sum(fit_pair(p, c, block_size)[2] or fit_pair(p, r, block_size)[2]
                   for p, c, r in map(self.pair, range(len(self))))


def pair_batch(pairs, block_size):
    """(x, y, m) of pairs [(prompt, chosen, rejected) ids]: the chosen rows, then the rejected ones,
    each side fit_pair'ed to block_size, right-padded (target -1), m 1 on the response's targets."""
    rows = [fit_pair(p, response, block_size) for p, *responses in pairs for response in responses]
    rows = rows[0::2] + rows[1::2]  # chosen rows first, then rejected
    width = max(len(p) + len(r) for p, r, _ in rows) - 1
    x = torch.zeros(len(rows), width, dtype=torch.long)
    y = torch.full((len(rows), width), -1, dtype=torch.long)
    m = torch.zeros(len(rows), width, dtype=torch.float32)
    for i, (p, r, _) in enumerate(rows):
        seq = torch.from_numpy(np.concatenate([p, r]).astype(np.int64))
        x[i, :len(seq) - 1], y[i, :len(seq) - 1] = seq[:-1], seq[1:]
        m[i, len(p) - 1:len(seq) - 1] = 1.0
    return x, y, m


@torch.no_grad()
def pair_logps(model, pairs, block_size, batch_size, device):
    """(pairs, 2) the model's (chosen, rejected) log-probabilities of pairs (eval.py), fp32."""
    found = []
    for start in range(0, len(pairs), batch_size):
        x, y, m = (t.to(device) for t in pair_batch(pairs[start:start + batch_size], block_size))
        found.append(sequence_logps(model, x, y, m)[0].view(2, -1).T.float().cpu())
    return torch.cat(found)


def load_preference(folder):
    """({split: PreferenceData}, meta) of a preference dataset folder."""
    meta = read_meta(folder, PREFERENCE_FILES)
    try:
        counts = {s: int(meta["pairs"][s]) for s in SPLITS}
    except (KeyError, TypeError, ValueError):
        raise InputError(f"{folder}/meta.json: no pair counts: run prepare.py --task=preference "
                         "again") from None
    first = {"train": 0, "val": counts["train"]}
    return {s: PreferenceData(folder, s, counts[s], first[s], meta) for s in SPLITS}, meta


# --------------------------------------------------------------------------------------------------
# The losses


def sequence_logps(model, x, y, m):
    """Each row's summed log-probability of its learned targets (m), fp32, and its count of them:
    ((rows,), (rows,)). Through the model's forward (DDP and torch.compile see the call)."""
    logits, _ = model(x, all_logits=True)
    token_logps = -F.cross_entropy(logits.float().flatten(0, 1), y.clamp(min=0).flatten(),
                                   reduction="none").view_as(m)
    return (token_logps * m).sum(1), m.sum(1)


class adapters_off:
    """with adapters_off(model): the LoRA adapters of model contribute nothing (the base, as the
    frozen reference of a LoRA run: no second copy of the weights); restored on exit."""

    def __init__(self, model):
        self.layers = [m for m in model.modules() if isinstance(m, LoRALinear)]

    def __enter__(self):
        self.scales = [layer.scale for layer in self.layers]
        for layer in self.layers:
            layer.scale = 0.0

    def __exit__(self, *exc):
        for layer, scale in zip(self.layers, self.scales):
            layer.scale = scale


def preference_loss(kind, policy, reference, lengths, beta, gamma=0.0, sft_weight=0.0):
    """Per pair (loss, chosen reward, rejected reward) from (chosen, rejected) log-probabilities
    and response lengths. dpo (Rafailov et al. 2023, TRL's loss_type="sigmoid"): the rewards are
    beta * (policy - reference) log-probabilities, the loss -log sigmoid(chosen - rejected). simpo
    (Meng et al. 2024, TRL's CPO loss_type="simpo"): no reference, the rewards are beta * the mean
    log-probability per response token, the loss -log sigmoid(chosen - rejected - gamma). Either
    plus sft_weight * chosen_nll (RPO, Pang et al. 2024): the chosen reply kept likely."""
    if kind == "dpo":
        rewards = [beta * (p - r) for p, r in zip(policy, reference)]
        margin = rewards[0] - rewards[1]
    elif kind == "simpo":
        rewards = [beta * p / n.clamp(min=1) for p, n in zip(policy, lengths)]
        margin = rewards[0] - rewards[1] - gamma
    else:
        raise ConfigError(f"--preference_loss must be {' or '.join(LOSSES)}, got {kind!r}")
    loss = -F.logsigmoid(margin)
    if sft_weight:
        loss = loss + sft_weight * chosen_nll(policy[0], lengths[0])
    return loss, rewards[0].detach(), rewards[1].detach()


def chosen_nll(logps, lengths):
    """Per pair, a share of the batch's mean negative log-likelihood per chosen token (their mean
    over the pairs is that mean): TRL's SFT term (DPO's loss_type "sft" with loss_weights, formerly
    rpo_alpha; CPO's cpo_alpha), a token mean over the whole batch, not a mean per reply."""
    return -logps * (len(logps) / lengths.sum().clamp(min=1))
