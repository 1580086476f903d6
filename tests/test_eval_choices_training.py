"""train.py --eval_choices=FILE: multiple choice in HellaSwag's layout scored at evals by the language-modelling
objective, every --eval_choices_every evals, logged beside the val loss; equal to eval.py --choices on the saved
weights. A bad file, or a run of another kind, is a one-line error before training starts."""
import os

import pytest

import helpers
from chat_gpt2 import chat, objectives
from chat_gpt2.classify_data import load_prepared
from chat_gpt2.errors import ConfigError, InputError
from chat_gpt2.evaluation import choice_accuracy, choice_scores, read_choices
from helpers import checkpoints, read_metrics, tiny_train_args, train_inprocess

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hellaswag_mini.jsonl")
RUN = {"device": "cpu", "dtype": "float32", "ddp": False, "fsdp": False, "rank": 0, "master": True, "world": 1}
NAMES = ("acc", "acc_norm", "acc_norm_tokens")


def test_eval_records_carry_eval_py_choices_every_n_evals(tiny_dataset, tmp_path, offline_env):
    import eval as eval_script
    out = str(tmp_path / "run")
    stdout = train_inprocess(tiny_train_args(tiny_dataset, out, max_iters=4, eval_interval=1, dropout=0.1,
                                             eval_choices=FIXTURE, eval_choices_every=2))
    evals = [r for r in read_metrics(out) if r["event"] == "eval"]
    assert [r["iter"] for r in evals] == [0, 1, 2, 3, 4]
    # the 1st eval and every 2nd after it; the others have no choices fields
    assert [("choices_acc" in r) for r in evals] == [True, False, True, False, True]
    assert stdout.count(", choices acc ") == 3
    # the last eval's numbers are eval.py --choices's on the weights saved there (the _last.pt, iter 4)
    last = os.path.join(out, [n for n in checkpoints(out) if n.endswith("_last.pt")][0])
    summary = eval_script.main([f"--ckpt={last}", f"--choices={FIXTURE}", "--device=cpu", "--dtype=float32"])
    assert {k: evals[-1][f"choices_{k}"] for k in NAMES} == {k: summary[k] for k in NAMES}


@pytest.fixture
def offline_env(monkeypatch):
    helpers.offline(monkeypatch)


def test_report_scores_in_eval_mode_and_restores_train_mode(tiny_dataset):
    data, meta = load_prepared(tiny_dataset)
    cfg = {"batch_size": 2, "block_size": 16, "sample_max_tokens": 0, "eval_choices": FIXTURE,
           "eval_choices_every": 3}
    task = objectives.objective_for(meta, data, cfg, RUN)
    model = helpers.tiny_model(residual_scale=1, block_size=16, dropout=0.5, train=True)
    reports = [task.report(model, {}) for _ in range(5)]
    assert model.training
    items = read_choices(FIXTURE)
    model.eval()
    want = choice_accuracy(items, choice_scores(model, chat.get_encoder(), items, "cpu"))
    fields = {f"choices_{k}": want[k] for k in NAMES}
    assert [r[0] for r in reports] == [fields, {}, {}, fields, {}]
    assert reports[0][1] == f", choices acc {want['acc']:.4f} acc_norm {want['acc_norm']:.4f}"


def test_a_bad_choices_file_stops_the_run_before_training(tiny_dataset, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(open(FIXTURE).readline() + '{"ctx_a": "no endings"}\n')
    out = str(tmp_path / "run")
    with pytest.raises(InputError, match=r"bad.jsonl:2: not a HellaSwag-layout item"):
        train_inprocess(tiny_train_args(tiny_dataset, out, eval_choices=str(bad)))
    assert not checkpoints(out) and not os.path.exists(os.path.join(out, "metrics.jsonl"))
    with pytest.raises(ConfigError, match="eval_choices_every must be >= 1"):
        train_inprocess(tiny_train_args(tiny_dataset, out, eval_choices=FIXTURE, eval_choices_every=0))


@pytest.mark.parametrize("kind, extra", [("classify", {}), ("chat", {"preference_loss": "dpo"})])
def test_eval_choices_is_refused_for_other_objectives(tiny_dataset, kind, extra):
    data, meta = load_prepared(tiny_dataset)
    cfg = {"batch_size": 2, "block_size": 16, "dataset": "d", "eval_choices": FIXTURE, **extra}
    with pytest.raises(ConfigError, match="eval_choices scores a language model"):
        objectives.objective_for({**meta, "kind": kind}, data, cfg, RUN)


def test_eval_choices_is_refused_under_fsdp(tiny_dataset):
    data, meta = load_prepared(tiny_dataset)
    cfg = {"batch_size": 2, "block_size": 16, "eval_choices": FIXTURE}
    with pytest.raises(ConfigError, match="parallel=fsdp"):
        objectives.objective_for(meta, data, cfg, {**RUN, "fsdp": True})
