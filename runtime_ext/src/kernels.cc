// Multi-row drivers (GEMV over threads, blocked GEMM) and the one-time kernel selection.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>

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
    const char* isa = std::getenv("LOWBIT_ORT_ISA");
    if (isa != nullptr && std::string(isa) == "scalar") return &detail::kScalar;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &detail::kAvx2;
    return &detail::kScalar;
  }();
  return *chosen;
}

// ---- special values (see kernels.h) ----------------------------------------------------------
bool WeightRowTame(const Kernels& kern, const Weight& w, int64_t n) {
  if (!w.bytes_all_tame) {
    const int64_t i0 = n * w.nb;
    if (w.scale_f32 ? !kern.f32_scales_tame(w.scale_f32 + i0, w.nb, w.global)
                    : !kern.byte_scales_tame(w, w.scale_u8 + i0, w.nb))
      return false;
  }
  if (w.fp8_mask) {
    const int64_t i0 = w.fp8_first[n], i1 = n + 1 < w.N ? w.fp8_first[n + 1] : w.fp8_count;
    if (!kern.f32_scales_tame(w.fp8_scales + i0, i1 - i0, 1.0f)) return false;
  }
  return true;
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

// y[n] for n in [n0, n1) of one activation row: `fast(e0, e1)` (a GEMV kernel) on the runs of
// tame weight rows when the activation row is tame (`row_tame`), else the exact path: the
// decoded weight row (the fallback's value * s) dotted with `ap`, the row in float activation
// order (PermuteRow), which is the order decode_rows emits.
template <typename Fast>
void GemvRows(const Kernels& kern, const Weight& w, const float* ap, bool row_tame, float* y,
              int64_t n0, int64_t n1, Fast&& fast) {
  const bool check = !w.bytes_all_tame || w.fp8_mask != nullptr;
  std::vector<float> wrow;
  for (int64_t n = n0; n < n1;) {
    int64_t e = n;
    if (row_tame) {
      if (!check) e = n1;
      while (e < n1 && WeightRowTame(kern, w, e)) ++e;
    }
    if (e > n) {
      fast(n, e);
      n = e;
      continue;
    }
    wrow.resize(static_cast<size_t>(w.K));
    (w.fp8_mask ? DecodeRowsMixed : kern.decode_rows)(w, n, 1, 0, w.K, wrow.data(), w.K);
    y[n] = kern.dot(ap, wrow.data(), w.K);
    ++n;
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
      GemvRows(kern, w, ap.data(), tame, y, int64_t(n0), int64_t(n1), [&](int64_t e0, int64_t e1) {
        (w.fp8_mask ? kern.gemv_mixed : kern.gemv_f32)(ap.data(), w, y, e0, e1);
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
      GemvRows(kern, w, dp.data(), int_ok, y, int64_t(n0), int64_t(n1), [&](int64_t e0, int64_t e1) {
        kern.gemv_i8(qp.data(), s, w, y, e0, e1);
      });
    });
  }
}

}  // namespace lowbit
