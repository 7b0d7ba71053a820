"""``sites.int8_weights``: the matched sites get int8 weights with one scale per output channel
(round to nearest, no OPTQ) while every other site keeps the recipe's grid."""

from __future__ import annotations

import numpy as np
import pytest

import lowbit
from lowbit import formats
from lowbit.errors import LowbitError
from lowbit.models.synthetic import tiny_decoder


def test_matched_sites_are_int8_per_channel_and_the_rest_keep_the_recipe_grid(token_windows):
    out = lowbit.compile(tiny_decoder(), "w4a8-dint4", calibration=token_windows,
                         overrides=['sites.int8_weights=["*down_proj*"]'])  # fmt: skip
    sites = out.report["sites"]
    down = [n for n in sites if "down_proj" in n]
    assert down and all(sites[n]["weights"] == "int8" and sites[n]["block_size"] == 0 for n in down)
    others = [n for n, e in sites.items() if "down_proj" not in n and e.get("quantized")]
    assert others and all(sites[n]["weights"] == "dint4" for n in others)
    assert all(abs(sites[n]["bits_per_weight"] - (8 + 32 / sites[n]["in_features"])) < 1e-9 for n in down)
    assert not set(out.report["optq"]["sites"]) & set(down)  # OPTQ rounded the other sites only


def test_int8_codes_are_round_to_nearest_per_output_channel(token_windows):
    """With nothing rescaling the weights first, the stored codes and scales are exactly
    ``formats.encode(w, "int8")`` per output channel."""
    source = tiny_decoder()
    weights = {n: v.const_value.numpy().copy() for n, v in source.graph.initializers.items() if "down_proj" in n}
    out = lowbit.compile(source, "w4a8-dint4", calibration=token_windows,
                         overrides=['sites.int8_weights=["*down_proj*"]', "smooth.method=none",
                                    "reorder.clusters=0", "activations.format=none", "rotate.residual=false",
                                    "rotate.heads=false", "rotate.online=[]"])  # fmt: skip
    init = out.model.graph.initializers
    assert weights
    for name, w in weights.items():
        enc = formats.encode(w, "int8", axis=0, symmetric=True, scale_method="absmax")  # [K, N]: K reduced
        site = name.removesuffix(".weight")
        codes, scale = init[f"{site}.q"].const_value.numpy(), init[f"{site}.scale"].const_value.numpy()
        assert codes.dtype == np.int8 and scale.shape == (w.shape[1],)  # one scale per output channel
        np.testing.assert_array_equal(codes.astype(np.float32) * scale, formats.decode(enc))


def test_int8_weights_needs_a_weight_grid_and_no_fgmp():
    from lowbit.core.recipe import load_recipe

    with pytest.raises(LowbitError, match="sites.int8_weights"):
        load_recipe("w4a8-dint4", ['sites.int8_weights=["lm_head"]', "weights.format=none", "rounding.method=rtn"])
    with pytest.raises(LowbitError, match="sites.int8_weights"):
        load_recipe("fgmp-nvfp4-fp8", ['sites.int8_weights=["lm_head"]'])
