"""A tiny random-weight Code Llama, written in Meta's exact layout, to try the library.

``python -m codellama.demo`` writes it on first use (in codellama's cache folder, see
:func:`paths.cache_dir`) and runs completion, infilling and chat end to end. Its text is
meaningless: the weights are random. The same writers build the test suite's checkpoints.
"""

from __future__ import annotations

import inspect
import io
import os
import tempfile
from pathlib import Path

import torch

from .checkpoint import refuse_non_empty, shard_state_dict, write_checkpoint
from .errors import ConfigError, OutputExistsError
from .model import ModelArgs
from .paths import cache_dir

INFILL_PIECES = ["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"]
STEP_PIECE = "<step>"

# Small but with every structural feature: GQA, ffn_dim_multiplier, rope_theta 1e6.
DEMO_ARGS = ModelArgs(
    dim=128,
    n_layers=2,
    n_heads=8,
    n_kv_heads=4,
    multiple_of=32,
    ffn_dim_multiplier=1.3,
    norm_eps=1e-5,
    rope_theta=1e6,
)

BANNER = """\
============================================================================
 codellama demo: a tiny model with RANDOM weights. The generated text below is
 meaningless; it only shows the library working end to end.
 For real output, download Code Llama (bash download.sh, with the URL from
 https://ai.meta.com/resources/models-and-libraries/llama-downloads/) and run,
 in a clone of this repository (where the examples and download.sh are),
   torchrun --nproc_per_node 1 example_completion.py \\
       --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
============================================================================"""


def _corpus() -> str:
    """Training text for a tiny tokenizer: Python source shipped with the interpreter."""
    import argparse
    import dataclasses
    import json
    import textwrap

    parts = [inspect.getsource(m) for m in (argparse, dataclasses, json.decoder, textwrap)]
    parts.append(
        "Write a function that computes the set of sums. Provide answers in Bash. ☺ é ü ß ✓ 中文"
    )
    return "\n".join(parts)


def train_tokenizer(
    path: str | os.PathLike[str],
    *,
    infilling: bool = True,
    step: bool = False,
    vocab_size: int = 512,
) -> Path:
    """Train a small SentencePiece model shaped like Meta's (bos 1, eos 2, pad -1).

    ``infilling`` adds Code Llama's ``▁<PRE>``/``▁<MID>``/``▁<SUF>``/``▁<EOT>`` pieces;
    ``step`` adds the 70B Instruct ``<step>`` piece. Byte fallback makes any text encodable.
    """
    import sentencepiece as spm

    symbols = ["☺"] + (INFILL_PIECES if infilling else []) + ([STEP_PIECE] if step else [])
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus().splitlines()),
        model_writer=out,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        user_defined_symbols=symbols,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(out.getvalue())
    return p


def random_state_dict(
    args: ModelArgs,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """A consolidated (MP=1) state dict with Meta's parameter names and random values, drawn
    on ``device`` (a GPU draws a 7B model's in seconds; values differ from the CPU's) and
    returned on the CPU."""
    g = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=g, dtype=torch.float32, device=device)
        return (x * std).to(dtype).cpu()

    def norm() -> torch.Tensor:
        x = 1.0 + 0.1 * torch.randn(args.dim, generator=g, dtype=torch.float32, device=device)
        return x.to(dtype).cpu()

    kv = args.kv_heads * args.head_dim
    hidden = args.ffn_hidden_dim
    sd = {"tok_embeddings.weight": rand(args.vocab_size, args.dim)}
    for i in range(args.n_layers):
        p = f"layers.{i}."
        sd[p + "attention.wq.weight"] = rand(args.dim, args.dim)
        sd[p + "attention.wk.weight"] = rand(kv, args.dim)
        sd[p + "attention.wv.weight"] = rand(kv, args.dim)
        sd[p + "attention.wo.weight"] = rand(args.dim, args.dim)
        sd[p + "feed_forward.w1.weight"] = rand(hidden, args.dim)
        sd[p + "feed_forward.w2.weight"] = rand(args.dim, hidden)
        sd[p + "feed_forward.w3.weight"] = rand(hidden, args.dim)
        sd[p + "attention_norm.weight"] = norm()
        sd[p + "ffn_norm.weight"] = norm()
    sd["norm.weight"] = norm()
    sd["output.weight"] = rand(args.vocab_size, args.dim)
    return sd


