# GPT-2 124M pretrained from scratch on a web-text corpus (FineWeb-Edu, OpenWebText, ...), on one node of 8 GPUs:
# nanoGPT's config/train_gpt2.py in this project's keys, with llm.c's schedule for 10B tokens (docs/training.md,
# "Pretraining GPT-2 124M", says what they report and how to prepare the corpus):
#   python prepare.py 'hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT/*.parquet' --text_column=text \
#       --out_dir=data/fineweb_edu --val_fraction=0.001
#   torchrun --standalone --nproc_per_node=8 train.py config/pretrain_gpt2.py
# Other GPU counts: keep tokens per step by scaling gradient_accumulation_steps (1 GPU: 32; 4 GPUs: 8).
out_dir = "out-gpt2-124m"
dataset = "data/fineweb_edu"
init_from = "scratch"

# the GPT-2 124M shape (12 layers, 12 heads, 768 wide, context 1024; the vocabulary padded to 50,304)
n_layer = 12
n_head = 12
n_embd = 768
block_size = 1024
bias = True
dropout = 0.0  # pretraining on far more tokens than the model can memorise: no dropout

# 16 sequences x 1024 tokens x 4 micro-batches per GPU x 8 GPUs = 524,288 tokens (~0.5M) per optimizer step
batch_size = 16
gradient_accumulation_steps = 4
_gpus = 8  # what the batch is sized for (torchrun --nproc_per_node); "_": not a train.py key
_tokens_per_step = batch_size * block_size * gradient_accumulation_steps * _gpus

# AdamW as in GPT-3's small models: peak 6e-4 after a linear warmup, cosine to a tenth of it
learning_rate = 6e-4
min_lr = 6e-5
warmup_iters = 700
max_iters = 19_073  # 19,073 x 524,288 = 10.0B tokens: one pass over a 10B-token sample
lr_decay_iters = max_iters
weight_decay = 0.1
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0

eval_interval = 250  # val loss every 250 steps (131M tokens); a checkpoint when it improves
eval_iters = 20  # 20 batches of 16 x 1024 per process
log_interval = 10
patience = 0  # the whole schedule: a run this long does not overfit a 10B-token corpus
sample_max_tokens = 64
