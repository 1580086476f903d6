"""export.py on a classifier: a transformers GPT2ForSequenceClassification directory whose logits (single texts,
batches padded to different lengths, a text longer than block_size), pipeline labels and probabilities, and
tokenizer are ours; the config's labels and pad token; the directory rules shared with language-model exports.

Run with -s to see the parity figures (max abs logit difference)."""
import contextlib
import io
import json
import os

import pytest
import torch

import classify
import export
import helpers
from chat_gpt2.checkpoint import load_checkpoint, model_from_checkpoint
from chat_gpt2.classifier import attach_head, text_batches
from chat_gpt2.errors import ConfigError, PretrainedError
from chat_gpt2.hf_gpt2 import PAD_ID, from_pretrained

transformers = pytest.importorskip("transformers")

LABELS = ["neg", "pos", "neutral"]  # the head's order, which is not sorted
BLOCK = helpers.TINY_GPT["block_size"]
TEXTS = ["hello there", "WINNER!! Claim your prize now, call 0900", "a", "ok see you at lunch tomorrow " * 12,
         "special tokens' text is text: <|endoftext|> and <|pad|>", " a leading space\nand a line break\n"]


@pytest.fixture(scope="module")
def exported_classifier(tmp_path_factory):
    """(our classifier loaded from its checkpoint, the checkpoint's path, export.py's directory, what it printed).
    A random model whose last token's state depends on the text (helpers.tiny_model's residual_scale), its head scaled
    up: the texts get different classes, with probabilities between 0.4 and 0.99."""
    tmp = tmp_path_factory.mktemp("clf-export")
    model = attach_head(helpers.tiny_model(seed=4), LABELS)
    with torch.no_grad():
        model.score.weight.mul_(30)
    path = helpers.save_tiny_classifier(tmp / "finetuned_20260101_000000.pt", LABELS, model)
    out, printed = str(tmp / "hf"), io.StringIO()
    with contextlib.redirect_stdout(printed):
        export.main([f"--ckpt={path}", f"--out={out}", "--check"])
    return model_from_checkpoint(load_checkpoint(path)).eval(), path, out, printed.getvalue()


def our_ids(text):
    """The ids classify.py runs for text: its tokens, <|endoftext|>, the last block_size of them."""
    x, lengths = text_batches([text], BLOCK)[0]
    return x[0, :lengths[0]].tolist()


def test_config_labels_and_files(exported_classifier):
    _, path, out, printed = exported_classifier
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["architectures"] == ["GPT2ForSequenceClassification"]
    assert config["id2label"] == {"0": "neg", "1": "pos", "2": "neutral"}
    assert config["label2id"] == {"neg": 0, "pos": 1, "neutral": 2}
    assert config["pad_token_id"] == PAD_ID == 50257 != config["eos_token_id"] and config["vocab_size"] == 50258
    hf_config = transformers.AutoConfig.from_pretrained(out)
    assert hf_config.num_labels == 3 and hf_config.id2label == {0: "neg", 1: "pos", 2: "neutral"}
    assert "generation_config.json" not in os.listdir(out)  # nothing to generate with
    with open(os.path.join(out, export.MARKER)) as f:
        assert sorted(json.load(f)["files"]) == sorted(os.listdir(out))
    assert printed.startswith(f"exported {path} -> {out} (") and "labels neg, pos, neutral" in printed
    check = [line for line in printed.splitlines() if line.startswith("check:")]
    assert len(check) == 1 and "loaded by transformers" in check[0] and float(check[0].split()[-1]) < 1e-4


def test_tokenizer_encodes_as_training_did(exported_classifier):
    _, _, out, _ = exported_classifier
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == PAD_ID and tok.eos_token_id == 50256
    assert (tok.padding_side, tok.truncation_side, tok.model_max_length) == ("right", "left", BLOCK)
    long_ids = our_ids(TEXTS[3])
    assert len(helpers.encode(TEXTS[3])) + 1 > BLOCK == len(long_ids)  # it is cut, keeping its end
    for text in TEXTS:
        assert tok(text, truncation=True)["input_ids"] == our_ids(text), text
    batch = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    for row, text in enumerate(TEXTS):
        n = len(our_ids(text))
        assert batch["input_ids"][row, :n].tolist() == our_ids(text)
        assert set(batch["input_ids"][row, n:].tolist()) <= {PAD_ID} and batch["attention_mask"][row].sum() == n
    # tokenizer.json alone (the `tokenizers` library, or other readers of the file) appends <|endoftext|> too
    from tokenizers import Tokenizer
    assert Tokenizer.from_file(os.path.join(out, "tokenizer.json")).encode(TEXTS[0]).ids == our_ids(TEXTS[0])


@torch.no_grad()
def test_logits_match_ours_single_and_padded_batches(exported_classifier):
    model, _, out, _ = exported_classifier
    hf = transformers.GPT2ForSequenceClassification.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = torch.cat([model.classify(x, lengths) for x, lengths in text_batches(TEXTS, BLOCK)])
    batch = tok(TEXTS, padding=True, truncation=True, return_tensors="pt")
    assert len({int(n) for n in batch["attention_mask"].sum(1)}) >= 4  # rows of different lengths, padded
    batched = hf(**batch).logits
    single = torch.cat([hf(**tok(text, truncation=True, return_tensors="pt")).logits for text in TEXTS])
    diff = max((batched - ours).abs().max().item(), (single - ours).abs().max().item())
    print(f"\nparity classifier export: transformers vs ours {diff:.3g} (logits up to {ours.abs().max():.2f})")
    assert diff < 1e-4 and ours.abs().max() > 1


def test_pipeline_gives_our_labels_and_probabilities(exported_classifier):
    model, _, out, _ = exported_classifier
    ours = classify.predictions(model, TEXTS, "cpu", 64)
    clf = transformers.pipeline("text-classification", model=out, truncation=True)
    theirs = clf(TEXTS, top_k=None, batch_size=4)  # batches of 4: padded
    assert len({row["label"] for row in ours}) >= 2  # the texts do not all get one class
    for row, scores in zip(ours, theirs):
        assert max(scores, key=lambda s: s["score"])["label"] == row["label"]
        assert {s["label"]: s["score"] for s in scores} == pytest.approx(row["probabilities"], abs=2e-6)
    top = clf(TEXTS[1])[0]  # the plain call: the top label and its probability
    assert top["label"] == ours[1]["label"] and top["score"] == pytest.approx(ours[1]["probability"], abs=2e-6)


def test_directory_rules_and_refusals(exported_classifier, tmp_path):
    model, path, _, _ = exported_classifier
    out = tmp_path / "hf"
    export.export(helpers.tiny_model(n_layer=1), str(out))
    export.export(model, str(out))  # a previous (language-model) export is replaced, whole
    assert "generation_config.json" not in os.listdir(out) and (out / export.MARKER).exists()
    export.export(helpers.tiny_model(n_layer=1), str(out))
    (out / "README.md").write_text("my model card")
    export.export(model, str(out), force=True)  # keeps the model card, drops the other export's files
    assert (out / "README.md").read_text() == "my model card" and "generation_config.json" not in os.listdir(out)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["GPT2ForSequenceClassification"]
    with pytest.raises(PretrainedError, match="is a text classifier"):
        from_pretrained(str(out))  # init_from=DIR loads language models
    with pytest.raises(ConfigError, match="needs a LoRA checkpoint"):
        export.main([f"--ckpt={path}", f"--out={tmp_path / 'adapter'}", "--adapter_only"])
