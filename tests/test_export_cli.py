"""export.py: our checkpoint -> a Hugging Face GPT-2 directory that transformers loads as it is: weights parity,
the output directory's rules, errors, and end to end (local HF checkpoint -> train -> sample -> export ->
transformers). The tokenizer files are tested in test_hf_tokenizer.py.

Run with -s to see the round-trip parity figures (max abs logit difference)."""
import json
import os

import pytest
import torch

import export
import helpers
import sample
from chat_gpt2.checkpoint import find_checkpoint, load_checkpoint, model_from_checkpoint
from chat_gpt2.errors import ConfigError
from chat_gpt2.hf_gpt2 import from_pretrained
from helpers import max_logit_diff, random_tokens, save_hf, tiny_hf_model

transformers = pytest.importorskip("transformers")

QUESTION, RAW_PROMPT = "What is 2 plus 3?", "The capital of France is"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    helpers.offline(monkeypatch)


# ---------------------------------------------------------------------------------------------------------------
# Weights


@pytest.mark.parametrize("bias", [True, False])
def test_transformers_and_init_from_match_our_checkpoint(exported, bias):
    model, out = exported[bias]
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.config.vocab_size == 50257 and hf.config.n_positions == 64
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied, as in GPT-2
    hf_diff = max_logit_diff(model, hf, 64)
    back = from_pretrained(out).eval()
    with torch.no_grad():
        idx = random_tokens(64)
        back_diff = (back(idx, all_logits=True)[0] - model(idx, all_logits=True)[0][..., :50257]).abs().max().item()
    print(f"\nparity export (bias={bias}): transformers vs ours {hf_diff:.3g}; init_from=DIR vs ours {back_diff:.3g}")
    assert hf_diff < 1e-5 and back_diff < 1e-5
    with open(os.path.join(out, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == 50256
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == 50256


def test_pretrained_to_checkpoint_to_export_is_lossless(tmp_path):
    """A Hugging Face model loaded by init_from and exported again gives back the same logits in transformers."""
    hf = tiny_hf_model(seed=5)
    model = from_pretrained(save_hf(hf, tmp_path / "src")).eval()
    export.export(model, str(tmp_path / "again"))
    again = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "again")).eval()
    diff = max(max_logit_diff(model, again, 64), max_logit_diff(model, hf, 64))
    print(f"\nparity transformers -> init_from -> export -> transformers: {diff:.3g}")
    assert diff < 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Writing the directory


def test_out_directory_rules(tmp_path):
    model = helpers.tiny_model(n_layer=1)
    out = tmp_path / "hf"
    export.export(model, str(out))
    export.export(model, str(out))  # a previous export is replaced
    assert sorted(os.listdir(out)) == sorted(export.EXPORT_FILES)
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]  # no temporary directory left behind
    (out / "README.md").write_text("my model card")
    with pytest.raises(FileExistsError, match="holds no previous export"):
        export.export(model, str(out))
    export.export(model, str(out), force=True)  # writes the export files, keeps the others
    assert (out / "README.md").read_text() == "my model card" and (out / "model.safetensors").exists()
    with pytest.raises(FileExistsError, match="is a file"):
        export.export(model, str(out / "README.md"))
    (tmp_path / "empty").mkdir()
    export.export(model, str(tmp_path / "empty"))  # an empty directory is fine
    assert (tmp_path / "empty" / "config.json").exists()


@pytest.mark.slow
def test_cli_errors(tmp_path):
    p = helpers.run([helpers.script("export.py"), f"--out_dir={tmp_path}", f"--out={tmp_path / 'hf'}"],
                    cwd=helpers.REPO, check=False)
    assert p.returncode == 1 and p.stderr.startswith("error: no checkpoint") and "Traceback" not in p.stderr
    with pytest.raises(ValueError, match="pass --out=DIR"):
        export.main([f"--ckpt={tmp_path / 'missing.pt'}"])


def test_adapter_only_refuses_a_full_checkpoint(tmp_path, tiny_dataset):
    out = str(tmp_path / "out")
    helpers.train_inprocess(helpers.tiny_train_args(tiny_dataset, out, max_iters=1, n_layer=1))
    with pytest.raises(ConfigError, match="needs a LoRA checkpoint"):
        export.main([f"--out_dir={out}", f"--out={tmp_path / 'a'}", "--adapter_only"])


# ---------------------------------------------------------------------------------------------------------------
# End to end: a local Hugging Face checkpoint -> train.py -> sample.py -> export.py -> transformers


