"""RWKV-6 (x060) fine-tuning with Bone adapters."""
