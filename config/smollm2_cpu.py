"""SmolLM2-135M on CPU, commonsense, with the benchmark's evaluation protocol: the recipe of RESULTS.md's
commonsense table.

    python train.py config/smollm2_cpu.py --method=lora --max_iters=50 --eval_interval=25 --eval_limit=200

The quick start (train.py's defaults) trains fewer steps and decodes greedily on fewer examples, to end in minutes;
this is the previous default: ~30 minutes on 2 cores as it stands (100 steps, 2 validation passes, beam search
over 50 examples of each of the 7 test sets).
"""
lora_r = 16
lora_alpha = 32
cutoff_len = 256
batch_size = 16
micro_batch_size = 8
max_iters = 100
lr = 5e-4
warmup_steps = 10
reflora_warmup = 20
eval_interval = 50
eval_limit = 50
eval_sets = ()  # every test set present
num_beams = 4  # the benchmark's protocol: 4 beams, 32 new tokens
max_new_tokens = 32
group_by_length = False
