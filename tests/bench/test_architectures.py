"""lowbit-bench architectures: one-line errors before any work, and a real row of the table."""

import pytest

from lowbit.bench.cli import main


@pytest.mark.parametrize("args, message", [
    (["--families", "nope"], "--families: unknown nope"), (["--recipes", "w9a9"], "w9a9"),
    (["--recipes", ","], "--recipes needs at least one recipe"),
])  # fmt: skip
def test_bad_input_is_one_line_errors_before_any_work(args, message, tmp_path, capsys):
    assert main(["architectures", *args, "--work", str(tmp_path / "work"), "-o", str(tmp_path / "A.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "work").exists() and not (tmp_path / "A.md").exists()


def test_a_directory_as_the_report_is_refused(tmp_path, capsys):
    assert main(["architectures", "--families", "llama", "-o", str(tmp_path)]) == 2
    assert "is not a regular file" in capsys.readouterr().err


def test_a_directory_of_the_users_in_work_is_left_alone(tmp_path, capsys):
    mine = tmp_path / "work" / "llama"
    mine.mkdir(parents=True)
    (mine / "model.safetensors").write_bytes(b"the user's weights")
    assert main(["architectures", "--families", "llama", "--work", str(tmp_path / "work"), "-o", str(tmp_path / "A.md")]) == 2
    assert "is not a tiny model this bench wrote" in capsys.readouterr().err
    assert (mine / "model.safetensors").read_bytes() == b"the user's weights" and not (tmp_path / "A.md").exists()


@pytest.mark.slow
def test_a_llama_row_counts_its_sites_norms_and_verifies(tmp_path, capsys):
    out = tmp_path / "A.md"
    assert main(["architectures", "--families", "llama", "--recipes", "w8a8-rptq", "--work", str(tmp_path / "w"),
                 "-o", str(out)]) == 0  # fmt: skip
    rows = [line.split(" | ") for line in out.read_text().splitlines() if line.startswith("| llama")]
    assert [r[1] for r in rows] == ["torch dynamo", "optimum, KV cache"]
    for r in rows:  # compiles, 15 of 15 sites = the torch model's 15 linears, 5 norms fused of 5
        assert r[3:8] == ["yes", "15 / 15", "15", "5", "5"]
        assert float(r[11]) < 1e-4 and r[12] == "yes" and float(r[13].rstrip(" |")) > 0.99
