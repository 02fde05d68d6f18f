// Float sums that vectorise under strict IEEE rules (shared by the CPU kernels).
//
// One running sum is a chain of dependent adds: without -ffast-math (not used here, see
// setup.py) the compiler may not reorder it, so it runs at one add per FP-add latency and never
// uses SIMD. Summing into kSumLanes independent partial sums, then adding those, is a fixed
// order the compiler can vectorise. The order differs from a single chain, as any BLAS's does,
// so use it only where results are compared with the reference to fp32 tolerance (the
// multi-scale LoRA projection, the attention-map energies), never in the weight-space scores,
// which every backend must reproduce bit for bit.
#pragma once

#include <cstdint>

namespace purify_fast {

constexpr int64_t kSumLanes = 16;

// Σ_{i<n} term(i) in fp32, term inlined (a lambda reading the operands at index i).
template <typename Term>
inline float lane_sum(int64_t n, Term term) {
  float lanes[kSumLanes] = {};
  const int64_t body = n - n % kSumLanes;
  for (int64_t i = 0; i < body; i += kSumLanes)
    for (int64_t j = 0; j < kSumLanes; ++j) lanes[j] += term(i + j);
  float acc = 0.f;
  for (int64_t j = 0; j < kSumLanes; ++j) acc += lanes[j];
  for (int64_t i = body; i < n; ++i) acc += term(i);
  return acc;
}

}  // namespace purify_fast
