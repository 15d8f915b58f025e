"""RWKV-6 (x060) and RWKV-7 (x070) fine-tuning with Bone adapters."""
