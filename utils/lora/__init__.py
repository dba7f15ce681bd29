"""LoRA in and out: PEFT adapters folded into their base while streaming (fold.py), merged in adapter space
(combine.py, merge.py) and extracted from any fine-tune (extract.py)."""
