// Multi-row drivers (GEMV over threads, blocked GEMM) and the one-time kernel selection.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <mutex>

#include "kernels_impl.h"

namespace lowbit {
namespace {

using detail::DecodeRowsMixed;

// ---- multi-row drivers ------------------------------------------------------------------------
constexpr int64_t kMR = 16;   // activation rows per micro tile (two ymm)
constexpr int64_t kNR = 6;    // weight rows per micro tile
constexpr int64_t kNB = 48;   // weight rows per thread task
constexpr int64_t kKC = 256;  // K block kept in L1/L2 (a multiple of 32: chunks never straddle)

// Float GEMM: W decoded per (task rows x kKC) into float and multiplied against a packed,
// chunk-permuted copy of A: Apack[mb][k][16].
// `par(total, grain, fn)` runs fn(begin, end) over [0, total) (ORT's pool, or serially).
template <typename Par>
void GemmF32Impl(Par&& par, const Kernels& kern, const float* A, int64_t M, const Weight& w,
                 float* Y) {
  const int64_t K = w.K, N = w.N, MB = (M + kMR - 1) / kMR, Mpad = MB * kMR;
  // Reused across calls (per calling thread): a fresh multi-MB buffer per call would be
  // mmap'ed and page-faulted in every time.
  // The lambdas below run on pool threads: they must use this thread's buffer through a local
  // reference (naming the thread_local there would pick the worker's own, empty, instance).
  thread_local std::vector<float> apack_buffer;
  std::vector<float>& apack = apack_buffer;
  apack.assign(static_cast<size_t>(Mpad * K), 0.0f);
  par(static_cast<size_t>(MB), size_t(1), [&](size_t b0, size_t b1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t mb = int64_t(b0); mb < int64_t(b1); ++mb)
      for (int64_t i = 0; i < kMR && mb * kMR + i < M; ++i) {
        PermuteRow(A + (mb * kMR + i) * K, row.data(), K);
        float* dst = apack.data() + mb * K * kMR + i;
        for (int64_t k = 0; k < K; ++k) dst[k * kMR] = row[k];
      }
  });
  par(static_cast<size_t>(N), size_t(kNB), [&](size_t s0, size_t s1) {
    const int64_t n0 = int64_t(s0), nb = int64_t(s1) - n0;
    // Rows padded to a multiple of kNR with zero weights, so every micro tile is full.
    const int64_t nbp = (nb + kNR - 1) / kNR * kNR;
    std::vector<float> wdec(static_cast<size_t>(nbp * kKC), 0.f);
    std::vector<float> cbuf(static_cast<size_t>(nbp * Mpad), 0.f);
    for (int64_t k0 = 0; k0 < K; k0 += kKC) {
      const int64_t kc = std::min(kKC, K - k0);
      (w.fp8_mask ? DecodeRowsMixed : kern.decode_rows)(w, n0, nb, k0, kc, wdec.data(), kKC);
      for (int64_t mb = 0; mb < MB; ++mb) {
        const float* ap = apack.data() + mb * K * kMR + k0 * kMR;
        for (int64_t r = 0; r < nbp; r += kNR)
          kern.micro(ap, wdec.data() + r * kKC, kKC, kc, cbuf.data() + r * Mpad + mb * kMR, Mpad);
      }
    }
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < nb; ++r) Y[m * N + n0 + r] = cbuf[r * Mpad + m];
  });
}

void GemmF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
             const Weight& w, float* Y) {
  GemmF32Impl([&](size_t total, size_t grain, auto&& fn) { ParallelRanges(ctx, total, grain, fn); },
              kern, A, M, w, Y);
}

constexpr int64_t kGemmMinRows = 4;
// Weight rows per GEMV thread task: >= 16 rows, at most ~32 tasks (ORT task overhead).
inline size_t GemvGrain(int64_t N) { return size_t(std::max<int64_t>(16, (N + 31) / 32)); }

}  // namespace

const Kernels& ScalarKernels() { return detail::kScalar; }

const Kernels& SelectKernels() {
  static const Kernels* chosen = [] {
    static Kernels vnni = detail::kAvx2;  // the AVX2 set with the VNNI int8_group kernels
    detail::SetVnniKernels(vnni);
    const char* env = std::getenv("LOWBIT_ORT_ISA");
    const std::string cap = env != nullptr ? env : "";
    if (cap == "scalar") return &detail::kScalar;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) return &detail::kScalar;
    const bool has_vnni = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                          __builtin_cpu_supports("avx512vbmi");
    return cap != "avx2" && has_vnni ? static_cast<const Kernels*>(&vnni) : &detail::kAvx2;
  }();
  return *chosen;
}