@pytest.mark.slow
def test_finetune_sample_export_end_to_end(tiny_dataset, tmp_path, capsys):
    """train.py and sample.py run in this process (their main()), export.py as a command. Greedy replies are the
    same everywhere: sample.py on the checkpoint (and on the source folder) gives what a full-forward reference
    gives, and transformers' own generate on the export (and on the source model) picks the very same tokens."""
    hf_src = tiny_hf_model(seed=7)
    src = save_hf(hf_src, tmp_path / "gpt2-local")
    out_dir, hf_out = str(tmp_path / "out"), str(tmp_path / "hf-export")
    args = [a for a in helpers.tiny_train_args(tiny_dataset, out_dir, init_from=src, max_iters=3, eval_interval=3,
                                               eval_iters=1, sample_max_tokens=4)
            if not a.startswith(("--n_layer", "--n_head", "--n_embd"))]
    printed = helpers.train_inprocess(args)
    assert "memory estimate:" in printed and f"loading directory {src!r}" in printed
    best = find_checkpoint(out_dir)
    capsys.readouterr()
    sample.main([f"--ckpt={best}", "--prompt=What is 2 plus 3?", "--max_new_tokens=5", "--device=cpu", "--dtype=float32"])
    sample.main([f"--init_from={src}", "--raw", "--prompt=Once upon", "--max_new_tokens=5", "--device=cpu", "--dtype=float32"])
    assert capsys.readouterr().out.count("\n") >= 2

    # greedy replies, n tokens: the chat prompt (the briefly trained model may only answer blank lines: compared
    # token for token) and a raw prompt that it continues with words (its reply must be more than blank)
    n = 12
    chat_ids, raw_ids = helpers.prompt(QUESTION), helpers.encode(RAW_PROMPT)
    greedy = [f"--max_new_tokens={n}", "--device=cpu", "--dtype=float32", "--temperature=0"]
    sample.main([f"--ckpt={best}", f"--prompt={QUESTION}", *greedy])
    sample.main([f"--ckpt={best}", "--raw", f"--prompt={RAW_PROMPT}", *greedy])
    sample.main([f"--init_from={src}", "--raw", f"--prompt={RAW_PROMPT}", *greedy])
    chat_reply, raw_reply, src_reply = capsys.readouterr().out.split("\n")[:3]
    stop = helpers.load_ckpt(best)["default_stop"]
    model = helpers.model_of(best)
    ours_chat, ours_raw = (helpers.greedy_tokens(model, ids, n) for ids in (chat_ids, raw_ids))
    assert chat_reply == helpers.cut_reply(helpers.decode(ours_chat), [stop])
    assert raw_reply == helpers.decode(ours_raw).strip() and len(set(ours_raw)) >= 3 and raw_reply
    assert src_reply == helpers.decode(helpers.hf_greedy_tokens(hf_src, raw_ids, n)).strip() and src_reply

    p = helpers.run([helpers.script("export.py"), f"--out_dir={out_dir}", f"--out={hf_out}"], cwd=tmp_path)
    assert p.stdout.startswith(f"exported {best} -> {hf_out}")
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_out).eval()
    assert hf.config.n_positions == 32  # the fine-tuned block_size
    figures = export.check_export(model_from_checkpoint(load_checkpoint(best)).eval(), hf_out)
    print(f"\nparity fine-tuned checkpoint vs its export: {figures}")
    assert set(figures) == {"init_from=DIR", "transformers"} and max(figures.values()) < 1e-5
    # transformers' generate on the export: the same greedy tokens, hence the replies sample.py gave
    export_chat, export_raw = (helpers.hf_greedy_tokens(hf, ids, n) for ids in (chat_ids, raw_ids))
    print(f"greedy replies of the checkpoint and of its export: {helpers.decode(export_chat)!r}, "
          f"{helpers.decode(export_raw)!r}")
    assert export_chat == ours_chat and export_raw == ours_raw
    assert chat_reply == helpers.cut_reply(helpers.decode(export_chat), [stop])
    assert raw_reply == helpers.decode(export_raw).strip()


# ---------------------------------------------------------------------------------------------------------------
# Replies through transformers


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Give three tips for staying healthy."}],
    "system": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 3?"}],
    "two turns": [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello. How can I help?"},
                  {"role": "user", "content": "Name a colour.\n\nJust one."}],
}


@pytest.mark.parametrize("template_name", ["human_assistant", "alpaca", "chatml"])
def test_transformers_gives_our_greedy_reply(tmp_path, template_name):
    """What a transformers user runs on the export (apply_chat_template, generate, cut at the template's stop)
    gives the reply sample.py gives: same prompt ids, same greedy tokens, same text."""
    from chat_gpt2 import chat
    from chat_gpt2.engine import Engine, Request
    from chat_gpt2.sampling import SamplingParams
    template = chat.load_template(template_name)
    model = helpers.tiny_model(seed=5, block_size=128)  # alpaca's two turns: 90 tokens
    out = str(tmp_path / "hf")
    export.export(model, out, template)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    stop = chat.default_stop(False, template)
    params = SamplingParams(temperature=0, max_new_tokens=12, stop=(stop,))
    for name, messages in CONVERSATIONS.items():
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        assert prompt["input_ids"][0].tolist() == chat.render_prompt(messages, template), name
        with torch.no_grad():
            ids = hf.generate(**prompt, max_new_tokens=12, do_sample=False, eos_token_id=chat.EOT,
                              pad_token_id=chat.EOT)[0, prompt["input_ids"].size(1):].tolist()
        theirs = tok.decode(ids, skip_special_tokens=True).split(stop)[0].strip()
        request = Request(chat.render_prompt(messages, template), params)
        Engine(model).complete([request])
        ours = request.replies[0]
        assert theirs == ours.text.strip() and len(ours.tokens) >= 3, (name, theirs, ours.tokens)
        assert ids[:len(ours.tokens)] == ours.tokens, name
