"""``llama``: the import name of Meta's reference package, as an alias of :mod:`codellama`.

Scripts written for Meta's repository (``from llama import Llama``) run unchanged on this
package, and so do those written for Llama 2's (``from llama import Llama, Dialog``). Every
public name of :mod:`codellama` is here too; new code should import :mod:`codellama`.
"""

from codellama import *  # noqa: F403 (the alias re-exports the whole public API)
from codellama import __all__ as _codellama_all

from . import generation, model, tokenizer  # bound on `import llama`, as Meta's are

__all__ = [*_codellama_all, "generation", "model", "tokenizer"]
