# Preference tuning (DPO) on pairs prepared with `python prepare.py FILE --task=preference
# --out_dir=data/preference` (docs/training.md#preference-tuning), from an SFT run or checkpoint:
#   python train.py config/dpo.py --init_from=out-sft                  # our SFT run's best checkpoint
#   python train.py config/dpo.py --init_from=gpt2                     # pretrained GPT-2 (downloads)
#   python train.py config/dpo.py --init_from=out-sft --lora_rank=8    # the reference: adapters off
#   python train.py config/dpo.py --preference_loss=simpo --beta=2.0   # reference-free (SimPO)
#   python train.py config/dpo.py --init_from=out-sft --sft_weight=1   # + the chosen reply's NLL (RPO)
# DPO wants a small learning rate and no dropout (the policy and its reference see the same net).
out_dir = "out-dpo"
dataset = "preference"
init_from = "gpt2"
preference_loss = "dpo"
beta = 0.1
precompute_ref = False
sft_weight = 0.0  # TRL's rpo_alpha: > 0 keeps the chosen replies likely
batch_size = 4
block_size = 256
max_iters = 500
learning_rate = 5e-6
min_lr = 5e-7
warmup_iters = 20
weight_decay = 0.0
dropout = 0.0
eval_interval = 25
eval_iters = 20
patience = 5
min_delta = 0.001
