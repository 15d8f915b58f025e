"""The independent runtimes some tests judge an export with (llama.cpp, web-rwkv, peft). Without one
such a test skips and says what to install; `.ci/run` sets CI_REQUIRE_RUNTIMES=1, which turns that
skip into a failure, so that CI cannot pass with a runtime test silently skipped."""
import importlib
import os

import pytest


def missing(why):
    """Skip saying why, or fail under CI_REQUIRE_RUNTIMES=1."""
    if os.environ.get("CI_REQUIRE_RUNTIMES") == "1":
        pytest.fail(why)
    pytest.skip(why, allow_module_level=True)   # also when a test module requires it at import


def require(module, install):
    """Import module, or skip (fail under CI_REQUIRE_RUNTIMES=1) saying `install`."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing(f"{module} is not importable ({e}): {install}")
