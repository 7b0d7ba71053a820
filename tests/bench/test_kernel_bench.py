"""bench/kernel_bench.py: the ORT profile is split per run and op copy (GroupQuant + MatMulLowbit
summed), and the bandwidth bound counts codes and float32 block scales."""

import json

from lowbit.bench import kernel_bench as kb


def _event(node: str, op: str, dur: float) -> dict:
    return {"cat": "Node", "name": f"{node}_kernel_time", "dur": dur, "args": {"op_name": op}}


def test_profile_is_split_per_run_and_copy(tmp_path):
    events = [{"cat": "Session", "name": "model_run", "dur": 99}]
    for run in range(3):
        for i in range(2):
            events += [_event(f"gq{i}", "GroupQuant", 1 + run), _event(f"op{i}", "MatMulLowbit", 10 * (i + 1))]
            events.append({"cat": "Node", "name": f"op{i}_fence_before", "dur": 5})
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(events))
    assert kb._op_times(str(path)) == [[11, 21], [12, 22], [13, 23]]


def test_weight_bytes_and_copies():
    assert kb.weight_bytes(576, 1536, "int8_group") == 576 * 1536 // 2 + 1536 * 18 * 4
    assert kb.weight_bytes(576, 1536, "fp32") == 576 * 1536 * 4
    assert kb._copies(576, 1536, "int8_group", 64.0) * kb.weight_bytes(576, 1536, "int8_group") >= 64 * 2**20


def test_bad_counts_are_one_line_errors_before_any_measurement(capsys):
    from lowbit.bench.cli import main

    assert main(["kernels", "--repeat", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lowbit-bench kernels: error: --threads, --rows, --runs and --repeat must be >= 1, --gbps and --stream-mb > 0"]
