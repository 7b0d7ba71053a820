"""``lowbit report OUT [--screenshot PNG]``: print the compile report stored next to a compiled
model, regenerating its ``report.md`` and ``report.html`` from ``report.json`` (so a page written by
an older lowbit picks up the current layout); ``--screenshot`` renders the page in headless Chromium."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lowbit.errors import LowbitError, printable

__all__ = ["add_arguments", "run", "read_report", "report_json_path"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output", help="a compiled .onnx file or output directory")
    parser.add_argument("--screenshot", metavar="PNG",
                        help="also render report.html in headless Chromium and save it as this PNG")  # fmt: skip


def report_json_path(output: Path) -> Path:
    """Where a compiled output keeps its report.json."""
    return output / "report.json" if output.is_dir() else output.with_name(f"{output.stem}.report.json")


class _Shape:
    """Checks a parsed report.json against what ``render_markdown`` / ``render_html`` read: the
    keys every compile writes (``recipe``, ``passes``, ``sites``), and the type of every field
    the pages compute with or format (numbers, lists, objects); any other key is free-form."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, expected: str, value: Any = ...) -> None:
        if value is ...:
            raise LowbitError(f"{self.path}: not a compile report: {where} is missing")
        raise LowbitError(f"{self.path}: not a compile report: {where} must be {expected} (found {_json_kind(value)})")

    def obj(self, value: Any, where: str) -> dict:
        if not isinstance(value, dict):
            self.fail(where, "an object", value)
        return value

    def lst(self, value: Any, where: str) -> list:
        if not isinstance(value, list):
            self.fail(where, "a list", value)
        return value

    def num(self, value: Any, where: str, *, optional: bool = False, positive: bool = False) -> None:
        if value is None and optional:
            return
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and isinstance(value, int):
            ok = abs(value) < 2**1023  # formatted as a float by the pages
        if ok and positive:
            ok = value > 0
        if not ok:
            self.fail(where, "a positive number" if positive else "a number", value)

    def scalar(self, value: Any, where: str) -> None:
        if not isinstance(value, (str, int, float, bool)) and value is not None:
            self.fail(where, "a string, number or null", value)

    def opt(self, d: dict, key: str, where: str, check: Any) -> None:
        if key in d:
            check(d[key], f"{where}.{key}")

    def report(self, data: Any) -> dict:
        report = self.obj(data, "the top level")
        for key in ("recipe", "passes", "sites"):
            if key not in report:
                self.fail(f"key '{key}'", "present")
        self.obj(report["recipe"], "recipe")
        self.opt(report, "versions", "", self.obj)
        for i, p in enumerate(self.lst(report["passes"], "passes")):
            where = f"passes[{i}]"
            self.obj(p, where)
            for key in ("pass", "seconds", "modified", "nodes_before", "nodes_after"):
                if key not in p:
                    self.fail(f"{where}.{key}", "present")
                self.scalar(p[key], f"{where}.{key}")
            self.num(p["seconds"], f"{where}.seconds")
        for name, site in self.obj(report["sites"], "sites").items():
            where = f"sites[{name!r}]"
            self.obj(site, where)
            for key in ("weights", "block_size", "activations", "feeder", "reason", "quantized"):
                self.opt(site, key, where, self.scalar)
            self.opt(site, "bits_per_weight", where, lambda v, w: self.num(v, w, optional=True))
            if "shape" in site:
                for j, d in enumerate(self.lst(site["shape"], f"{where}.shape")):
                    if not isinstance(d, int) or isinstance(d, bool) or d < 0 or d > 2**62:
                        self.fail(f"{where}.shape[{j}]", "a dimension (an integer >= 0)", d)
        if report.get("evaluation"):
            self.evaluation(self.obj(report["evaluation"], "evaluation"))
        if report.get("slac"):
            self.opt(report, "calibration", "", self.obj)
            for i, row in enumerate(self.lst(report["slac"], "slac")):
                self.obj(row, f"slac[{i}]")
                self.num(row.get("seq_len"), f"slac[{i}].seq_len", positive=True)
                for key in ("tensors", "median_ratio", "min_ratio", "max_ratio"):
                    self.num(row.get(key), f"slac[{i}].{key}")
        for i, t in enumerate(self.lst(report.get("slac_tensors") or [], "slac_tensors")):
            self.obj(t, f"slac_tensors[{i}]")
            self.scalar(t.get("tensor"), f"slac_tensors[{i}].tensor")
            for n, v in self.obj(t.get("absmax"), f"slac_tensors[{i}].absmax").items():
                if not n.isdigit():
                    self.fail(f"slac_tensors[{i}].absmax key {n!r}", "a window length")
                self.num(v, f"slac_tensors[{i}].absmax[{n!r}]", optional=True)
        if report.get("reorder"):
            rep = self.obj(report["reorder"], "reorder")
            for key, g in self.obj(rep.get("groups", {}), "reorder.groups").items():
                self.obj(g, f"reorder.groups[{key!r}]")
            if rep.get("plot"):
                plot = self.obj(rep["plot"], "reorder.plot")
                if plot.get("png_base64") is not None and not isinstance(plot["png_base64"], str):
                    self.fail("reorder.plot.png_base64", "a string", plot["png_base64"])
        if report.get("precision"):
            per_site = self.obj(report["precision"], "precision").get("per_site_fp8_fraction") or {}
            for name, frac in self.obj(per_site, "precision.per_site_fp8_fraction").items():
                self.num(frac, f"precision.per_site_fp8_fraction[{name!r}]")
        return report

    def evaluation(self, ev: dict) -> None:
        if "model" not in ev:
            self.fail("evaluation.model", "present")
        for label in ("model", "baseline"):
            row = ev.get(label)
            if label == "baseline" and not row:
                continue
            where = f"evaluation.{label}"
            self.obj(row, where)
            self.num(row.get("size_bytes"), f"{where}.size_bytes", positive=True)
            self.opt(row, "kind", where, self.scalar)
            self.opt(row, "bits_per_weight", where, lambda v, w: self.num(v, w, optional=True))
            self.opt(row, "cosine", where, lambda v, w: self.num(v, w, optional=True))
            for key, fields in (("perplexity", ("ppl",)), ("latency", ("prefill_ms", "decode_ms"))):
                if row.get(key) is not None:
                    inner = self.obj(row[key], f"{where}.{key}")
                    for f in fields:
                        self.opt(inner, f, f"{where}.{key}", lambda v, w: self.num(v, w, optional=True))
        self.num(ev.get("ppl_ratio"), "evaluation.ppl_ratio", optional=True)
        if ev.get("options") is not None:
            self.obj(ev["options"], "evaluation.options")


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"the number {value}" if len(repr(value)) <= 20 else "a number too large"
    if isinstance(value, str):
        return f"the string {printable(value[:40])!r}"
    return {list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def read_report(path: Path) -> dict:
    """A report.json parsed and checked (:class:`_Shape`); LowbitError naming what is wrong."""
    from lowbit.files.fsutil import read_json

    data = read_json(path, "a compile report")
    return _Shape(path).report(data)


def run(args: argparse.Namespace) -> int:
    from lowbit.compiler import report
    from lowbit.files.fsutil import recover_around

    recover_around(args.output)  # a compile killed mid-swap is put right first
    path = report_json_path(Path(args.output))
    if not path.is_file():
        raise LowbitError(f"{args.output}: no compile report found ({path.name} missing)")
    data = read_report(path)
    if args.screenshot:
        from lowbit.files.fsutil import check_writable_parent

        check_writable_parent(Path(args.screenshot))
    _, _, html_path = report.write(data, path.parent, path.name.removesuffix(".json"))
    print(report.render_markdown(data), end="")
    print(f"report page: {html_path}")
    if args.screenshot:
        from lowbit.compiler.screenshot import screenshot

        print(f"report screenshot: {screenshot(html_path, Path(args.screenshot))}")
    return 0