// ---- special values (see kernels.h) ----------------------------------------------------------
bool WeightRowsTame(const Kernels& kern, const Weight& w, int64_t n0, int64_t n1) {
  if (!w.bytes_all_tame) {  // the rows' scales are contiguous
    const int64_t i0 = n0 * w.nb, count = (n1 - n0) * w.nb;
    if (w.scale_f32 ? !kern.f32_scales_tame(w.scale_f32 + i0, count, w.global)
                    : !kern.byte_scales_tame(w, w.scale_u8 + i0, count))
      return false;
  }
  if (w.fp8_mask) {
    const int64_t i0 = w.fp8_first[n0], i1 = n1 < w.N ? w.fp8_first[n1] : w.fp8_count;
    if (!kern.f32_scales_tame(w.fp8_scales + i0, i1 - i0, 1.0f)) return false;
  }
  return true;
}

bool WeightRowTame(const Kernels& kern, const Weight& w, int64_t n) {
  return WeightRowsTame(kern, w, n, n + 1);
}

void ClassifyScaleBytes(Weight& w) {
  w.bytes_all_tame = w.scale_u8 != nullptr;
  w.byte_ranges_exact = false;
  if (w.scale_u8 == nullptr) return;
  for (int b = 0; b < 256; ++b) {
    w.byte_tame[b] = TameScale(w.byte_table[b] * w.global);
    w.bytes_all_tame = w.bytes_all_tame && w.byte_tame[b];
  }
  if (w.bytes_all_tame) return;
  // The range form: magnitude codes (E4M3 is sign-magnitude), up to two codes of value 0 / NaN,
  // the tame codes in between a low and a high bound.
  const uint8_t mask = w.format == Format::kNvfp4 ? 0x7F : 0xFF;
  int nfree = 0, lo = -1, hi = -1;
  uint8_t free_codes[2] = {0, 0};
  for (int m = 0; m <= mask; ++m) {
    const float v = w.byte_table[m] * w.global;
    if (v == 0.0f || v != v) {
      if (nfree == 2) return;  // table lookups
      free_codes[nfree++] = uint8_t(m);
    } else if (w.byte_tame[m]) {
      if (lo < 0) lo = m;
      hi = m;
    }
  }
  if (lo < 0) lo = hi = free_codes[0];  // no tame nonzero code: an empty range is not possible
  if (nfree == 1) free_codes[1] = free_codes[0];
  for (int b = 0; b < 256; ++b) {
    const int m = b & mask;
    const bool range = (m >= lo && m <= hi) || m == free_codes[0] || m == free_codes[1];
    if (range != w.byte_tame[b]) return;  // not of the range form: table lookups
  }
  w.byte_code_mask = mask;
  w.byte_lo = uint8_t(lo);
  w.byte_hi = uint8_t(hi);
  w.byte_free[0] = free_codes[0];
  w.byte_free[1] = free_codes[1];
  w.byte_ranges_exact = true;
}

namespace {

bool RowTame(const float* a, int64_t K) {
  int bad = 0;
  for (int64_t k = 0; k < K; ++k) bad |= !TameActivation(a[k]);
  return bad == 0;
}

// y[n] for n in [n0, n1) of one activation row: `fast(n0, n1)` (a GEMV kernel) when the
// activation row is tame (`row_tame`), then the exact path on the weight rows that are not tame
// (or on every row when the activation row is not): the decoded weight row (the fallback's
// value * s) dotted with `ap()`, the row in float activation order (PermuteRow), which is the
// order decode_rows emits. `fast` returns whether it found every weight row's scales tame itself
// (the int8_group GEMV checks each row while its scales are in L1: a separate scan of a task's
// scales, before or after the kernel, made the decode GEMV up to 1.35x slower from DRAM);
// otherwise one scan of the task's scales follows. Results of untame rows are overwritten.
template <typename Ap, typename Fast>
void GemvRows(const Kernels& kern, const Weight& w, Ap&& ap, bool row_tame, float* y,
              int64_t n0, int64_t n1, Fast&& fast) {
  const bool check = !w.bytes_all_tame || w.fp8_mask != nullptr;
  if (row_tame && (fast(n0, n1) || !check || WeightRowsTame(kern, w, n0, n1))) return;
  std::vector<float> wrow;
  for (int64_t n = n0; n < n1; ++n) {
    if (row_tame && WeightRowTame(kern, w, n)) continue;
    wrow.resize(static_cast<size_t>(w.K));
    (w.fp8_mask ? DecodeRowsMixed : kern.decode_rows)(w, n, 1, 0, w.K, wrow.data(), w.K);
    y[n] = kern.dot(ap(), wrow.data(), w.K);
  }
}

}  // namespace

