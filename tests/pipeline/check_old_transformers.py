"""Load model folders with whatever transformers this interpreter has (run by test_model_cards.py under the oldest
transformers the saved files claim to support, and under the current one) and print one JSON line: per folder the
token ids and decoded text of a sample, and the sum of the logits on it."""
import json
import sys

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

SAMPLE = "Whisk the butter , then add 250 g of flour ."

out = {"version": transformers.__version__}
for folder in sys.argv[1:]:
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(SAMPLE)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([[tok.bos_token_id] + ids])).logits.double()
    out[folder] = {"ids": ids, "text": tok.decode(ids), "logits": [float(logits.sum()), float(logits.abs().sum())]}
print(json.dumps(out))
