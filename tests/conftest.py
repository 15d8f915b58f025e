"""Session-wide set-up for the tests."""
import signal


def pytest_configure(config):
    # A shell that starts a command in the background (`nohup pytest &`, some CI runners) hands it SIGINT
    # ignored, and every child would inherit that: the Ctrl-C tests would send SIGINT to processes that
    # cannot receive it. Python's own handler is not inherited across exec, so children get the default.
    signal.signal(signal.SIGINT, signal.default_int_handler)
