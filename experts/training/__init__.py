"""The training loop for seeds, experts, the dense baseline and BTX MoE finetuning (see `loop`)."""
