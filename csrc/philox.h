// Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3", SC'11),
// shared by the C++ CPU kernels, the CUDA kernels and the host-side known-answer test.
//
// Counter c = (c0, c1, c2, c3), key k = (k0, k1), ten rounds of
//   (hi0, lo0) = M0 * c0,  (hi1, lo1) = M1 * c2          (32x32 -> 64-bit products)
//   c' = (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)
//   k  += (W0, W1)                                        (between rounds, mod 2^32)
// purify_fast only needs the first output word at counter (i_lo, i_hi, 0, 0), so that is the one
// entry point; it must stay bit-identical to purify_fast.reference.weight_space.philox_uint32.
// Header-only and free of any library include so plain g++ and plain nvcc both compile it.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define PF_HD __host__ __device__ __forceinline__
#else
#define PF_HD inline __attribute__((always_inline))
#endif

namespace purify_fast {
namespace philox {

constexpr uint32_t kM0 = 0xD2511F53u;
constexpr uint32_t kM1 = 0xCD9E8D57u;
constexpr uint32_t kW0 = 0x9E3779B9u;
constexpr uint32_t kW1 = 0xBB67AE85u;

// One Philox round on the counter words (c0..c3) with round key (k0, k1).
PF_HD void round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  // 64-bit products: on the host the compiler maps these onto (vector) widening multiplies, on
  // the device onto mul.lo/mul.hi pairs; written once so both sides agree bit for bit.
  const uint64_t p0 = static_cast<uint64_t>(kM0) * c0;
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
  const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
  c0 = hi1 ^ c1 ^ k0;
  c1 = lo1;
  c2 = hi0 ^ c3 ^ k1;
  c3 = lo0;
}

// Full Philox4x32-10 on an arbitrary counter, all four output words (used by the known-answer
// test against the Random123 vectors).
PF_HD void philox4x32_10(uint32_t ctr[4], uint32_t k0, uint32_t k1) {
  uint32_t c0 = ctr[0], c1 = ctr[1], c2 = ctr[2], c3 = ctr[3];
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  ctr[0] = c0;
  ctr[1] = c1;
  ctr[2] = c2;
  ctr[3] = c3;
}

// First output word of Philox4x32-10 at counter (index & 0xFFFFFFFF, index >> 32, 0, 0) with key
// (k0, k1). The last round only needs what feeds word 0: hi(M1 * c2) ^ c1 ^ k0.
PF_HD uint32_t first_word(uint64_t index, uint32_t k0, uint32_t k1) {
  uint32_t c0 = static_cast<uint32_t>(index), c1 = static_cast<uint32_t>(index >> 32);
  uint32_t c2 = 0u, c3 = 0u;
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < 9; ++r) {
    round(c0, c1, c2, c3, k0, k1);
    k0 += kW0;
    k1 += kW1;
  }
  const uint64_t p1 = static_cast<uint64_t>(kM1) * c2;
  return static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
}

}  // namespace philox
}  // namespace purify_fast

#undef PF_HD
