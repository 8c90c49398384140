"""Code completion with a Code Llama base or Python model (Meta's example, same flags).

    torchrun --nproc_per_node 1 example_completion.py \
        --ckpt_dir CodeLlama-7b/ --tokenizer_path CodeLlama-7b/tokenizer.model
"""

from typing import Optional

from codellama import Llama
from codellama.cli import check_generation_options, run


def main(
    ckpt_dir: str,
    tokenizer_path: str,
    temperature: float = 0.2,
    top_p: float = 0.9,
    max_seq_len: int = 256,
    max_batch_size: int = 4,
    max_gen_len: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
    compile: bool = False,  # True on GPUs: torch.compile and CUDA graphs, ~4x faster decoding
):
    check_generation_options(temperature, top_p, max_gen_len)  # before the slow build
    generator = Llama.build(
        ckpt_dir=ckpt_dir,
        tokenizer_path=tokenizer_path,
        max_seq_len=max_seq_len,
        max_batch_size=max_batch_size,
        device=device,
        dtype=dtype,
        compile=compile,
    )

    prompts = [
        # For these prompts, the expected answer is the natural continuation of the prompt
        """\
def fizzbuzz(n: int):""",
        """\
import argparse

def main(string: str):
    print(string)
    print(string[::-1])

if __name__ == "__main__":""",
    ]
    results = generator.text_completion(
        prompts,
        max_gen_len=max_gen_len,
        temperature=temperature,
        top_p=top_p,
    )
    for prompt, result in zip(prompts, results, strict=True):
        print(prompt)
        print(f"> {result['generation']}")
        print("\n==================================\n")


if __name__ == "__main__":
    run(main)  # fire.Fire(main), refusing unknown options before the build
