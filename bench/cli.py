"""``lowbit-bench`` (also ``python -m lowbit.bench``): the measurement commands, kept out of the
product's ``lowbit`` command so that nothing in the product imports ``lowbit.bench``.

Commands: ``run`` (every contender side by side -> ``bench/RESULTS.md``), ``demo`` (what
``make demo`` runs), ``compile-time`` (-> ``bench/COMPILE_TIME.md``), ``rotation`` (-> ``bench/ROTATION.md``), ``deploy`` (->
``bench/DEPLOY.md``), ``scale`` (-> ``bench/SCALE.md``), ``architectures`` (->
``bench/ARCHITECTURES.md``), ``optq-layer`` (OPTQ's parts on one layer) and ``synth`` (a
real-shaped synthetic decoder for scale tests, :mod:`lowbit.models.synthetic_llm`). Errors,
signals and scratch files behave exactly as in ``lowbit``.
"""

from __future__ import annotations

import sys

from lowbit.compiler.cli import main as _cli_main

__all__ = ["COMMANDS", "main"]

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("lowbit.bench.cli_bench", "measure lowbit and its peers side by side (writes bench/RESULTS.md)"),
    "demo": ("lowbit.bench.demo", "export -> compile -> evaluate SmolLM2-135M, print a table"),
    "peers-setup": ("lowbit.bench.peer_envs", "create the peer tools' own venvs from bench/peers/*/requirements.txt (make bench runs it)"),
    "tuning": ("lowbit.bench.tuning", "recipe sweeps on the tuning split, the only text settings are chosen on (bench/TUNING.md)"),
    "compile-time": ("lowbit.bench.compile_time", "lowbit's compile time against ORT quantize_static, back to back (bench/COMPILE_TIME.md)"),
    "rotation": ("lowbit.bench.rotation_bench", "rotations with and without, on the evaluation split and news, and the rotated ort-cpu model's speed (bench/ROTATION.md)"),
    "deploy": ("lowbit.bench.deploy_bench", "the flagship recipe's deployed form vs FP32, ORT int4, llama.cpp and ORT GenAI: speed, size, faithfulness (bench/DEPLOY.md)"),
    "scale": ("lowbit.bench.scale_bench", "peak memory and compile time against model size on synthetic decoders (bench/SCALE.md)"),
    "architectures": ("lowbit.bench.architectures", "every architecture family x exporter x recipe on tiny random models: compiles, sites, norms, folding, --verify, ORT defaults (bench/ARCHITECTURES.md)"),
    "optq-layer": ("lowbit.bench.optq_layer", "OPTQ's factor, steps and refit on one decoder layer of a real shape, as a block-wise compile runs them"),
    "kernels": ("lowbit.bench.kernel_bench", "per-op time of the W4A8 MatMulLowbit kernels on SmolLM2's shapes against ORT's FP32 MatMul and the bandwidth bound"),
    "synth": ("lowbit.models.synthetic_llm", "write a real-shaped synthetic decoder (Llama / Qwen2 shapes) to a new directory"),
}


def main(argv: list[str] | None = None) -> int:
    return _cli_main(argv, commands=COMMANDS, prog="lowbit-bench",
                     description="measure lowbit against its peers on the same model, data and machine")


if __name__ == "__main__":
    sys.exit(main())
