"""LLaMA-7B on commonsense_170k: the RefLoRA paper's recipe (on the DoRA / LLM-Adapters setup).

    python train.py config/llama_7b.py --init_from=/path/to/llama-7b [--method=reflora]

One 80 GB GPU (bf16 base weights, float32 LoRA); 2 epochs of ~170k examples = ~21k steps of 16.
"""
init_from = "checkpoints/llama-7b"  # Meta or HF checkpoint directory (override with --init_from=...)
out_dir = "out-llama-7b"
lora_r = 32
lora_alpha = 64
lora_dropout = 0.05
lora_targets = ("wq", "wk", "wv", "w3", "w2")  # q, k, v, up, down
batch_size = 16
micro_batch_size = 8
epochs = 2
max_iters = 0  # full epochs
cutoff_len = 256
val_set_size = 120
lr = 2e-4
weight_decay = 0.0
warmup_steps = 100
reflora_warmup = 200  # refactoring starts after 200 steps
reflora_interval = 1
eval_interval = 500
log_interval = 20
eval_limit = 0  # every test example
eval_batch_size = 32
num_beams = 4  # the benchmark's protocol (train.py's default is the quick start's greedy decoding)
max_new_tokens = 32
eval_base = False  # the base model's accuracy: train.py --eval_only=True into an out_dir without an adapter
group_by_length = False  # as the authors (train.py's quick start groups by length)