void MatMulF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
               const Weight& w, float* Y) {
  if (M >= kGemmMinRows) return GemmF32(ctx, kern, A, M, w, Y);
  std::vector<float> ap(static_cast<size_t>(w.K));
  for (int64_t m = 0; m < M; ++m) {
    const bool tame = RowTame(A + m * w.K, w.K);
    PermuteRow(A + m * w.K, ap.data(), w.K);
    float* y = Y + m * w.N;
    ParallelRanges(ctx, static_cast<size_t>(w.N), GemvGrain(w.N), [&](size_t n0, size_t n1) {
      GemvRows(kern, w, [&] { return ap.data(); }, tame, y, int64_t(n0), int64_t(n1),
               [&](int64_t e0, int64_t e1) {
        (w.fp8_mask ? kern.gemv_mixed : kern.gemv_f32)(ap.data(), w, y, e0, e1);
        return false;  // scales not checked
      });
    });
  }
}

void MatMulI8(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
              const Weight& w, const float* row_scales, float* Y) {
  const int64_t K = w.K;
  std::vector<float> qf(static_cast<size_t>(K));
  if (M >= kGemmMinRows) {
    // Multi-row: the dequantized activations q * s (exact small integers times the row scale,
    // NaN kept) go through the float GEMM: the fallback's products, summed in another order.
    std::vector<float> deq(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
      QuantizeRowF(A + m * K, qf.data(), K, row_scales[m]);
      for (int64_t k = 0; k < K; ++k) deq[m * K + k] = qf[k] * row_scales[m];
    }
    return GemmF32(ctx, kern, deq.data(), M, w, Y);
  }
  std::vector<int8_t> q(static_cast<size_t>(K)), qp(static_cast<size_t>(K));
  std::vector<float> deq(static_cast<size_t>(K)), dp(static_cast<size_t>(K));
  for (int64_t m = 0; m < M; ++m) {
    const float s = row_scales[m];
    QuantizeRowF(A + m * K, qf.data(), K, s);
    // The int8 kernel returns s * sum_b (mult * scale_b) * int32 dot_b: the fallback's sum of
    // fl(q * s) * w up to rounding while s is positive, 127 * s finite and no q is NaN (a NaN
    // activation, or a dynamic scale made infinite by an Inf); otherwise the exact path on the
    // dequantized row reproduces the fallback's NaN. Untame weight rows take the exact path too.
    int nan = 0;
    for (int64_t k = 0; k < K; ++k) {
      nan |= qf[k] != qf[k];
      deq[k] = qf[k] * s;
    }
    const bool int_ok = s > 0.0f && std::isfinite(127.0f * s) && nan == 0;
    if (int_ok) {
      for (int64_t k = 0; k < K; ++k) q[k] = static_cast<int8_t>(qf[k]);
      PermuteRowI8(q.data(), qp.data(), K);
    }
    PermuteRow(deq.data(), dp.data(), K);
    float* y = Y + m * w.N;
    ParallelRanges(ctx, static_cast<size_t>(w.N), GemvGrain(w.N), [&](size_t n0, size_t n1) {
      GemvRows(kern, w, [&] { return dp.data(); }, int_ok, y, int64_t(n0), int64_t(n1),
               [&](int64_t e0, int64_t e1) {
        kern.gemv_i8(qp.data(), s, w, y, e0, e1);
        return false;
      });
    });
  }
}

