# A text classifier trained from scratch (docs/classification.md), e.g. on the SMS Spam Collection:
#   python prepare.py SMSSpamCollection.tsv --task=classify --out_dir=data/spam [--balance]
#   python train.py config/classify_spam.py      # a minute or two on a laptop CPU; prints the test split's results
# Nothing here depends on the number of classes or their names: they come from the prepared dataset.
out_dir = "out-spam"
dataset = "data/spam"
init_from = "scratch"
n_layer = 4
n_head = 4
n_embd = 128
block_size = 64  # longer texts keep their end (SMS: 99% of the messages fit)
dropout = 0.1
bias = False
batch_size = 32
learning_rate = 1e-3
min_lr = 1e-4
max_iters = 600
warmup_iters = 50
eval_interval = 50
eval_iters = 10
log_interval = 25
patience = 6
