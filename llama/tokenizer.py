"""Meta's ``llama.tokenizer`` names, taken from :mod:`codellama.tokenizer`."""

from codellama.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