// ---- int8_group (kernels.h) -------------------------------------------------------------------
namespace {

// The rows of A quantized once: q [M][K], group scales [M][K/G], lane sums [M][K/8], tame [M].
struct I8gRows {
  int64_t K, G;
  std::vector<int8_t> q;
  std::vector<float> s;
  std::vector<int32_t> lane_sum;
  std::vector<uint8_t> tame;
  const int8_t* Q(int64_t m) const { return q.data() + m * K; }
  const float* S(int64_t m) const { return s.data() + m * (K / G); }
  const int32_t* Sums(int64_t m) const { return lane_sum.data() + m * (K / kI8gLane); }
};

I8gRows QuantizeI8gRows(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
                        int64_t K, int64_t G) {
  I8gRows r{K, G, std::vector<int8_t>(size_t(M * K)), std::vector<float>(size_t(M * (K / G))),
            std::vector<int32_t>(size_t(M * (K / kI8gLane))), std::vector<uint8_t>(size_t(M))};
  ParallelRanges(ctx, static_cast<size_t>(M), 8, [&](size_t m0, size_t m1) {
    for (int64_t m = int64_t(m0); m < int64_t(m1); ++m)
      r.tame[m] = kern.quantize_i8g(A + m * K, K, G, r.q.data() + m * K, r.s.data() + m * (K / G),
                                    r.lane_sum.data() + m * (K / kI8gLane));
  });
  return r;
}

// GroupQuant's output of row m, nearbyint(a / s_g) * s_g (NaN and Inf as GroupQuant gives them),
// in float activation order: what the exact path multiplies. Made on first use (thread-safe):
// only untame rows, and tame rows meeting untame weight rows, need it.
class ExactRows {
 public:
  ExactRows(const float* A, const I8gRows& rows, int64_t M)
      : A_(A), rows_(rows), once_(new std::once_flag[size_t(M)]), dp_(size_t(M)) {}
  const float* Get(int64_t m) {
    std::call_once(once_[m], [&] {
      const int64_t K = rows_.K, G = rows_.G;
      const float *a = A_ + m * K, *s = rows_.S(m);
      std::vector<float> deq(static_cast<size_t>(K));
      for (int64_t k = 0; k < K; ++k) deq[k] = std::nearbyint(a[k] / s[k / G]) * s[k / G];
      dp_[m].resize(static_cast<size_t>(K));
      PermuteRow(deq.data(), dp_[m].data(), K);
    });
    return dp_[m].data();
  }

