"""eval.py --pairs: DPO's rewards of a policy against a reference checkpoint (accuracy, margin) and a judge's win
rate; a DPO run from a checkpoint is preferred by them over its own start; the model's own preference
(chosen_likelier) whatever the reference; a prepared dataset's val pairs."""
import sys

import pytest

import eval as eval_script
from helpers import save_tiny_checkpoint, tiny_model, tiny_train_args, train_inprocess, write_records

RECORDS = [{"prompt": f"What is {i} plus {i + 1}?", "chosen": f"It is {2 * i + 1}.",
            "rejected": "Figure it out yourself."} for i in range(16)]
JUDGE = f"{sys.executable} -c \"import json, sys; print(len(json.load(sys.stdin)['response']))\""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the pairs file, the starting checkpoint, the DPO run's folder)."""
    from chat_gpt2.preference import build_preference_dataset
    root = tmp_path_factory.mktemp("pairs")
    pairs = write_records(root / "pairs.jsonl", RECORDS)
    build_preference_dataset([pairs], str(root / "data"), val_fraction=0.25)
    start = save_tiny_checkpoint(root / "start.pt", tiny_model(residual_scale=1))
    out = str(root / "dpo")
    train_inprocess(tiny_train_args(str(root / "data"), out, init_from=start, preference_loss="dpo",
                                    beta=0.5, block_size=48, batch_size=4, learning_rate=3e-3, max_iters=8))
    return pairs, start, out, str(root / "data")


def test_a_dpo_run_beats_its_start_in_reward_accuracy_and_margin(trained, capsys):
    pairs, start, out, _ = trained
    summary = eval_script.main([f"--out_dir={out}", f"--pairs={pairs}", f"--reference={start}", "--beta=0.5",
                                "--device=cpu"])
    assert summary["pairs"] == 16 and summary["rewards/accuracies"] > 0.5 and summary["rewards/margins"] > 0
    assert "16 pairs against" in capsys.readouterr().out


def test_the_start_against_itself_has_no_margin_and_ties_under_the_judge(trained):
    pairs, start, _, _ = trained
    summary = eval_script.main([f"--init_from={start}", f"--pairs={pairs}", f"--reference={start}", "--device=cpu",
                                f"--judge_cmd={JUDGE}", "--max_new_tokens=4"])
    assert summary["rewards/accuracies"] == 0 and summary["rewards/margins"] == pytest.approx(0, abs=1e-6)
    assert summary["win_rate"] == 0.5  # the same replies: every prompt a tie


def test_chosen_likelier_is_the_models_own_preference_whatever_the_reference(trained):
    pairs, start, out, _ = trained
    args = [f"--pairs={pairs}", "--device=cpu"]
    alone = eval_script.main([f"--out_dir={out}", *args])  # no reference: the rewards are beta x logp
    against = eval_script.main([f"--out_dir={out}", f"--reference={start}", *args])
    itself = eval_script.main([f"--init_from={start}", f"--reference={start}", *args])
    assert alone["chosen_likelier"] == alone["rewards/accuracies"] == against["chosen_likelier"]
    assert alone["logps/chosen"] == pytest.approx(against["logps/chosen"], abs=1e-6)
    assert alone["rewards/chosen"] == pytest.approx(0.1 * alone["logps/chosen"], rel=1e-6)
    assert itself["rewards/accuracies"] == 0 and itself["chosen_likelier"] == 1  # the shorter reply is chosen
    gap = [s["logps/chosen"] - s["logps/rejected"] for s in (itself, against)]
    assert gap[1] > gap[0]  # DPO widened the model's own preference


def test_pairs_from_a_prepared_dataset_are_its_val_split(trained):
    from chat_gpt2.preference import load_preference
    pairs, start, out, data = trained
    from_dir = eval_script.main([f"--out_dir={out}", f"--pairs={data}", f"--reference={start}", "--device=cpu"])
    val = load_preference(data)[0]["val"]
    assert from_dir["pairs"] == len(val) == 4
    whole = eval_script.main([f"--out_dir={out}", f"--pairs={pairs}", f"--reference={start}", "--device=cpu"])
    assert from_dir["rewards/margins"] != whole["rewards/margins"]  # 4 of the 16 pairs, not all
