#!/usr/bin/env python3
"""Greedy continuation of a Hugging Face model directory with a PEFT LoRA adapter.

The oracle for leaf's PEFT compatibility: `transformers` loads the model directory (for
example one written by `leaf model import-gguf`), `peft.PeftModel.from_pretrained` loads the
adapter leaf wrote, and greedy decoding runs on CPU in float32. One JSON object goes to stdout:

    {"prompt_ids": [...], "tokens": [...], "text": "...", "base_tokens": [...],
     "chat_prompt_ids": [...] (with --prompt), "torch": "...", "transformers": "...",
     "peft": "..."}

`tokens` are the generated ids with the adapter (the end-of-sequence id included when it was
generated), `base_tokens` the same without it (so a caller can tell whether the adapter
changed the answer).

The prompt is given as ids (`--prompt-ids '[1, 2, 3]'`, what leaf's server reports as
`prompt_ids`, so both sides decode from the same ids), as a user message (`--prompt`, rendered
with the model's chat template by the `transformers` tokenizer), or both (decoding from the
ids; `chat_prompt_ids` then shows whether leaf's tokenizer and template give the same ids).

Run it through scripts/peft_oracle.sh, which builds the virtual environment.
"""

import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="Hugging Face model directory")
    ap.add_argument("--adapter", help="PEFT adapter directory (omit for the base model)")
    ap.add_argument("--prompt-ids", help="JSON list of prompt token ids (decoded from)")
    ap.add_argument(
        "--prompt",
        help="a user message, rendered with the chat template (decoded from when no "
        "--prompt-ids; reported as chat_prompt_ids either way)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args()
    if args.prompt_ids is None and args.prompt is None:
        ap.error("give --prompt-ids, --prompt or both")

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if args.prompt is not None:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}],
            add_generation_prompt=True,
            tokenize=True,
        )
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        prompt_ids = [int(i) for i in ids]
        out["chat_prompt_ids"] = prompt_ids
    if args.prompt_ids is not None:
        prompt_ids = [int(i) for i in json.loads(args.prompt_ids)]
    out["prompt_ids"] = prompt_ids

    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id

    def greedy(m):
        with torch.no_grad():
            x = torch.tensor([prompt_ids], dtype=torch.long)
            y = m.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos,
                pad_token_id=eos if isinstance(eos, int) else eos[0],
            )
        return [int(t) for t in y[0, len(prompt_ids):]]

    if args.adapter:
        import peft
        from peft import PeftModel

        out["peft"] = peft.__version__
        pm = PeftModel.from_pretrained(model, args.adapter)
        pm.eval()
        out["tokens"] = greedy(pm)
        with pm.disable_adapter():
            out["base_tokens"] = greedy(pm)
    else:
        out["tokens"] = greedy(model)
        out["base_tokens"] = out["tokens"]
    out["text"] = tokenizer.decode(out["tokens"], skip_special_tokens=True)
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
