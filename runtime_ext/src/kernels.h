// 4-bit weight x float/int8 activation kernels behind MatMulLowbit and GatherLowbit.
//
// Weight layout (what lowbit.runtime_ext.pack_matmul_weight produces): codes uint8 [N, K/2],
// row n holds column n of the math weight W[K, N] along K, two codes per byte, low nibble =
// even k (lowbit.formats.pack_nibbles order); scales [N, K/block] (float32, or uint8 E4M3 bits
// for nvfp4 / E8M0 bits for mxfp4); one float32 global scale. w[k, n] = value(code) *
// fl(scale * global) exactly as lowbit.formats.decode.
//
// Activation order: kernels read activations "chunk-permuted": K is cut into chunks of C
// elements (the last one may be shorter); inside a chunk the even k come first, then the odd k.
// Float activations use C = 8 (PermuteRow), int8 activations C = 32 (PermuteRowI8), int8_group
// activations C = Kernels::i8g_chunk (PermuteRowI8g). Those are the orders in which the SIMD
// unpack emits the low and high nibbles of the packed bytes, so the weights are never reshuffled
// at run time; only the (small) activation row is.
//
// Requires K % 16 == 0 and block in {16} U {32 x j}; the caller validates.
// Dispatch: a portable scalar version, an AVX2+FMA version and (act_mode=int8_group only) an
// AVX-512 VNNI version (F, BW, VL, VNNI, VBMI), chosen once per process (SelectKernels).
#pragma once

#include <cfloat>

#include "common.h"

namespace lowbit {

struct Weight {
  const uint8_t* codes = nullptr;
  int64_t N = 0, K = 0, block = 0, nb = 0;  // nb = K / block, blocks per row
  Format format = Format::kDint4;
  const float* scale_f32 = nullptr;
  const uint8_t* scale_u8 = nullptr;
  float byte_table[256];  // uint8 scale byte -> float32 (filled when scale_u8 is set)
  float global = 1.0f;
  // uint8 scales: byte_tame[b] = TameScale(fl(byte_table[b] * global)); bytes_all_tame when
  // every byte is (then no row needs a scale scan). Filled by BindWeight.
  // Row scans do not look the table up: a byte b is tame iff its magnitude code
  // m = b & byte_code_mask is one of the two codes byte_free (value 0 or NaN) or lies in
  // [byte_lo, byte_hi] (E4M3 magnitudes and E8M0 bytes are monotone), which ClassifyScaleBytes
  // verifies against the table (byte_ranges_exact; else the table is looked up).
  bool byte_tame[256];
  bool bytes_all_tame = false;
  bool byte_ranges_exact = false;
  uint8_t byte_code_mask = 0xFF, byte_lo = 0, byte_hi = 0, byte_free[2] = {0, 0};
  // fl(scale * global): the decode scale of block b of row n.
  inline float Scale(int64_t n, int64_t b) const { return ScaleAt(n * nb + b); }
  inline float ScaleAt(int64_t i) const {
    return (scale_f32 ? scale_f32[i] : byte_table[scale_u8[i]]) * global;
  }

