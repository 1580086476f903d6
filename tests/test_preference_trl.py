"""Our DPO against TRL's (trl pinned in requirements-dev.txt): for the same token ids and masks of a batch of
pairs, built by us (preference.py) and handed to TRL's DataCollatorForPreference, each response's
log-probability and the DPO loss that DPOTrainer computes for our models exported to GPT2LMHeadModel equal
ours within 1e-4."""
import math

import pytest
import torch

import export
from chat_gpt2.chat import EOT
from chat_gpt2.preference import build_preference_dataset, preference_loss, sequence_logps
from chat_gpt2.classify_data import load_prepared
from helpers import tiny_model, write_records

trl = pytest.importorskip("trl")
BETA, BLOCK = 0.3, 24


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(our policy, our reference, TRL's DPOTrainer on their exports, a val split of ours)."""
    from datasets import Dataset
    from transformers import AutoTokenizer, GPT2LMHeadModel
    from trl import DPOConfig, DPOTrainer
    root = tmp_path_factory.mktemp("trl")
    records = [{"prompt": f"Tell me about number {i}. " * (1 + i % 4), "chosen": f"{i} is a fine number.",
                "rejected": "No." if i % 2 else f"I will not talk about {i}, it is " + "boring " * (i % 3)}
               for i in range(16)]
    build_preference_dataset([write_records(root / "p.jsonl", records)], str(root / "data"), val_fraction=0.5)
    data = load_prepared(str(root / "data"))[0]["val"]
    models, hf = [], []
    for seed in (3, 4):  # the policy, and a reference with other weights (the log-ratios are not 0)
        model = tiny_model(seed=seed, residual_scale=1, block_size=64, vocab_size=50257)  # as exported
        export.export(model, str(root / f"hf{seed}"))
        models.append(model)
        hf.append(GPT2LMHeadModel.from_pretrained(str(root / f"hf{seed}")).eval())
    args = DPOConfig(output_dir=str(root / "trl-out"), beta=BETA, use_cpu=True, bf16=False, fp16=False,
                     report_to="none", per_device_train_batch_size=2, max_length=None)
    trainer = DPOTrainer(model=hf[0], ref_model=hf[1], args=args,
                         processing_class=AutoTokenizer.from_pretrained(str(root / "hf3")),
                         train_dataset=Dataset.from_list(records[:2]))
    trainer.model.eval()
    return models, trainer, data


def trl_values(trainer, examples):
    """TRL's (loss, logps/chosen, logps/rejected, rewards/chosen, rewards/rejected) of a batch of examples."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference
    collate = DataCollatorForPreference(pad_token_id=EOT, max_length=BLOCK + 1, truncation_mode="keep_end")
    inputs = collate(examples)
    with torch.no_grad():
        loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    metrics = trainer._metrics["eval"]
    return [loss.item()] + [metrics[k][-1] for k in ("logps/chosen", "logps/rejected", "rewards/chosen",
                                                      "rewards/rejected")]


@torch.no_grad()
def test_response_log_probabilities_and_dpo_loss_equal_trl(setup):
    (policy, reference), trainer, data = setup
    indexes = list(range(len(data)))
    x, y, m, _ = data.batch(indexes, BLOCK)
    logps, lengths = sequence_logps(policy.eval(), x, y, m)
    ref_logps, _ = sequence_logps(reference.eval(), x, y, m)
    losses, chosen_rewards, rejected_rewards = preference_loss("dpo", logps.chunk(2), ref_logps.chunk(2),
                                                               lengths.chunk(2), BETA)
    # our ids, whole: TRL's collator cuts them to BLOCK + 1 keeping the end, as fit_pair does a prompt
    examples = [dict(zip(("prompt_ids", "chosen_ids", "rejected_ids"), (t.tolist() for t in data.pair(i))))
                for i in indexes]
    assert data.cut_responses(BLOCK) == 0 and any(len(e["prompt_ids"]) + len(e["chosen_ids"]) > BLOCK + 1
                                                  for e in examples)  # some prompts are cut, no response
    n = len(indexes)
    for i in indexes:  # per pair: each response's log-probability, the rewards and the loss
        loss, logp_c, logp_r, reward_c, reward_r = trl_values(trainer, [examples[i]])
        assert logps[i].item() == pytest.approx(logp_c, abs=1e-4)
        assert logps[n + i].item() == pytest.approx(logp_r, abs=1e-4)
        assert chosen_rewards[i].item() == pytest.approx(reward_c, abs=1e-4)
        assert rejected_rewards[i].item() == pytest.approx(reward_r, abs=1e-4)
        assert losses[i].item() == pytest.approx(loss, abs=1e-4)
    loss, *_ = trl_values(trainer, examples)  # the whole padded batch: the mean loss
    assert losses.mean().item() == pytest.approx(loss, abs=1e-4)
    assert not math.isclose(loss, math.log(2), abs_tol=1e-3)  # the reference differs from the policy
