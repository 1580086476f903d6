# Stage 1 of the two-stage recipe (docs/training.md): a small GPT pretrained from scratch on plain text.
#   python prepare.py path/to/input.txt --out_dir=data/shakespeare     # tinyshakespeare: one document, 90/10 split
#   python train.py config/pretrain_shakespeare.py                     # a few minutes on a laptop CPU
# Stage 2 fine-tunes it on chat data, with its shape: --init_from=out-shakespeare (this run's newest best checkpoint)
out_dir = "out-shakespeare"
dataset = "data/shakespeare"
init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 128
dropout = 0.0
bias = False
batch_size = 16
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 300
warmup_iters = 30
eval_interval = 50
eval_iters = 10
log_interval = 10
patience = 0  # the whole schedule: a pretraining run this short never overfits
sample_max_tokens = 48
