from .wkv6 import OPS, wkv6

__all__ = ["OPS", "wkv6"]
