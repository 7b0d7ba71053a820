"""lowbit-bench optq-layer: times every input group of a layer of the named shape."""

from __future__ import annotations

from lowbit.bench.cli import main


def test_tiny_layer_prints_every_input_group(capsys):
    assert main(["optq-layer", "--shape", "tiny"]) == 0
    out = capsys.readouterr().out
    for row in ("| q/k/v | 64 | 128 |", "| o_proj | 64 | 64 |", "| gate/up | 64 | 192 |", "| down_proj | 96 | 64 |", "| layer |"):
        assert row in out
