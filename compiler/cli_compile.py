"""``lowbit compile IN -o OUT --recipe NAME [--eval]``.

``-o`` equal to the input (a directory or a ``.onnx``) compiles it in place (e.g. an optimum
export: ``model.onnx`` and its external data are replaced, tokenizer/config and every other file
stay; see :mod:`lowbit.compiler.api`). An existing ``-o`` that lowbit did not write is refused
unless ``--force`` (:func:`lowbit.files.fsutil.check_model_output`), before any compiling. ``--eval`` measures the output against the FP32 input as
``lowbit eval`` does and adds the numbers to the compile report."""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.errors import LowbitError

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", help=".onnx file, model directory (e.g. an export), or shipped model name")
    parser.add_argument("-o", "--output", required=True, help="output .onnx file or directory")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output even if lowbit did not write it (never a file by a directory)")
    parser.add_argument("-r", "--recipe", default="w8a8", help="recipe name (see `lowbit recipes`) or a .toml file")
    parser.add_argument("-t", "--target", help="emission target, overrides the recipe's (qdq | qdq-fp4 | ort-cpu | npu)")
    parser.add_argument("--ort-format", action="store_true",
                        help="also write an ONNX Runtime mobile .ort file and its reduced operator config beside the .onnx")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set weights.block_size=64 (repeatable)")
    calib = parser.add_mutually_exclusive_group()
    calib.add_argument("--calib-text",
                       help="text file to calibrate a text model on (default: the pydoc_data calibration split)")
    calib.add_argument("--calib-images", metavar="DIR",
                       help="directory of PNG/JPEG images to calibrate an image model (pixel_values) on "
                            "(default: matplotlib's sample images)")
    parser.add_argument("--dump-dir", help="save the model after every pass into this directory")
    parser.add_argument("--verify", action="store_true", help="check every function-preserving pass numerically")
    parser.add_argument("--eval", action="store_true",
                        help="measure accuracy, size and latency vs the FP32 input (as `lowbit eval`) into the report")


def run(args: argparse.Namespace) -> int:
    from lowbit.compiler.api import compile
    from lowbit.files.fsutil import check_model_output, recover_around
    from lowbit.files.paths import cache_root

    source = Path(args.input)
    sources = (source, source / "model.onnx") if source.is_dir() else (source,) if source.exists() else ()
    recover_around(args.output, *sources)
    # the same check save() makes, before minutes of compiling rather than after
    out = check_model_output(args.output, is_dir=Path(args.output).suffix != ".onnx", sources=sources,
                             force=args.force, cache=cache_root())  # fmt: skip
    if args.calib_text and not Path(args.calib_text).is_file():
        what = "not a regular file" if Path(args.calib_text).exists() else "no such file"
        raise LowbitError(f"--calib-text {args.calib_text}: {what}")
    if args.calib_images and not Path(args.calib_images).is_dir():
        what = "not a directory" if Path(args.calib_images).exists() else "no such directory"
        raise LowbitError(f"--calib-images {args.calib_images}: {what}")
    result = compile(args.input, args.recipe, target=args.target, calibration=args.calib_text or args.calib_images,
                     overrides=args.overrides, verify=args.verify, dump_dir=args.dump_dir)  # fmt: skip
    path = result.save(out, ort_format=args.ort_format, force=args.force)
    sites = result.report["sites"]
    done = sum(1 for s in sites.values() if s.get("quantized"))
    print(f"wrote {path}: {done}/{len(sites)} linear sites quantized with recipe "
          f"'{result.recipe.name}' in {result.report['compile_seconds']:.1f}s")  # fmt: skip
    if args.ort_format:
        from lowbit.ort.ort_format import config_path_for, ort_path_for

        onnx_file = path / "model.onnx" if path.is_dir() else path
        print(f"wrote {ort_path_for(onnx_file)} and {config_path_for(onnx_file).name}")
    if args.eval:
        measured = result.evaluate()
        row, base = measured["model"], measured["baseline"]
        cells = []
        for name, entry in row["by_text"].items():
            if "perplexity" in entry:
                cell = f"{name} ppl {entry['perplexity']['ppl']:.3f}"
                if base:
                    a = entry["agreement"]
                    cell += (f" ({entry['perplexity']['ppl'] / base['by_text'][name]['perplexity']['ppl']:.4f} x, "
                             f"KL {a['kl']:.4f}, top-1 {100 * a['top1']:.1f} %)")
            else:
                cell = f"{name} cosine {entry.get('cosine', float('nan')):.5f}"
            cells.append(cell)
        size = f"; size {row['size_bytes'] / base['size_bytes']:.3f} x FP32" if base else ""
        print(f"eval: {'; '.join(cells)}{size}")
    report = path / "report.html" if path.is_dir() else path.with_name(f"{path.stem}.report.html")
    print(f"report: {report}")
    return 0
