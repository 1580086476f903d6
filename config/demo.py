# The embedded demo: a small from-scratch model that learns data/demo on a CPU in minutes.
#   python data/demo/generate.py && python prepare.py data/demo/train.jsonl --out_dir=data/demo
#   python train.py config/demo.py
out_dir = "out-demo"
dataset = "demo"
init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
block_size = 64
batch_size = 32
learning_rate = 2e-3
min_lr = 2e-4
max_iters = 1200
warmup_iters = 50
eval_interval = 100
eval_iters = 10
log_interval = 50
patience = 5
weight_decay = 0.1
