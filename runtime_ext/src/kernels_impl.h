// Internal declarations shared by the kernel translation units (kernels_scalar.cc,
// kernels_avx2.cc, kernels.cc); not part of the ops' interface (kernels.h is).
#pragma once

#include "kernels.h"

namespace lowbit {
namespace detail {

// 4-bit code of element k of a packed row.
inline int Code(const uint8_t* row, int64_t k) {
  return (k & 1) ? row[k / 2] >> 4 : row[k / 2] & 0xF;
}

// Dot over k in [k0, k1) of chunk-permuted activations `ap` with the codes of `row`.
template <typename A, typename Acc>
inline Acc RangeDot(const uint8_t* row, const A* ap, const int8_t* lut, int64_t k0, int64_t k1,
                    int64_t K, int64_t chunk) {
  Acc s = 0;
  for (int64_t k = k0; k < k1; ++k) s += static_cast<Acc>(ap[PermPos(k, K, chunk)]) * lut[Code(row, k)];
  return s;
}

// Scalar pieces the AVX2 kernels reuse for tails and the mixed-precision GEMM decode.
void DecodeRowsScalar(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc,
                      float* out, int64_t ldo);
void DecodeRowsMixed(const Weight& w, int64_t n0, int64_t nr, int64_t k0, int64_t kc, float* out,
                     int64_t ldo);
void GemvMixedScalarTail(const float* ap, const Weight& w, int64_t n, int64_t b, int64_t i,
                         float& out);
const float* E4m3Table();  // 256 E4M3 codes -> float32
bool F32ScalesTameScalar(const float* s, int64_t n, float global);
bool ByteScalesTameScalar(const Weight& w, const uint8_t* b, int64_t n);

// int8_group: codes -> u = v + kI8gOffset (16 unsigned bytes per format).
const uint8_t* OffsetTable(Format f);

// Block scales of weight row n as float32 (uint8 scale bytes through the table into `buf`);
// global_scale not applied.
inline const float* ScaleRow(const Weight& w, int64_t n, std::vector<float>& buf) {
  if (w.scale_f32) return w.scale_f32 + n * w.nb;
  buf.resize(static_cast<size_t>(w.nb));
  for (int64_t b = 0; b < w.nb; ++b) buf[b] = w.byte_table[w.scale_u8[n * w.nb + b]];
  return buf.data();
}

// The kernel sets (kernels_scalar.cc / kernels_avx2.cc); the VNNI set is the AVX2 set with its
// int8_group kernels replaced (kernels_vnni.cc).
extern const Kernels kScalar;
extern const Kernels kAvx2;
void SetVnniKernels(Kernels& k);
// The scalar Hadamard row (kernels.h, hadamard_row): the AVX2 set's path for chunks below 8.
void HadamardRowScalar(const float* x, const float* base, int64_t c, int64_t p, float scale,
                       float* z, float* y);

}  // namespace detail
}  // namespace lowbit
