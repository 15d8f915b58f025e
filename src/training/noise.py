"""Third-party messages that contradict us or mean nothing to a user, silenced one by one (by
their text, so every other warning still shows):

- Lightning's "unreliable results" warning on resuming mid-epoch: our sampler starts at the
  restored step, so the resume is exact (tests/test_train.py checks it bit for bit).
- Lightning's notice "`weights_only` was not set" at every resume-point save and load.
- Lightning's advertisement for litlogger.
- torch's deprecation of `isinstance(treespec, LeafSpec)`, which Lightning's own code triggers.
- Lightning's start-up lines "GPU available: False, used: False" (and TPU, HPU): the start line
  of train.py says where the run goes; and its "`Trainer.fit` stopped: `max_steps=N` reached."
  at the end, where our own summary says how many steps ran.
"""
import logging
import warnings

WARNINGS = (r".*This can cause unreliable results if further training is done.*",
            r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
LOG_LINES = ("`weights_only` was not set", "try installing [litlogger]", "GPU available: ", "TPU available: ",
             "HPU available: ", "`Trainer.fit` stopped: ")


class _Drop(logging.Filter):
    def filter(self, record):
        message = record.getMessage()
        return not any(text in message for text in LOG_LINES)


def silence():
    for pattern in WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.addFilter(_Drop())
        for handler in logger.handlers:
            handler.addFilter(_Drop())
