"""Sample text from an exported model with plain transformers (no lowrank import anywhere).

    lowrank export runs/quickstart --out runs/quickstart-hf
    python examples/generate.py runs/quickstart-hf --prompt "def merge(self, other):"

Any folder written by ``lowrank export``, ``examples/pretrain_llama.py`` or
``examples/hf_trainer.py`` (their ``model/`` subfolder) works: each holds safetensors weights,
``config.json`` and the tokenizer.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description="Sample text from a Hugging Face model folder.")
    parser.add_argument("model", help="folder with config.json, model.safetensors and the tokenizer")
    parser.add_argument("--prompt", default="Return the")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model).eval()
    torch.manual_seed(args.seed)
    inputs = tokenizer([args.prompt] * args.samples, return_tensors="pt", return_token_type_ids=False)
    with torch.no_grad():
        output = model.generate(**inputs, do_sample=True, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_k=args.top_k, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    for index, sequence in enumerate(output):
        print(f"--- sample {index + 1}\n{tokenizer.decode(sequence, skip_special_tokens=True)}")


if __name__ == "__main__":
    main()
