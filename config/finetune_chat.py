# Fine-tune OpenAI's GPT-2 (124M) on your own chat data (what `python prepare.py YOUR_DATA.jsonl` writes to data/chat).
#   python train.py config/finetune_chat.py                                   # downloads gpt2 once (Hugging Face cache)
#   python train.py config/finetune_chat.py --init_from=/path/to/gpt2-local   # offline: a local Hugging Face directory
#   python train.py config/finetune_chat.py --init_from=scratch --n_layer=2 --n_head=2 --n_embd=64   # tiny, no weights
# The design values: the model's shape comes from the checkpoint; block_size 128 crops GPT-2's 1024 positions.
out_dir = "out"
dataset = "chat"
init_from = "gpt2"  # or gpt2-medium / gpt2-large / gpt2-xl, a Hugging Face repo id, or a local directory
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
