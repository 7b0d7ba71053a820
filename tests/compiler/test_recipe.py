"""Recipes: every named recipe loads; unknown keys and bad values fail naming the key."""

import re

import pytest

from lowbit.core.recipe import available_recipes, describe_keys, load_recipe, parse_override
from lowbit.errors import LowbitError

REQUIRED = {"w8a8", "w4a8-int4", "w4a8-dint4", "fp8", "nvfp4"}


def test_required_recipes_exist_and_load():
    names = set(available_recipes())
    assert REQUIRED <= names
    for name in names:
        recipe = load_recipe(name)
        assert recipe.name == name and recipe.description


def test_w4a8_dint4_values():
    r = load_recipe("w4a8-dint4")
    assert (r.weights.format, r.weights.block_size, r.activations.format) == ("dint4", 32, "int8")


def test_overrides_apply_with_toml_types():
    r = load_recipe("w8a8", ["weights.block_size=64", "weights.format=int4", "calibration.slac_lengths=[32, 64]", "target=qdq-fp4"])
    assert r.weights.block_size == 64 and r.weights.format == "int4"
    assert r.calibration.slac_lengths == (32, 64) and r.target == "qdq-fp4"
    assert parse_override("activations.percentile=99.9") == (["activations", "percentile"], 99.9)


@pytest.mark.parametrize("override,message", [
    ("weights.formt=int4", "unknown recipe key 'weights.formt'"),
    ("bogus=1", "unknown recipe key 'bogus'"),
    ("weights.format=int12", "recipe key 'weights.format': 'int12' is not one of"),
    ("weights.block_size=-1", "recipe key 'weights.block_size': must be >= 0"),
    ("weights.block_size=abc", "recipe key 'weights.block_size' must be int"),
    ("activations.granularity=per_row", "recipe key 'activations.granularity'"),
    ("activations.group_size=32", "recipe key 'activations.group_size': needs granularity = per_token_group"),
    ("activations.outlier_format=int8", "recipe key 'activations.outlier_format': needs granularity = per_token_group"),
    ("activations.granularity=per_token_group", "recipe key 'activations.granularity': per_token_group takes symmetric"),
    ("target=tpu", "recipe key 'target': 'tpu' is not one of"),
])  # fmt: skip
def test_bad_keys_and_values_are_errors(override, message):
    with pytest.raises(LowbitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_recipe("w8a8", [override])


def test_unknown_recipe_name_lists_known():
    with pytest.raises(LowbitError, match=r"unknown recipe 'w9a9' \(known: .*w8a8"):
        load_recipe("w9a9")


def test_every_key_is_documented():
    keys = describe_keys()
    assert len(keys) >= 15
    assert all(doc for _, doc, _ in keys)


def test_per_token_group_activation_keys():
    r = load_recipe("w4a4-rptq", ["activations.granularity=per_token_group", "activations.group_size=64",
                                  "activations.outlier_format=int8"])  # fmt: skip
    assert (r.activations.granularity, r.activations.group_size, r.activations.outlier_format) == ("per_token_group", 64, "int8")
    with pytest.raises(LowbitError, match="activations.group_size': must be >= 0"):
        load_recipe("w4a4-rptq", ["activations.granularity=per_token_group", "activations.group_size=-1"])
    with pytest.raises(LowbitError, match="activations.outlier_format': 'fp8' is not none or int8"):
        load_recipe("w4a4-rptq", ["activations.granularity=per_token_group", "activations.outlier_format=fp8"])


def test_w4a4_rptq_is_dynamic_and_static_variant_stays_reachable():
    a = load_recipe("w4a4-rptq").activations
    assert (a.format, a.granularity, a.group_size, a.outlier_format) == ("int4", "per_token_group", 16, "int8")
    static = load_recipe("w4a4-rptq", ["activations.granularity=per_tensor", "activations.group_size=0",
                                       "activations.outlier_format=none"]).activations  # fmt: skip
    assert (static.granularity, static.group_size, static.outlier_format) == ("per_tensor", 0, "none")


@pytest.mark.parametrize("recipe, overrides, message", [
    ("w8", ["precision.enabled=true"], "recipe key 'weights.format': precision.enabled mixes NVFP4 and FP8"),
    ("nvfp4", ["precision.enabled=true", "precision.activations=static"], "recipe key 'activations.format': precision.activations = 'static'"),
    ("w8", ["precision.activations=runtime"], "recipe key 'precision.activations': needs precision.enabled"),
    ("w8", ["weights.format=nvfp4", "weights.block_size=32"], "recipe key 'weights.block_size': nvfp4 blocks are 16"),
    ("w8", ["weights.format=mxfp4", "weights.block_size=16"], "recipe key 'weights.block_size': mxfp4 blocks are 32"),
    ("w8", ["rounding.method=optq", "weights.format=nvfp4"], "recipe key 'rounding.method': optq rounds symmetric int or dint"),
    ("w8", ["reorder.clusters=8"], "recipe key 'reorder.clusters': RPTQ clusters set per-cluster activation ranges"),
    ("w8", ["ort_cpu.embeddings=true"], "recipe key 'ort_cpu.embeddings': needs target = 'ort-cpu'"),
    ("w8", ["target=ort-cpu"], "recipe key 'weights.format': target ort-cpu packs dint4, nvfp4, int4, mxfp4 weights, not 'int8'"),
    ("w8", ["target=ort-cpu", "weights.format=int4"], "recipe key 'weights.block_size': target ort-cpu packs int4 in blocks"),
    ("w8", ["target=ort-cpu", "weights.format=int4", "weights.block_size=48"], "recipe key 'weights.block_size': target ort-cpu: int4: block_size must be 16 or a positive multiple of 32"),
    ("w8", ["target=ort-cpu", "weights.format=int4", "weights.block_size=32", "weights.symmetric=false"], "recipe key 'weights.symmetric': target ort-cpu kernels take symmetric"),
])  # fmt: skip
def test_cross_section_and_kernel_rules_fail_before_any_model_is_loaded(recipe, overrides, message):
    with pytest.raises(LowbitError, match=re.escape(message)):
        load_recipe(recipe, overrides)


def test_every_shipped_recipe_passes_the_cross_section_rules():
    for name in available_recipes():
        load_recipe(name)
    load_recipe("w8", ["target=ort-cpu", "weights.format=nvfp4"])  # the format's own block of 16
