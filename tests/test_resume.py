"""Exact resume in a fresh process, with dropout on: a run stopped at iteration 4 and extended to 8 with
`--init_from=resume --max_iters=8` ends with the same weights, bit for bit, as one uninterrupted 8-iteration run."""
import os

import pytest
import torch

import helpers


@pytest.mark.slow
def test_resume_in_a_fresh_process_is_bit_exact_with_dropout(tmp_path, tiny_dataset):
    def train(out_dir, *extra):
        args = helpers.tiny_train_args(tiny_dataset, str(out_dir), dropout=0.1, max_iters=8, eval_interval=4,
                                       lr_decay_iters=8, log_interval=2)
        helpers.run([helpers.script("train.py"), *args, *extra], cwd=tmp_path)

    def last_state(out_dir):
        name = next(n for n in helpers.checkpoints(str(out_dir)) if n.endswith("_last.pt"))
        return helpers.load_ckpt(os.path.join(out_dir, name))

    train(tmp_path / "straight")
    train(tmp_path / "split", "--max_iters=4")
    assert last_state(tmp_path / "split")["iter_num"] == 4
    helpers.run([helpers.script("train.py"), f"--out_dir={tmp_path / 'split'}", "--init_from=resume",
                 "--max_iters=8"], cwd=tmp_path)
    straight, resumed = last_state(tmp_path / "straight"), last_state(tmp_path / "split")
    assert resumed["iter_num"] == straight["iter_num"] == 8
    assert straight["model"].keys() == resumed["model"].keys()
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    assert straight["val_loss"] == resumed["val_loss"]
