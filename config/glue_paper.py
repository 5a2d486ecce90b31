"""The RefLoRA paper's GLUE settings (on DeBERTaV3-base there): r=8, α=8, max length 64, lr of the 1e-3 class,
5 epochs, 100 warmup steps; here applied to the LLaMA classifier (LoRA + a linear head on the last token).

    python train.py config/glue_paper.py --glue_task=rte [--init_from=...]
"""
task = "glue"
lora_r = 8
lora_alpha = 8
lora_dropout = 0.05
cutoff_len = 64
lr = 1e-3  # the paper tunes per task around 1e-3
epochs = 5
max_iters = 0
batch_size = 32  # not pinned in our notes: the usual DeBERTaV3 GLUE batch
micro_batch_size = 32
warmup_steps = 100
reflora_warmup = 100
weight_decay = 0.0
eval_limit = 0