def write_random_checkpoint(
    ckpt_dir: str | os.PathLike[str],
    args: ModelArgs,
    *,
    n_shards: int = 1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 0.02,
    tokenizer_path: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
) -> Path:
    """Write a random-weight checkpoint in Meta's ``n_shards``-file layout (values drawn on
    ``device``, see :func:`random_state_dict`)."""
    if args.vocab_size < 1:
        raise ConfigError(
            f"args.vocab_size must be set to the tokenizer's size (Tokenizer(path).n_words), "
            f"got {args.vocab_size!r}"
        )
    if isinstance(n_shards, bool) or not isinstance(n_shards, int) or n_shards < 1:
        raise ConfigError(f"n_shards must be a positive integer, got {n_shards!r:.40}")
    sd = random_state_dict(args, seed=seed, dtype=dtype, std=std, device=device)
    return write_checkpoint(
        ckpt_dir,
        shard_state_dict(sd, n_shards),
        args.to_params(),
        tokenizer_path,
        overwrite,
    )


def demo_dir() -> Path:
    """The demo checkpoint's folder in codellama's cache (see :func:`paths.cache_dir`)."""
    return cache_dir() / "demo"


def ensure_demo_checkpoint(directory: str | os.PathLike[str] | None = None) -> Path:
    """The demo checkpoint folder (with tokenizer.model), written on first use. A folder
    the caller names is written only if it is absent or empty (never replaced: it may be
    theirs); the package's own cache folder is rewritten if incomplete."""
    d = Path(directory) if directory is not None else demo_dir()
    if (d / "consolidated.00.pth").is_file() and (d / "tokenizer.model").is_file():
        return d
    ours = directory is None
    if not ours:
        if d.is_dir() and any(d.iterdir()):  # (refuse_non_empty's hint names an --overwrite)
            raise OutputExistsError(
                f"--ckpt_dir {str(d)!r} is not empty and holds no demo checkpoint; the demo "
                "writes only into a new or empty folder (it never replaces files): name one, "
                "or leave --ckpt_dir out to use the package's cache"
            )
        refuse_non_empty(d, overwrite=False)  # a file, not a folder
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer(Path(tmp) / "tokenizer.model")
        from .tokenizer import Tokenizer

        args = ModelArgs(**{**DEMO_ARGS.__dict__, "vocab_size": Tokenizer(tok).n_words})
        write_random_checkpoint(d, args, seed=0, std=0.5, tokenizer_path=tok, overwrite=ours)
    return d


def main(
    ckpt_dir: str | None = None,
    max_seq_len: int = 256,
    max_gen_len: int = 32,
    device: str | None = None,
) -> None:
    """Run completion, infilling and chat on the demo checkpoint."""
    from .generation import Llama
    from .sampling import check_max_gen_len

    check_max_gen_len(max_gen_len)  # before the checkpoint is written and loaded
    print(BANNER)
    d = ensure_demo_checkpoint(ckpt_dir)
    print(f"checkpoint: {d} (try the example scripts on it: see the README)")
    llama = Llama.build(str(d), str(d / "tokenizer.model"), max_seq_len, 4, device=device)
    prompts = ["def fizzbuzz(n: int):", "import argparse\n\ndef main(string: str):"]
    for p, r in zip(prompts, llama.text_completion(prompts, max_gen_len=max_gen_len), strict=True):
        print(f"\n[completion] {p}\n> {r['generation']!r}")
    r = llama.text_infilling(
        ["def add(a, b):\n    "], ["\n    return c\n"], max_gen_len=max_gen_len
    )[0]
    print(f"\n[infilling] full text:\n{r['full_text']}")
    dialog = [{"role": "system", "content": "Provide answers in Python"},
              {"role": "user", "content": "Reverse a string."}]  # fmt: skip
    answer = llama.chat_completion([dialog], max_gen_len=max_gen_len)[0]  # type: ignore[list-item]
    print(f"\n[chat] User: Reverse a string.\n> Assistant: {answer['generation']['content']!r}")
    print("\nDemo finished: completion, infilling and chat ran on the random-weight checkpoint.")


if __name__ == "__main__":
    from .cli import run

    run(main)
