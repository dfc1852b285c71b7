"""LoRA SFT trainer (torch + peft) and export of datasets for other trainers."""
