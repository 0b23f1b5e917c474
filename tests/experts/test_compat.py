"""experts.compat: saved folders get the fields transformers 4.x needs, and transformers 5 reads them unchanged.
(Loading them with transformers 4.45 itself: tests/pipeline/test_model_cards.py, with `make venv-min`.)"""
import json

import torch

from experts.compat import PORTABLE_TOKENIZER_CLASS, make_portable
from tests.experts.merge_helpers import tiny_llama, tiny_tokenizer


def _save(path, rope=None):
    model = tiny_llama(3)
    model.config.use_cache = False  # as training leaves it
    if rope is not None:
        model.config.rope_parameters = rope
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    tok.model_max_length = 1024
    tok.save_pretrained(path)
    return model


def test_make_portable_fixes_fields_and_changes_nothing_for_transformers_5(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = _save(tmp_path)
    before_cfg = AutoConfig.from_pretrained(tmp_path).to_dict()
    x = torch.tensor([[0, 5, 9, 13, 40]])
    before = model(x).logits
    changed = make_portable(tmp_path)
    assert {"config.json", "tokenizer_config.json"} <= set(changed)
    cfg = json.loads((tmp_path / "config.json").read_text())
    tok_cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["use_cache"] is True and cfg["rope_theta"] == cfg["rope_parameters"]["rope_theta"]
    assert cfg["torch_dtype"] == cfg["dtype"] and "rope_scaling" not in cfg
    gen = tmp_path / "generation_config.json"
    assert not gen.is_file() or json.loads(gen.read_text()).get("use_cache", True) is True
    assert tok_cfg["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS and tok_cfg["clean_up_tokenization_spaces"] is False
    assert tok_cfg["model_max_length"] == cfg["max_position_embeddings"] == 64
    after_cfg = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert after_cfg["rope_parameters"] == before_cfg["rope_parameters"] and after_cfg["use_cache"] is True
    torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits, before)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("w1 w2 w3")["input_ids"] == tiny_tokenizer()("w1 w2 w3")["input_ids"]
    assert make_portable(tmp_path) == []  # idempotent


def test_scaled_rope_keeps_its_parameters(tmp_path):
    from transformers import AutoConfig

    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
    _save(tmp_path, rope=rope)
    make_portable(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == 50000.0 and cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == rope


def test_trained_tokenizer_is_portable(tmp_path):
    from experts.tokenizer import train_tokenizer

    train_tokenizer([f"document {i} about cooking and sports" for i in range(50)], tmp_path / "tok", vocab_size=300)
    tok_cfg = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == PORTABLE_TOKENIZER_CLASS