 private:
  const float* A_;
  const I8gRows& rows_;
  std::unique_ptr<std::once_flag[]> once_;
  std::vector<std::vector<float>> dp_;
};

// Decode rows (M < kGemmMinRows): the GEMV kernel per activation row on the tame weight rows.
void GemvI8g(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
             const Weight& w, const I8gRows& rows, float* Y) {
  const int64_t K = w.K, N = w.N, L = K / kI8gLane, G = rows.G;
  const float mult = IntMultiplier(w.format);
  std::vector<int8_t> qp(static_cast<size_t>(M * K));
  std::vector<int32_t> corr(static_cast<size_t>(M * L));
  std::vector<float> lsc(static_cast<size_t>(M * L));
  std::vector<I8gRow> act(static_cast<size_t>(M));
  for (int64_t m = 0; m < M; ++m) {
    act[m] = {qp.data() + m * K, corr.data() + m * L, lsc.data() + m * L};
    if (!rows.tame[m]) continue;
    PermuteRowI8g(rows.Q(m), qp.data() + m * K, K, kern.i8g_chunk);
    for (int64_t l = 0; l < L; ++l) corr[m * L + l] = -kI8gOffset * rows.Sums(m)[l];
    for (int64_t g = 0; g < K / G; ++g)
      std::fill_n(lsc.data() + m * L + g * (G / kI8gLane), G / kI8gLane, rows.S(m)[g] * mult);
  }
  ExactRows exact(A, rows, M);
  ParallelRanges(ctx, static_cast<size_t>(N), GemvGrain(N), [&](size_t n0, size_t n1) {
    for (int64_t m = 0; m < M; ++m)  // the task's weight rows stay in cache across the rows of A
      GemvRows(kern, w, [&] { return exact.Get(m); }, rows.tame[m], Y + m * N, int64_t(n0),
               int64_t(n1), [&](int64_t e0, int64_t e1) {
                 return kern.gemv_i8g(act[m], w, Y + m * N, e0, e1);
               });
  });
}

// Panel p of the GEMM (rows 16p .. 16p + 15; absent and untame rows are zeros: q = 0 gives 0).
// block_group[b]: the activation group holding weight block b.
void PackPanelI8g(const I8gRows& rows, int64_t M, int64_t p, const Weight& w,
                  const int64_t* block_group, int8_t* q, int32_t* corr, float* asc) {
  const int64_t K = rows.K, lanes = w.block / kI8gLane;
  const float mult = IntMultiplier(w.format);
  for (int64_t i = 0; i < kI8gPanel; ++i) {
    const int64_t m = p * kI8gPanel + i;
    const bool use = m < M && rows.tame[m];
    const int8_t* src = use ? rows.Q(m) : nullptr;
    for (int64_t j = 0; j < K / 4; ++j) {  // 4 consecutive k of row i: one dword of the panel
      int8_t* dst = q + (j * kI8gPanel + i) * 4;
      if (use) std::memcpy(dst, src + 4 * j, 4);
      else std::memset(dst, 0, 4);
    }
    const int32_t* sums = use ? rows.Sums(m) : nullptr;
    for (int64_t b = 0; b < w.nb; ++b) {
      int32_t sum = 0;
      for (int64_t l = b * lanes; use && l < (b + 1) * lanes; ++l) sum += sums[l];
      corr[b * kI8gPanel + i] = -kI8gOffset * sum;
      asc[b * kI8gPanel + i] = use ? rows.S(m)[block_group[b]] * mult : 0.0f;
    }
  }
}

// Multi-row: activations packed once into 16-row panels; per task of kNB weight rows the codes
// are unpacked once into bytes and multiplied against every panel (kern.gemm_i8g). Untame
// weight rows and untame activation rows are then redone by the exact path.
void GemmI8g(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
             const Weight& w, const I8gRows& rows, float* Y) {
  const int64_t K = w.K, N = w.N, nb = w.nb, MB = (M + kI8gPanel - 1) / kI8gPanel;
  const int64_t Mpad = MB * kI8gPanel, per_panel = nb * kI8gPanel;
  thread_local std::vector<int8_t> q_buffer;  // see GemmF32Impl on thread_local buffers
  std::vector<int8_t>& q = q_buffer;
  q.resize(static_cast<size_t>(Mpad * K));
  std::vector<int32_t> corr(static_cast<size_t>(MB * per_panel));
  std::vector<float> asc(static_cast<size_t>(MB * per_panel));
  std::vector<int64_t> block_group(static_cast<size_t>(nb));
  for (int64_t b = 0; b < nb; ++b) block_group[b] = b * w.block / rows.G;
  ParallelRanges(ctx, static_cast<size_t>(MB), 1, [&](size_t p0, size_t p1) {
    for (int64_t p = int64_t(p0); p < int64_t(p1); ++p)
      PackPanelI8g(rows, M, p, w, block_group.data(), q.data() + p * kI8gPanel * K,
                   corr.data() + p * per_panel, asc.data() + p * per_panel);
  });
  ExactRows exact(A, rows, M);
  const bool check = !w.bytes_all_tame;
  ParallelRanges(ctx, static_cast<size_t>(N), size_t(kNB), [&](size_t s0, size_t s1) {
    const int64_t n0 = int64_t(s0), nr = int64_t(s1) - n0;
    const int64_t tile_rows = (nr + kI8gTileRows - 1) / kI8gTileRows * kI8gTileRows;
    // Every element is written below (unpack_i8g, gemm_i8g): no zero-filling.
    const std::unique_ptr<uint8_t[]> u(new uint8_t[size_t(tile_rows * K)]);
    const std::unique_ptr<float[]> sc(new float[size_t(tile_rows * nb)]);
    const std::unique_ptr<float[]> c(new float[size_t(Mpad * tile_rows)]);  // [Mpad][tile_rows]
    kern.unpack_i8g(w, n0, nr, tile_rows, u.get(), sc.get());
    const I8gTile tile{u.get(), sc.get(), tile_rows};
    for (int64_t p = 0; p < MB; ++p) {
      const I8gPanel panel{q.data() + p * kI8gPanel * K, corr.data() + p * per_panel,
                           asc.data() + p * per_panel};
      kern.gemm_i8g(panel, tile, K, w.block, c.get() + p * kI8gPanel * tile_rows, tile_rows);
    }
    for (int64_t m = 0; m < M; ++m)
      if (rows.tame[m]) std::memcpy(Y + m * N + n0, c.get() + m * tile_rows, size_t(nr) * sizeof(float));
    std::vector<float> wrow;
    const bool all_tame = !check || WeightRowsTame(kern, w, n0, n0 + nr);  // one scan
    for (int64_t n = n0; !all_tame && n < n0 + nr; ++n) {
      if (WeightRowTame(kern, w, n)) continue;
      wrow.resize(static_cast<size_t>(K));
      kern.decode_rows(w, n, 1, 0, K, wrow.data(), K);
      for (int64_t m = 0; m < M; ++m)
        if (rows.tame[m]) Y[m * N + n] = kern.dot(exact.Get(m), wrow.data(), K);
    }
  });
  for (int64_t m = 0; m < M; ++m) {
    if (rows.tame[m]) continue;
    ParallelRanges(ctx, static_cast<size_t>(N), GemvGrain(N), [&](size_t n0, size_t n1) {
      GemvRows(kern, w, [&] { return exact.Get(m); }, false, Y + m * N, int64_t(n0), int64_t(n1),
               [](int64_t, int64_t) { return false; });
    });
  }
}

}  // namespace

void MatMulI8Group(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
                   const Weight& w, int64_t G, float* Y) {
  const I8gRows rows = QuantizeI8gRows(ctx, kern, A, M, w.K, G);
  if (M >= kGemmMinRows) return GemmI8g(ctx, kern, A, M, w, rows, Y);
  GemvI8g(ctx, kern, A, M, w, rows, Y);
}

}  // namespace lowbit
