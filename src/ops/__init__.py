from .checks import OPS
from .wkv6 import wkv6
from .wkv7 import wkv7

__all__ = ["OPS", "wkv6", "wkv7"]
