"""Errors meant for people: each message says what was wrong and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class LmforgeError(Exception):
    """Base of the errors the CLI reports as plain messages."""


class ConfigError(LmforgeError, ValueError):
    """A config key or value a person got wrong."""


class CheckpointMismatch(LmforgeError, ValueError):
    """Weights, config and tokenizer that do not belong together."""


class TrainingDiverged(LmforgeError, RuntimeError):
    """The loss stopped being a finite number."""


class UnsupportedModel(LmforgeError, ValueError):
    """A model file or architecture lmforge cannot map onto its own model."""


class GGUFFileError(LmforgeError, ValueError):
    """A file that is not a complete, readable GGUF file."""


class DataError(LmforgeError, ValueError):
    """Input data (a corpus, a dataset file) that cannot be used as it is."""


class CorruptFile(LmforgeError, ValueError):
    """A file that is damaged or not in the format its name promises."""


class DiskFull(LmforgeError, OSError):
    """The disk filled up while lmforge was writing."""


class ShardedCheckpoint(LmforgeError, ValueError):
    """A sharded (FSDP) checkpoint given where a model directory is read."""


class RankLost(LmforgeError, RuntimeError):
    """Another process of a distributed run stopped: the run cannot go on without it."""
