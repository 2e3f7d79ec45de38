"""The embedded demo: a tiny Qwen2-VL trained on real digit images, LoRA adapters for further tasks, served."""
