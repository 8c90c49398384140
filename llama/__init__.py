"""``llama``: the import name of Meta's reference package, as an alias of :mod:`codellama`.

Scripts written for Meta's repository (``from llama import Llama``) run unchanged on this
package. New code should import :mod:`codellama`, which has the full API.
"""

from codellama.generation import Llama
from codellama.model import ModelArgs, Transformer
from codellama.tokenizer import Tokenizer

from . import generation, model, tokenizer  # bound on `import llama`, as Meta's are

__all__ = ["Llama", "ModelArgs", "Tokenizer", "Transformer", "generation", "model", "tokenizer"]
