"""The tuning sweep's bookkeeping (no compile): candidates, the shipped mark, rows kept from an
earlier run of bench/TUNING.md."""

from __future__ import annotations

from lowbit.bench import tuning
from lowbit.bench.recipe_sweep import SWEEPS, candidate_overrides
from lowbit.core.recipe import load_recipe


def test_candidates_set_one_key_or_a_group_of_keys_of_a_section():
    assert candidate_overrides("reorder.clusters", "8") == ["reorder.clusters=8"]
    assert candidate_overrides("sites.exclude", '["lm_head"]') == ['sites.exclude=["lm_head"]']
    assert candidate_overrides("activations", "granularity=per_token_group,symmetric=true,group_size=32") == [
        "activations.granularity=per_token_group", "activations.symmetric=true", "activations.group_size=32"]


def test_every_candidate_is_a_valid_recipe_and_the_shipped_one_is_marked():
    for recipe, sweeps in SWEEPS.items():
        shipped = load_recipe(recipe, [])
        for key, values in sweeps:
            marks = [tuning._is_shipped(shipped, key, v) for v in values]
            for v in values:
                load_recipe(recipe, candidate_overrides(key, v))  # raises on a bad key or value
            assert sum(marks) <= 1, (recipe, key)
    w8 = load_recipe("w8a8-rptq", [])
    assert tuning._is_shipped(w8, "reorder.clusters", str(w8.reorder.clusters))


def test_rows_of_keys_not_rerun_are_kept_and_old_rows_widened(tmp_path):
    old = tmp_path / "TUNING.md"
    old.write_text("# x\n\n## w8a8-rptq\n\n| key | value | tuning ppl | x FP32 | compile s | shipped |\n"
                   "|---|---|---:|---:|---:|---|\n| reorder.clusters | 8 | 15.943 | 1.0080 | 84.7 |  |\n"
                   "| reorder.clusters | best on tuning: **16** | | | | |\n\n## npu-w8a8\n\n"
                   "| reorder.clusters | 8 | 1 | 1 | 1 |  |\n")
    rows = tuning._kept_rows(old.read_text(), "w8a8-rptq", "reorder.clusters")
    assert len(rows) == 2
    assert rows[0] == "| reorder.clusters | 8 | 15.943 | 1.0080 | - | - | - | - | - | - | - | 84.7 |  |"
    assert rows[1] == "| reorder.clusters | best on pydoc tuning: **16** |" + "  |" * 11
    assert tuning._kept_rows("", "w8a8-rptq", "reorder.clusters") == []


def test_sections_of_recipes_not_swept_are_kept():
    previous = "# t\n\nintro\n\n## a\n\n| a-row |\n\n## b\n\n| b-row |\n"
    assert tuning._other_sections(previous, ["a"]) == ["## b\n\n| b-row |", ""]
    assert tuning._other_sections("", ["a"]) == []


def test_an_unknown_swept_key_is_one_line_and_exit_2_before_any_compile(tmp_path, capsys):
    from lowbit.bench.cli import main

    out = tmp_path / "T.md"
    assert main(["tuning", "--recipes", "w8a8-rptq", "--keys", "rounding.damp", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--keys rounding.damp: not swept for w8a8-rptq" in err and "\n" not in err
    assert not out.exists()


def test_group_candidates_keep_lists_with_commas_whole():
    assert candidate_overrides("rotate", 'residual=true,heads=true,online=["gated_linear", "attention_qk"]') == [
        "rotate.residual=true", "rotate.heads=true", 'rotate.online=["gated_linear", "attention_qk"]']
