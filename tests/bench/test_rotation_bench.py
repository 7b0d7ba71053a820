"""The rotation bench's table (no compile): every combination is a valid recipe, and the rows
render with both texts, compile time and the speed ratio."""

from lowbit.bench import rotation_bench
from lowbit.core.recipe import load_recipe


def test_every_combination_loads():
    for _, recipe, overrides in rotation_bench.COMBOS:
        load_recipe(recipe, overrides)


def test_render_writes_both_texts_and_the_decode_ratio():
    text = {"ratio": 1.05, "kl": 0.07, "top1": 0.85}
    acc = [{"what": "W4A8 + R1", "recipe": "w4a8-dint4", "overrides": ["rotate.residual=true"],
            "texts": {"pydoc": text, "news": {**text, "ratio": 1.17}}, "seconds": 61.0}]
    speed = [{"threads": 1, "unrotated": {"prefill_ms": 600.0, "decode_ms": 20.0},
              "weights_only": {"prefill_ms": 590.0, "decode_ms": 17.5}, "rotated": {"prefill_ms": 610.0, "decode_ms": 21.0}}]
    md = rotation_bench.render(acc, speed, 8, "lowbit-bench rotation")
    assert "| W4A8 + R1 | `w4a8-dint4` `rotate.residual=true` | 1.0500 | 0.0700 | 85.0 | 1.1700 | 0.0700 | 85.0 | 61 |" in md
    assert "| 1 | 600.0 / 590.0 / 610.0 | 20.00 / 17.50 / 21.00 | 1.050 x | 1.200 x |" in md
