"""Offline tile tuning for the LoRA kernels (`valora tune-kernels`) and the per-GPU tables it writes."""