  // Mixed NVFP4/FP8 weights (FGMP): bit b % 8 of fp8_mask[n * mask_stride + b / 8] marks block b
  // of row n as FP8; the i-th FP8 block (row-major order over (n, b)) has 16 E4M3 codes at
  // fp8_codes + 16 i (natural k order) and the float32 scale fp8_scales[i]. fp8_first[n] = index
  // of row n's first FP8 block. Only with nvfp4, block 16, float32 activations.
  const uint8_t* fp8_mask = nullptr;
  int64_t mask_stride = 0;
  const uint8_t* fp8_codes = nullptr;
  const float* fp8_scales = nullptr;
  std::vector<int64_t> fp8_first;
  int64_t fp8_count = 0;  // F, the number of FP8 blocks
  inline bool IsFp8(int64_t n, int64_t b) const {
    return (fp8_mask[n * mask_stride + b / 8] >> (b % 8)) & 1;
  }
};

// ---- special values ----------------------------------------------------------------------
// The GEMV kernels factor a block's scale out of its sum (sum_k a_k v_k) * s, while the ONNX
// fallback (and the GEMM path) sum the products a_k * fl(v_k * s) of the decoded weights. The two
// agree up to float32 rounding (and give the same NaN/Inf) only while no intermediate overflows,
// loses precision as a denormal, or meets an infinite scale. "Tame" values guarantee that: an
// activation is tame when it is 0 or 2^-96 <= |a| <= 2^96 (so NaN and +-Inf are not), a block
// scale fl(scale * global) when it is +-0, NaN or 2^-96 <= |s| <= 2^96. A row of activations or a
// weight row that is not tame takes the exact path instead: decode the weights (value * s, the
// fallback's float32 operations) and sum the products a_k * w_k.
constexpr float kTameLo = 0x1p-96f, kTameHi = 0x1p96f;
// Branch-free (bitwise operators), so that loops over them vectorize.
inline bool TameScale(float s) {
  const float a = std::fabs(s);
  return !((a > kTameHi) | ((a < kTameLo) & (a != 0.0f)));  // NaN compares false: tame
}
inline bool TameActivation(float x) {
  const float a = std::fabs(x);
  return (a == 0.0f) | ((a >= kTameLo) & (a <= kTameHi));  // NaN, +-Inf: not tame
}
// Whether every block scale of weight row n (and of its FP8 blocks) is tame; of rows [n0, n1).
struct Kernels;
bool WeightRowTame(const Kernels& kern, const Weight& w, int64_t n);
bool WeightRowsTame(const Kernels& kern, const Weight& w, int64_t n0, int64_t n1);
// Fills w.byte_tame / w.bytes_all_tame (after scale_u8, byte_table and global are set).
void ClassifyScaleBytes(Weight& w);

// Chunk sizes of the two activation orders, and the position of element k in that order.
constexpr int64_t kChunkF32 = 8, kChunkI8 = 32;
inline int64_t PermPos(int64_t k, int64_t K, int64_t chunk) {
  const int64_t base = k - k % chunk, len = std::min(chunk, K - base), j = k - base;
  return base + ((j & 1) ? len / 2 + j / 2 : j / 2);
}

// A row of K floats (chunk 8) / int8 (chunk 32) in chunk-permuted order.
void PermuteRow(const float* a, float* out, int64_t K);
void PermuteRowI8(const int8_t* a, int8_t* out, int64_t K);

// Symmetric int8 quantization of one row, in float as the fallback computes it:
// q = clamp(rint(a / scale), -127, 127), NaN kept (ONNX Clip passes NaN through) so that
// non-finite activations behave as in the fallback; the int8 kernels take q when none is NaN.
void QuantizeRowF(const float* a, float* q, int64_t K, float scale);

// ---- int8 activations per group (act_mode=int8_group) ---------------------------------------
// A row is quantized per group of G channels exactly as GroupQuant with qmax 127 does:
// s_g = max(absmax / 127, FLT_MIN), q = nearbyint(a / s_g), an integer in [-127, 127]. The kernels
// multiply the unsigned bytes u = v + kI8gOffset (v = IntTable(format)[code], |v| <= 12 for every
// format: u in [0, 24]) by the signed q (vpdpbusd / vpmaddubsw, whose int16 pair sums stay
// <= 2 * 24 * 127: no saturation) and take kI8gOffset * sum(q) back, precomputed per row.
// Every "lane" of 8 consecutive k (or, in the GEMM, every weight block) contributes
// fl(fl(float(int32 dot) * sc_b) * fl(s_g * mult)), sc_b = fl(scale * global), summed in float:
// the fallback's sum of fl(q * s_g) * fl(v * mult * sc_b) up to rounding while the row and the
// weight row are tame (see TameGroupScale and "special values" above).
// Requires G % 32 == 0, K % G == 0 and a power-of-two block dividing G (MatMulLowbit checks).
constexpr int kI8gOffset = 12;
constexpr int64_t kI8gLane = 8;      // k per lane
constexpr int64_t kI8gPanel = 16;    // activation rows per GEMM panel
constexpr int64_t kI8gTileRows = 12; // GEMM weight tiles hold a multiple of this many rows
// A group scale the int8 kernels take: an all-zero group (amax 0: q = 0), or
// 2^-96 <= s <= 2^96 (no NaN, no Inf, no scale from the FLT_MIN floor of a tiny group).
inline bool TameGroupScale(float amax, float s) {
  return amax == 0.0f || (s >= kTameLo && s <= kTameHi);
}
// GroupQuant's scale of a group (qmax 127) from its absmax; NaN when the group holds a NaN.
inline float GroupScale127(float amax, bool nan) {
  const float raw = amax / 127.0f;
  return nan ? std::nanf("") : (raw > FLT_MIN || raw != raw ? raw : FLT_MIN);
}

struct I8gRow {  // one activation row, GEMV form
  const int8_t* qp;     // [K] q in the kernel's order (PermuteRowI8g, Kernels::i8g_chunk)
  const int32_t* corr;  // [K/8] -kI8gOffset * sum of q over k in [8i, 8i + 8)
  const float* lsc;     // [K/8] s_g * mult of the group holding lane i
};

struct I8gPanel {  // 16 activation rows (panel row i = vector lane i), GEMM form
  const int8_t* q;      // [K/4][16][4]: q[row i][4j .. 4j + 3] at (j * 16 + i) * 4
  const int32_t* corr;  // [nb][16] -kI8gOffset * sum of q over weight block b
  const float* asc;     // [nb][16] s_g * mult of block b's group
};

struct I8gTile {  // weight rows [n0, n0 + nr) of a GEMM task, unpacked once for every panel
  const uint8_t* u;  // [nr][K] v + kI8gOffset, natural k order
  const float* sc;   // [nr][nb] fl(scale * global)
  int64_t nr;        // a multiple of kI8gTileRows (padding rows: u = kI8gOffset, sc = 0)
};

// q in the int8_group kernel order of chunk size `chunk` (a power of two >= 32): K is cut into
// chunks of `chunk`, then of chunk / 2, ... down to 32 (the tail of K % chunk; K % 32 == 0);
// inside each the even k come first, then the odd k (the nibble order of the packed bytes).
void PermuteRowI8g(const int8_t* q, int8_t* out, int64_t K, int64_t chunk);

struct Kernels {
  const char* name;
  // y[n] for n in [n0, n1): dot(ap, w[:, n]); ap chunk-permuted float.
  void (*gemv_f32)(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1);
  // y[n] = a_scale * sum_b scale_b * int32 dot over block b; aq chunk-permuted int8.
  void (*gemv_i8)(const int8_t* aq, float a_scale, const Weight& w, float* y, int64_t n0,
                  int64_t n1);
  // Decodes rows [n0, n0+nr), k in [k0, k0+kc) to out[r * ldo + j] in chunk-permuted order.
  void (*decode_rows)(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                      float* out, int64_t ldo);
  // C tile update: c[r * ldc + i] += sum_k ap[k * 16 + i] * wd[r * ldw + k], r < 6, i < 16.
  void (*micro)(const float* ap, const float* wd, int64_t ldw, int64_t kc, float* c, int64_t ldc);
  // gemv_f32 for mixed NVFP4/FP8 weights (w.fp8_mask set).
  void (*gemv_mixed)(const float* ap, const Weight& w, float* y, int64_t n0, int64_t n1);
  // sum_k a[k] * b[k] over k < n (the exact path: decoded weight row times activations).
  float (*dot)(const float* a, const float* b, int64_t n);
  // Whether TameScale(s[i] * global) for every i < n.
  bool (*f32_scales_tame)(const float* s, int64_t n, float global);
  // Whether every scale byte b[i], i < n, is tame (w.byte_tame, in its range form when exact).
  bool (*byte_scales_tame)(const Weight& w, const uint8_t* b, int64_t n);

