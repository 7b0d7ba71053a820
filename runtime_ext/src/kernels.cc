// Multi-row drivers (GEMV over threads, blocked GEMM) and the one-time kernel selection.
#include "kernels.h"

#include <algorithm>
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

void MatMulF32(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
               const Weight& w, float* Y) {
  if (M >= kGemmMinRows) return GemmF32(ctx, kern, A, M, w, Y);
  std::vector<float> ap(static_cast<size_t>(w.K));
  for (int64_t m = 0; m < M; ++m) {
    PermuteRow(A + m * w.K, ap.data(), w.K);
    float* y = Y + m * w.N;
    ParallelRanges(ctx, static_cast<size_t>(w.N), GemvGrain(w.N), [&](size_t n0, size_t n1) {
      (w.fp8_mask ? kern.gemv_mixed : kern.gemv_f32)(ap.data(), w, y, int64_t(n0), int64_t(n1));
    });
  }
}

void MatMulI8(Ort::KernelContext& ctx, const Kernels& kern, const float* A, int64_t M,
              const Weight& w, const float* row_scales, float* Y) {
  const int64_t K = w.K;
  std::vector<int8_t> q(static_cast<size_t>(K)), qp(static_cast<size_t>(K));
  if (M >= kGemmMinRows) {
    // Multi-row: the quantized activations (exact small integers times the row scale) go
    // through the float GEMM; the result differs from integer accumulation only by float
    // rounding of the sums.
    std::vector<float> deq(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) {
      QuantizeRowI8(A + m * K, q.data(), K, row_scales[m]);
      for (int64_t k = 0; k < K; ++k) deq[m * K + k] = q[k] * row_scales[m];
    }
    return GemmF32(ctx, kern, deq.data(), M, w, Y);
  }
  for (int64_t m = 0; m < M; ++m) {
    QuantizeRowI8(A + m * K, q.data(), K, row_scales[m]);
    PermuteRowI8(q.data(), qp.data(), K);
    float* y = Y + m * w.N;
    const float s = row_scales[m];
    ParallelRanges(ctx, static_cast<size_t>(w.N), GemvGrain(w.N), [&](size_t n0, size_t n1) {
      kern.gemv_i8(qp.data(), s, w, y, int64_t(n0), int64_t(n1));
    });
  }
}

}  // namespace lowbit
