"""Does a converted chat model still answer like its source? Greedy answers to the same chat prompts, side by side.

    python benchmarks/chat_check.py [--smollm2 DIR] [--to mfa_kr] [--kv-budget 0.5 0.25] [--allocation uniform]
    python benchmarks/chat_check.py --converted OUT [OUT ...]   # folders converted already (e.g. convert_real.py --out)

Converts SmolLM2-135M-Instruct with the library's defaults (calibration: the first 600,000 bytes of WikiText-2
test, as benchmarks/quality.py), then asks the source and each conversion every prompt through the tokenizer's
chat template, greedy, and prints a markdown table. The one scored check is issue 17's: the answer to "What is the
capital of France?" names Paris.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common import convert_and_load, machine, text_slice
from quality import SMOLLM2, model_spec

PROMPTS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 + 7?",
    "Write a Python function that returns the square of a number.",
    "Translate 'good morning' into Spanish.",
)


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"].to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smollm2", type=Path, default=SMOLLM2)
    parser.add_argument("--to", default="mfa_kr")
    parser.add_argument("--kv-budget", type=float, nargs="+", default=[0.5, 0.25])
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--converted", type=Path, nargs="+", help="answer with these converted folders instead")
    args = parser.parse_args()
    spec = model_spec("SmolLM2-135M", args.smollm2)
    tokenizer = AutoTokenizer.from_pretrained(spec["folder"])
    source = AutoModelForCausalLM.from_pretrained(spec["folder"], dtype=torch.float32).eval().to(args.device)
    columns = {"source": [answer(source, tokenizer, p, args.max_new_tokens) for p in PROMPTS]}
    seconds = {}
    for folder in args.converted or []:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(args.device)
        columns[folder.name] = [answer(model, tokenizer, p, args.max_new_tokens) for p in PROMPTS]
    with tempfile.TemporaryDirectory() as tmp:
        calib = text_slice(spec["calib"], Path(tmp))
        for budget in [] if args.converted else args.kv_budget:
            name = f"{args.to} {budget:.0%}"
            print(f"converting {name}", file=sys.stderr, flush=True)
            model, seconds[name] = convert_and_load(spec["folder"], Path(tmp) / "out", to=args.to, kv_budget=budget,
                                                    calib=str(calib), allocation=args.allocation, device=args.device)
            start = time.perf_counter()
            columns[name] = [answer(model, tokenizer, p, args.max_new_tokens) for p in PROMPTS]
            seconds[name] += time.perf_counter() - start
    what = (f"{', '.join(f.name for f in args.converted)} as converted" if args.converted else
            f"{args.to} with the default calibrated conversion, allocation {args.allocation}")
    print(f"### SmolLM2-135M-Instruct, greedy chat answers ({args.max_new_tokens} new tokens at most), {what}; "
          f"{machine()}\n")
    print("| prompt | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for i, prompt in enumerate(PROMPTS):
        cells = [columns[c][i].replace("\n", " ").replace("|", "\\|") for c in columns]
        print(f"| {prompt} | " + " | ".join(cells) + " |")
    print()
    for name in columns:
        verdict = "names Paris" if "paris" in columns[name][0].lower() else "does NOT name Paris"
        cost = f" (convert + answers {seconds[name]:.0f} s)" if name in seconds else ""
        print(f"- {name}: the capital-of-France answer {verdict}{cost}")


if __name__ == "__main__":
    main()
