"""codellama: inference for Meta's Code Llama models, compatible with Meta's reference."""

from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CodeLlamaError,
    ConfigError,
    DataNotFoundError,
    DistributedError,
    NumericalError,
    OutOfMemoryError,
    OutputExistsError,
    OutputNotWritableError,
    PromptError,
    PromptTooLongError,
    StreamInterruptedError,
    UnknownWeightError,
    UnsupportedError,
)
from .generation import (
    ChatPrediction,
    CompletionPrediction,
    GenerationResult,
    InfillingPrediction,
    Llama,
)
from .model import ModelArgs, Transformer
from .prompt_formats import Dialog, Message, chat_prompt_tokens, infilling_prompt_tokens
from .sampling import SamplingParams
from .streaming import FinishReason, StreamEvent
from .tokenizer import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "ChatPrediction",
    "CheckpointError",
    "CheckpointNotFoundError",
    "CodeLlamaError",
    "CompletionPrediction",
    "ConfigError",
    "DataNotFoundError",
    "Dialog",
    "DistributedError",
    "FinishReason",
    "GenerationResult",
    "InfillingPrediction",
    "Llama",
    "Message",
    "ModelArgs",
    "NumericalError",
    "OutOfMemoryError",
    "OutputExistsError",
    "OutputNotWritableError",
    "PromptError",
    "PromptTooLongError",
    "SamplingParams",
    "StreamEvent",
    "StreamInterruptedError",
    "Tokenizer",
    "Transformer",
    "UnknownWeightError",
    "UnsupportedError",
    "chat_prompt_tokens",
    "infilling_prompt_tokens",
]
