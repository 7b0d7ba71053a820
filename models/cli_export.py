"""``lowbit export MODEL -o DIR [--with-past]``: write an ONNX export directory.

MODEL is a shipped name (``smollm2-135m``, ``minilm-l6``) or a Hugging Face model directory.
What is exported follows the task its ``config.json`` names (causal LM with logits, text encoder
or its head, the encoder of an encoder-decoder model, image model; see
:mod:`lowbit.models.export`); the printed line says what was exported. The export is cached;
DIR receives a copy, written atomically.
"""

from __future__ import annotations

import argparse
import json

from lowbit.models.registry import SHIPPED

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL",
                        help=f"shipped name ({', '.join(sorted(SHIPPED))}) or HF model directory (causal LM, text "
                             "encoder, encoder-decoder (its encoder), image model)")
    parser.add_argument("-o", "--output", required=True, metavar="DIR", help="export directory to write")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing DIR even if lowbit did not write it")
    parser.add_argument("--with-past", action="store_true",
                        help="causal LMs: optimum export with KV-cache inputs (opset 18) instead of torch dynamo "
                             "(opset 23)")


def run(args: argparse.Namespace) -> int:
    from lowbit.models.export import export_model

    out = export_model(args.model, with_past=args.with_past, out_dir=args.output, force=args.force)
    meta = json.loads((out / "lowbit_export.json").read_text())
    print(f"exported {meta['model']} ({meta['kind']}, {meta['exporter']}, opset {meta['opset']}) -> {out}")
    print(f"  model: {meta['exported']}")
    for note in meta.get("notes", []):
        print(f"  note: {note}")
    return 0
