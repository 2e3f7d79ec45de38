"""Synthetic checkpoints and adapters in the real Hugging Face / PEFT formats, for tests, benchmarks and the demo."""