  // int8_group (see above). Quantizes one row: q[k], s[g] (GroupQuant's scales, NaN for a group
  // with a NaN) and lane_sum[i] = sum of q over k in [8i, 8i + 8); returns whether every group
  // is tame (TameGroupScale). q and lane_sum are meaningful only then.
  bool (*quantize_i8g)(const float* a, int64_t K, int64_t G, int8_t* q, float* s,
                       int32_t* lane_sum);
  int64_t i8g_chunk;  // the activation order gemv_i8g reads (PermuteRowI8g)
  // y[n] for n in [n0, n1); returns true when it found every row's block scales fl(s * global)
  // in [2^-96, 2^96] (so tame; false: some row may not be, WeightRowsTame decides).
  bool (*gemv_i8g)(const I8gRow& a, const Weight& w, float* y, int64_t n0, int64_t n1);
  // Weight rows [n0, n0 + nr) into an I8gTile's u / sc; rows nr .. tile_rows are padding.
  void (*unpack_i8g)(const Weight& w, int64_t n0, int64_t nr, int64_t tile_rows, uint8_t* u,
                     float* sc);
  // c[i * ldc + r] = panel row i times tile row r, i < 16, r < t.nr (rows of Y, transposed in
  // registers: the driver copies them out contiguously).
  void (*gemm_i8g)(const I8gPanel& a, const I8gTile& t, int64_t K, int64_t block, float* c,
                   int64_t ldc);

  // One row of lowbit::Hadamard (hadamard.cc), n = c * p with p a power of two: v = x * scale,
  // a fast Walsh-Hadamard transform of each chunk of p, then y[k * p + j] = sum_i base[i * c + k]
  // * v[i * p + j] in order of i from 0.0f (z: n floats of scratch, unused when c == 1). Every
  // set performs the same float32 operations (butterflies, products, sums in the same order, no
  // fused multiply-add), so all give the same bits.
  void (*hadamard_row)(const float* x, const float* base, int64_t c, int64_t p, float scale,
                       float* z, float* y);
};

// The best set the CPU runs: AVX-512 VNNI (the AVX2 set with VNNI int8_group kernels), AVX2+FMA,
// scalar. LOWBIT_ORT_ISA=scalar / avx2 caps the choice (to test every path on one machine).
const Kernels& SelectKernels();
const Kernels& ScalarKernels();

// Y[M, N] = A[M, K] @ W (float activations), multi-threaded via ctx.
void MatMulF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
               const Weight& w, float* Y);
// int8 activations: per-row scales (dynamic) or one static scale.
void MatMulI8(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
              const Weight& w, const float* row_scales, float* Y);

// act_mode=int8_group with groups of G channels (see above), multi-threaded via ctx.
void MatMulI8Group(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
                   const Weight& w, int64_t G, float* Y);

// Validates codes [R, D/2], scales [R, D/block] (float32 or format-matching uint8) and the
// one-value global scale against the unpacked length D, and fills `w` (MatMulLowbit, GatherLowbit).
struct Input;
void BindWeight(const char* op, Format format, int64_t block, const Input& codes,
                const Input& scales, const Input& global, int64_t D, Weight& w);

}  // namespace lowbit
