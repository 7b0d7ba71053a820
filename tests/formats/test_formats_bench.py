"""bench/formats_bench.py renders a complete Markdown section (small shape: a smoke test)."""

from lowbit.bench import formats_bench


def test_run_renders_every_case():
    text = formats_bench.run(repeats=1, shape=(64, 128))
    lines = text.splitlines()
    assert lines[0] == "## lowbit.formats: encode + pack of a 64 x 128 float32 matrix"
    assert "| case | median s | min s | input MB/s | < 0.5 s |" in lines
    for label, *_ in formats_bench.CASES:
        row = next(line for line in lines if line.startswith(f"| {label} |"))
        assert row.endswith("| yes |")  # 32 KB of input is far under the 0.5 s goal
    assert any(line.startswith("machine: ") for line in lines)
