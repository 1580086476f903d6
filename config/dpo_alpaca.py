# Stage 3 of the preference recipe (docs/training.md#a-recipe-shakespeare-alpaca-sft-dpo), after
# config/dpo.py: DPO of the Alpaca SFT model on the pairs of the same prompts (polite vs rude)
#   python prepare.py instruction-data-with-preference.json --task=preference --skip_invalid \
#       --template=alpaca --out_dir=data/alpaca-pref
#   python train.py config/dpo.py config/dpo_alpaca.py                    # from out-sft-alpaca
# A 7M-parameter model moves far less per step than GPT-2: 20x config/dpo.py's learning rate.
out_dir = "out-dpo-alpaca"
dataset = "data/alpaca-pref"
init_from = "out-sft-alpaca"
block_size = 128  # the stage-1 model's context; every pair fits (p100 115 tokens)
batch_size = 8
max_iters = 150
learning_rate = 1e-4
min_lr = 1e-5
warmup_iters = 10
eval_interval = 25
eval_iters = 10
precompute_ref = True  # the reference's log-probabilities once: no reference forward per step
sample_max_tokens = 32
