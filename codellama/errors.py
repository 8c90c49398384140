"""Exceptions raised by codellama.

Every error a caller can provoke derives from :class:`CodeLlamaError` *and* from the
built-in type that describes it (``ValueError``, ``FileNotFoundError``, ...), so code that
already catches the built-in types keeps working.
"""

from __future__ import annotations


class CodeLlamaError(Exception):
    """Base class of every error raised by codellama on bad input or bad state."""


class ConfigError(CodeLlamaError, ValueError):
    """A model configuration (params.json, build argument) is invalid or inconsistent."""


class CheckpointError(CodeLlamaError, ValueError):
    """A checkpoint's files are incomplete (a shard or key missing), truncated, unsafe, or do
    not match the model; a file or folder that does not exist is a
    :class:`CheckpointNotFoundError`."""


class UnknownWeightError(CheckpointError, KeyError):
    """A parameter name is not one of Code Llama's (Meta's or Hugging Face's naming)."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


class OutputExistsError(CodeLlamaError, FileExistsError):
    """An output folder already holds files; nothing is overwritten unless asked."""


class OutputNotWritableError(CodeLlamaError, PermissionError):
    """An output folder or file cannot be created or replaced where asked."""


class CheckpointNotFoundError(CodeLlamaError, FileNotFoundError):
    """A checkpoint directory, shard, params.json or tokenizer file does not exist."""


class DataNotFoundError(CodeLlamaError, FileNotFoundError):
    """An input data file (e.g. HumanEval problems) does not exist."""


class PromptError(CodeLlamaError, ValueError):
    """A prompt, dialog or generation argument is invalid."""


class PromptTooLongError(PromptError):
    """A prompt does not fit in the model's ``max_seq_len``."""


class OutOfMemoryError(ConfigError, MemoryError):
    """The weights and KV cache asked for do not fit in the device's free memory."""


class UnsupportedError(CodeLlamaError, ValueError):
    """The requested feature is not supported by this model or tokenizer."""


class NumericalError(CodeLlamaError, RuntimeError):
    """The model produced non-finite logits (NaN or infinity)."""


class DistributedError(CodeLlamaError, RuntimeError):
    """Model-parallel processes were given different inputs (prompts, sampling arguments).
    A peer process that dies makes the others' collectives fail with torch's own error."""


class StreamInterruptedError(CodeLlamaError, RuntimeError):
    """A paused generation cannot go on: another call used the model's KV cache meanwhile,
    or two threads generate with one model at once."""


def is_bool(value: object) -> bool:
    """Whether ``value`` is True or False, numpy's bools included (a string such as the
    ``'false'`` a command line passes through is not, though it is truthy)."""
    kind = type(value)
    return kind is bool or (kind.__module__ == "numpy" and kind.__name__ in ("bool_", "bool"))


def is_flag(value: object) -> bool:
    """Whether ``value`` is a yes/no option of generation or formatting: a bool (see
    :func:`is_bool`) or the int 0 or 1, as Meta's code takes ``bos=1``. Options that
    destroy data (``overwrite``) take bools only."""
    return is_bool(value) or (type(value) is int and value in (0, 1))
