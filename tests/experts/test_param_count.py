"""`experts.model.param_count` (the parameter count of a model from its shape, used by the pipeline's disk
estimate) against the parameters of the model built from that shape."""
from __future__ import annotations

import pytest

from experts.model import PRESETS, build_scratch_model, count_params, param_count


@pytest.mark.parametrize("size", ["tiny", "mini", "small"])
def test_param_count_of_a_preset_is_the_built_models(size):
    model = build_scratch_model(size, vocab_size=300)
    assert param_count(PRESETS[size], 300) == count_params(model)
    assert param_count(model.config) == count_params(model)  # a transformers config gives the same figure
