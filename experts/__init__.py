"""Seed models, expert training, ensembles, averaging and the BTX MoE (Luigi-free library).

Importing `experts` registers the `cbtm_ensemble` model type with transformers' AutoConfig and
AutoModelForCausalLM, so `AutoModelForCausalLM.from_pretrained(<ensemble folder>)` works (experts.hf_ensemble).
"""
from experts.hf_ensemble import register as _register

_register()
