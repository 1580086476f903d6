# Stage 2 of the preference recipe (docs/training.md#a-recipe-shakespeare-alpaca-sft-dpo): SFT
# of the stage-1 model (config/pretrain_shakespeare.py) on the Alpaca set, the chat task:
#   python prepare.py instruction-data.json --template=alpaca --out_dir=data/alpaca
#   python train.py config/sft_alpaca.py                                   # from out-shakespeare
#   python train.py config/sft_alpaca.py --init_from=gpt2 --learning_rate=5e-5 --min_lr=5e-6
# The shape comes from the checkpoint; every conversation fits block_size 128 (p100 92 tokens).
out_dir = "out-sft-alpaca"
dataset = "data/alpaca"
init_from = "out-shakespeare"
block_size = 128
batch_size = 16
dropout = 0.0
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 200
warmup_iters = 20
eval_interval = 25
eval_iters = 10
patience = 3
min_delta = 0.001
sample_max_tokens = 32
