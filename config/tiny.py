"""Smoke test: the random-init tiny preset with the byte tokenizer, a few steps, a small eval (seconds on CPU).

    python train.py config/tiny.py
"""
init_from = "tiny"
out_dir = "out-tiny"
lora_r = 4
lora_alpha = 8
max_iters = 8
warmup_steps = 2
reflora_warmup = 2
log_interval = 2
eval_interval = 4
eval_limit = 4
max_new_tokens = 8
cutoff_len = 128
