# Fine-tune on your own chat data (what `python prepare.py YOUR_DATA.jsonl` writes to data/chat).
#   python train.py config/finetune_chat.py
# The design values; until pretrained GPT-2 loading lands this trains a GPT-2-small-shaped model from scratch.
out_dir = "out"
dataset = "chat"
init_from = "scratch"
batch_size = 2
block_size = 128
max_iters = 1000
learning_rate = 3e-4
min_lr = 3e-5
warmup_iters = 100
dropout = 0.1
eval_interval = 50
eval_iters = 20
patience = 5
min_delta = 0.001
