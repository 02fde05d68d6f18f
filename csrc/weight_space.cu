// CUDA kernels of the weight-space ops (module purify_fast._C_cuda), behind extern "C" launchers
// that take raw device pointers, sizes, a dtype code and a stream. No torch header is included, so
// CI compile-checks this file with plain `nvcc -c -arch=sm_90`; the torch wrappers live in
// weight_space_cuda_binding.cpp.
//
// Contract: purify_fast/ops/weight_space.py; math: purify_fast/reference/weight_space.py. Masks and
// histograms are bit-identical to the reference. Every score uses the _rn intrinsics (__fsub_rn,
// __fmul_rn, __fadd_rn, __fdiv_rn), which nvcc never contracts into FMAs nor approximates, so the
// fp32 score bits (and with them histogram counts and resets) agree with torch bit for bit.
//
// dtype codes: 0 float32, 1 float16, 2 bfloat16 (3 float64, all_finite only).
#include <cuda_runtime.h>
#include <stdint.h>

#include "philox.h"

namespace {

constexpr int kThreads = 256;

// ------------------------------------------------------------------------------------ dtypes

struct F32 {
  using raw = uint32_t;
  static __device__ __forceinline__ float to_float(raw v) { return __uint_as_float(v); }
};
struct BF16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to_float(raw v) {
    return __uint_as_float(static_cast<uint32_t>(v) << 16);
  }
};
// Exact half -> float by bit manipulation (no cuda_fp16.h needed): normal numbers are rebased by
// moving the exponent field and rescaling by 2^-112, subnormals rebuilt under a fixed exponent.
struct F16 {
  using raw = uint16_t;
  static __device__ __forceinline__ float to_float(raw v) {
    const uint32_t w = static_cast<uint32_t>(v) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normal = __fmul_rn(__uint_as_float((two_w >> 4) + (0xE0u << 23)), 0x1.0p-112f);
    const float subnormal = __fsub_rn(__uint_as_float((two_w >> 17) | (126u << 23)), 0.5f);
    const uint32_t mag = two_w < (1u << 27) ? __float_as_uint(subnormal) : __float_as_uint(normal);
    return __uint_as_float(sign | mag);
  }
};

// V consecutive elements through 16-byte loads/stores (the caller guarantees alignment).
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, T (&dst)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(V * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(dst)[k] = __ldg(reinterpret_cast<const uint4*>(p) + k);
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) dst[k] = p[k];
  }
}

template <class T, int V>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const T (&src)[V]) {
  if constexpr ((V * sizeof(T)) % 16 == 0) {
#pragma unroll
    for (int k = 0; k < static_cast<int>(V * sizeof(T) / 16); ++k)
      reinterpret_cast<uint4*>(p)[k] = reinterpret_cast<const uint4*>(src)[k];
  } else {
#pragma unroll
    for (int k = 0; k < V; ++k) p[k] = src[k];
  }
}

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------------------------ scores

// The reference's fp32 expressions, one rounding per operation, never fused.
template <int IND>
__device__ __forceinline__ float score(float pre, float ft, float h, float eps) {
  const float d = __fsub_rn(ft, pre);
  if constexpr (IND == 0) {
    return __fdiv_rn(__fmul_rn(d, d), __fadd_rn(h, eps));
  } else if constexpr (IND == 1) {
    return fabsf(d);
  } else if constexpr (IND == 2) {
    return __fdiv_rn(1.0f, __fadd_rn(h, eps));
  } else {
    return __fmul_rn(__fmul_rn(d, d), h);
  }
}

// ------------------------------------------------------------------------------------ elementwise

// Grid-stride driver: `f.template apply<V>(i)` handles elements [i, i+V). With `vec` the body runs
// on 16-byte packs (V elements of the narrowest stream) and the remainder element by element.
template <class F>
__global__ void elementwise_kernel(F f, int64_t n, bool vec) {
  constexpr int V = F::V;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t start = 0;
  if (vec) {
    const int64_t packs = n / V;
    for (int64_t p = tid; p < packs; p += stride) f.template apply<V>(p * V);
    start = packs * V;
  }
  for (int64_t i = start + tid; i < n; i += stride) f.template apply<1>(i);
}

int sm_count() {
  int dev = 0, sms = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  return sms > 0 ? sms : 1;
}

// Enough blocks to fill the GPU several times over, never more than the work needs.
int grid_for(int64_t work_items) {
  const int64_t need = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 16;
  return static_cast<int>(need < 1 ? 1 : (need < cap ? need : cap));
}

template <class F>
int launch_elementwise(const F& f, int64_t n, bool vec, cudaStream_t stream) {
  if (n <= 0) return 0;
  elementwise_kernel<F><<<grid_for(vec ? n / F::V + 1 : n), kThreads, 0, stream>>>(f, n, vec);
  return static_cast<int>(cudaGetLastError());
}

// out[i] = (philox(i) < T) ? ft[i] : pre[i] with T in [0, 2^32] compared as 64-bit.
template <class R>
struct MixOp {
  static constexpr int V = 16 / sizeof(R);
  const R* pre;
  const R* ft;
  R* out;
  uint32_t k0, k1;
  uint64_t thr;
  template <int W>
  __device__ __forceinline__ void apply(int64_t i) const {
    R p[W], f[W], o[W];
    load_vec<R, W>(pre + i, p);
    load_vec<R, W>(ft + i, f);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const uint32_t u = purify_fast::philox::first_word(static_cast<uint64_t>(i + k), k0, k1);
      o[k] = static_cast<uint64_t>(u) < thr ? f[k] : p[k];
    }
    store_vec<R, W>(out + i, o);
  }
};

// acc[i] = acc[i] + (g*g)*scale in the reference's order.
template <class D>
struct FisherOp {
  using R = typename D::raw;
  static constexpr int V = 16 / sizeof(R);
  float* acc;
  const R* g;
  float scale;
  template <int W>
  __device__ __forceinline__ void apply(int64_t i) const {
    R gv[W];
    float a[W];
    load_vec<R, W>(g + i, gv);
    load_vec<float, W>(acc + i, a);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float x = D::to_float(gv[k]);
      a[k] = __fadd_rn(a[k], __fmul_rn(__fmul_rn(x, x), scale));
    }
    store_vec<float, W>(acc + i, a);
  }
};

// out[i] = (score_i >= thr) == take_ft ? ft[i] : pre[i] (raw copies of the inputs).
template <class D, int IND>
struct SelectOp {
  using R = typename D::raw;
  static constexpr int V = 16 / sizeof(R);
  const R* pre;
  const R* ft;
  const float* h;  // null for the drift indicator
  R* out;
  float eps, thr;
  bool take_ft;
  template <int W>
  __device__ __forceinline__ void apply(int64_t i) const {
    R p[W], f[W], o[W];
    float hv[W];
    load_vec<R, W>(pre + i, p);
    load_vec<R, W>(ft + i, f);
    if (IND != 1) load_vec<float, W>(h + i, hv);
#pragma unroll
    for (int k = 0; k < W; ++k) {
      const float s = score<IND>(D::to_float(p[k]), D::to_float(f[k]), IND != 1 ? hv[k] : 0.0f, eps);
      o[k] = (s >= thr) == take_ft ? f[k] : p[k];
    }
    store_vec<R, W>(out + i, o);
  }
};

// ------------------------------------------------------------------------------------ histogram

constexpr int kSliceBins = 32768;  // level 1 needs only 32768 bins: the score's sign bit is 0

// Counts score bit patterns into `hist` (int64[65536]). Level 1 (prefix < 0): bin = bits >> 16.
// Level 2: scores with bits >> 16 == prefix, bin = bits & 0xFFFF; blockIdx.y picks which half of
// the 65536 level-2 bins this block counts, so each block's table is 32768 uint32 counters (128 KiB
// of shared memory). SHARED=false is the fallback for GPUs without that much opt-in shared
// memory: global 64-bit atomics straight into `hist`.
template <class D, int IND, bool SHARED>
__global__ void __launch_bounds__(1024) histogram_kernel(const typename D::raw* __restrict__ pre,
                                 const typename D::raw* __restrict__ ft,
                                 const float* __restrict__ h, int64_t n, float eps,
                                 unsigned long long* __restrict__ hist, int prefix, bool vec) {
  using R = typename D::raw;
  constexpr int V = 16 / sizeof(R);
  extern __shared__ uint32_t sbins[];
  const uint32_t base = blockIdx.y * kSliceBins;
  if (SHARED) {
    for (int b = threadIdx.x; b < kSliceBins; b += blockDim.x) sbins[b] = 0u;
    __syncthreads();
  }
  auto count = [&](float s) {
    const uint32_t bits = __float_as_uint(s) & 0x7FFFFFFFu;
    uint32_t bin;
    if (prefix < 0) {
      bin = bits >> 16;
    } else {
      if ((bits >> 16) != static_cast<uint32_t>(prefix)) return;
      bin = bits & 0xFFFFu;
    }
    if (bin - base >= static_cast<uint32_t>(kSliceBins)) return;  // the other slice's bin
    if (SHARED) atomicAdd(&sbins[bin - base], 1u);
    else atomicAdd(&hist[bin], 1ull);
  };
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int64_t start = 0;
  if (vec) {
    const int64_t packs = n / V;
    for (int64_t q = tid; q < packs; q += stride) {
      R p[V], f[V];
      float hv[V];
      load_vec<R, V>(pre + q * V, p);
      load_vec<R, V>(ft + q * V, f);
      if (IND != 1) load_vec<float, V>(h + q * V, hv);
#pragma unroll
      for (int k = 0; k < V; ++k)
        count(score<IND>(D::to_float(p[k]), D::to_float(f[k]), IND != 1 ? hv[k] : 0.0f, eps));
    }
    start = packs * V;
  }
  for (int64_t i = start + tid; i < n; i += stride)
    count(score<IND>(D::to_float(pre[i]), D::to_float(ft[i]), IND != 1 ? h[i] : 0.0f, eps));
  if (SHARED) {
    __syncthreads();
    for (int b = threadIdx.x; b < kSliceBins; b += blockDim.x)
      if (sbins[b] != 0u) atomicAdd(&hist[base + b], static_cast<unsigned long long>(sbins[b]));
  }
}

template <class D, int IND, bool SHARED>
int launch_histogram_impl(const void* pre, const void* ft, const float* h, int64_t n, float eps,
                          int64_t* hist, int prefix, bool vec, int blocks, cudaStream_t stream) {
  using R = typename D::raw;
  auto kernel = histogram_kernel<D, IND, SHARED>;
  const size_t smem = SHARED ? kSliceBins * sizeof(uint32_t) : 0;
  if (SHARED) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return static_cast<int>(err);
  }
  const dim3 grid(blocks, prefix < 0 ? 1 : 2);
  kernel<<<grid, 1024, smem, stream>>>(static_cast<const R*>(pre), static_cast<const R*>(ft), h, n,
                                      eps, reinterpret_cast<unsigned long long*>(hist), prefix, vec);
  return static_cast<int>(cudaGetLastError());
}

template <class D, int IND>
int launch_histogram(const void* pre, const void* ft, const float* h, int64_t n, float eps,
                     int64_t* hist, int prefix, bool vec, cudaStream_t stream) {
  int dev = 0, optin = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  // One 1024-thread block per SM holds the 128 KiB table; more blocks only when a block's uint32
  // counters could overflow (n / blocks must stay below 2^32).
  int64_t blocks = sm_count();
  const int64_t min_blocks = n / 0x7FFFFFFFll + 1;
  if (blocks < min_blocks) blocks = min_blocks;
  const int64_t need = (n + 1023) / 1024;
  if (blocks > need) blocks = need < 1 ? 1 : need;
  if (optin >= static_cast<int>(kSliceBins * sizeof(uint32_t)))
    return launch_histogram_impl<D, IND, true>(pre, ft, h, n, eps, hist, prefix, vec,
                                               static_cast<int>(blocks), stream);
  return launch_histogram_impl<D, IND, false>(pre, ft, h, n, eps, hist, prefix, vec,
                                              static_cast<int>(blocks * 4), stream);
}

// ------------------------------------------------------------------------------------ E-PUR

// One warp per row: lanes stride over the row (16-byte packs when rows are aligned), fp32 partial
// sums folded with warp shuffles, lane 0 writes sqrt(sum) / log(max(freq, c)).
template <class D>
__global__ void embedding_kernel(const typename D::raw* __restrict__ pre,
                                 const typename D::raw* __restrict__ ft,
                                 const float* __restrict__ freqs, int64_t rows, int64_t dim, float c,
                                 float* __restrict__ out, bool vec) {
  using R = typename D::raw;
  constexpr int V = 16 / sizeof(R);
  const int lane = threadIdx.x & 31;
  const int64_t warps = (static_cast<int64_t>(gridDim.x) * blockDim.x) >> 5;
  for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; r < rows;
       r += warps) {
    const R* p = pre + r * dim;
    const R* f = ft + r * dim;
    float acc = 0.0f;
    int64_t start = 0;
    if (vec) {
      const int64_t packs = dim / V;
      for (int64_t q = lane; q < packs; q += 32) {
        R pv[V], fv[V];
        load_vec<R, V>(p + q * V, pv);
        load_vec<R, V>(f + q * V, fv);
#pragma unroll
        for (int k = 0; k < V; ++k) {
          const float d = __fsub_rn(D::to_float(fv[k]), D::to_float(pv[k]));
          acc = __fadd_rn(acc, __fmul_rn(d, d));
        }
      }
      start = packs * V;
    }
    for (int64_t j = start + lane; j < dim; j += 32) {
      const float d = __fsub_rn(D::to_float(f[j]), D::to_float(p[j]));
      acc = __fadd_rn(acc, __fmul_rn(d, d));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc = __fadd_rn(acc, __shfl_xor_sync(0xFFFFFFFFu, acc, off));
    if (lane == 0) {
      const float fr = freqs[r];
      out[r] = __fdiv_rn(__fsqrt_rn(acc), logf(fr < c ? c : fr));
    }
  }
}

// ------------------------------------------------------------------------------------ all_finite

// Sets *flag to 1 when any element has an all-ones exponent (NaN or +-Inf).
template <class R, uint64_t MASK>
__global__ void nonfinite_kernel(const R* __restrict__ x, int64_t n, int* __restrict__ flag, bool vec) {
  constexpr int V = 16 / sizeof(R);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  int bad = 0;
  int64_t start = 0;
  if (vec) {
    const int64_t packs = n / V;
    for (int64_t q = tid; q < packs; q += stride) {
      R v[V];
      load_vec<R, V>(x + q * V, v);
#pragma unroll
      for (int k = 0; k < V; ++k) bad |= (static_cast<uint64_t>(v[k]) & MASK) == MASK;
    }
    start = packs * V;
  }
  for (int64_t i = start + tid; i < n; i += stride) bad |= (static_cast<uint64_t>(x[i]) & MASK) == MASK;
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicOr(flag, 1);
}

constexpr int kBadDtype = -1;

}  // namespace

extern "C" {

// All launchers return a cudaError_t as int (0 on success) or -1 for an unknown dtype/indicator
// code; they only enqueue work on `stream`.

int pf_ws_mix_random(const void* pre, const void* ft, void* out, int64_t n, int dtype,
                     uint32_t k0, uint32_t k1, uint64_t keep_threshold, cudaStream_t stream) {
  const bool vec = aligned16(pre) && aligned16(ft) && aligned16(out);
  if (dtype == 0) {
    MixOp<uint32_t> op{static_cast<const uint32_t*>(pre), static_cast<const uint32_t*>(ft),
                       static_cast<uint32_t*>(out), k0, k1, keep_threshold};
    return launch_elementwise(op, n, vec, stream);
  }
  if (dtype == 1 || dtype == 2) {
    MixOp<uint16_t> op{static_cast<const uint16_t*>(pre), static_cast<const uint16_t*>(ft),
                       static_cast<uint16_t*>(out), k0, k1, keep_threshold};
    return launch_elementwise(op, n, vec, stream);
  }
  return kBadDtype;
}

int pf_ws_fisher_accumulate(float* acc, const void* grad, int64_t n, int dtype, float scale,
                            cudaStream_t stream) {
  const bool vec = aligned16(acc) && aligned16(grad);
  switch (dtype) {
    case 0: return launch_elementwise(FisherOp<F32>{acc, static_cast<const uint32_t*>(grad), scale}, n, vec, stream);
    case 1: return launch_elementwise(FisherOp<F16>{acc, static_cast<const uint16_t*>(grad), scale}, n, vec, stream);
    case 2: return launch_elementwise(FisherOp<BF16>{acc, static_cast<const uint16_t*>(grad), scale}, n, vec, stream);
    default: return kBadDtype;
  }
}

int pf_ws_score_histogram(const void* pre, const void* ft, const float* hessian, int64_t n,
                          int dtype, int indicator, float eps, int64_t* hist, int prefix,
                          cudaStream_t stream) {
  if (n <= 0) return 0;
  const bool vec = aligned16(pre) && aligned16(ft) && (hessian == nullptr || aligned16(hessian));
#define PF_HIST(D)                                                                                  \
  switch (indicator) {                                                                              \
    case 0: return launch_histogram<D, 0>(pre, ft, hessian, n, eps, hist, prefix, vec, stream);    \
    case 1: return launch_histogram<D, 1>(pre, ft, nullptr, n, eps, hist, prefix, vec, stream);    \
    case 2: return launch_histogram<D, 2>(pre, ft, hessian, n, eps, hist, prefix, vec, stream);    \
    case 3: return launch_histogram<D, 3>(pre, ft, hessian, n, eps, hist, prefix, vec, stream);    \
    default: return kBadDtype;                                                                      \
  }
  switch (dtype) {
    case 0: PF_HIST(F32)
    case 1: PF_HIST(F16)
    case 2: PF_HIST(BF16)
    default: return kBadDtype;
  }
#undef PF_HIST
}

int pf_ws_select_by_score(const void* pre, const void* ft, const float* hessian, int64_t n,
                          int dtype, int indicator, float eps, float threshold, int take_ft,
                          void* out, cudaStream_t stream) {
  const bool vec = aligned16(pre) && aligned16(ft) && aligned16(out) &&
                   (hessian == nullptr || aligned16(hessian));
  const bool tf = take_ft != 0;
#define PF_SEL(D, IND)                                                                              \
  return launch_elementwise(                                                                        \
      SelectOp<D, IND>{static_cast<const D::raw*>(pre), static_cast<const D::raw*>(ft),             \
                       IND == 1 ? nullptr : hessian, static_cast<D::raw*>(out), eps, threshold, tf}, \
      n, vec, stream)
#define PF_SEL_IND(D)            \
  switch (indicator) {           \
    case 0: PF_SEL(D, 0);        \
    case 1: PF_SEL(D, 1);        \
    case 2: PF_SEL(D, 2);        \
    case 3: PF_SEL(D, 3);        \
    default: return kBadDtype;   \
  }
  switch (dtype) {
    case 0: PF_SEL_IND(F32)
    case 1: PF_SEL_IND(F16)
    case 2: PF_SEL_IND(BF16)
    default: return kBadDtype;
  }
#undef PF_SEL_IND
#undef PF_SEL
}

int pf_ws_embedding_drift_scores(const void* pre, const void* ft, const float* freqs, int64_t rows,
                                 int64_t dim, int dtype, float c, float* out, cudaStream_t stream) {
  if (rows <= 0) return 0;
  const int elem = dtype == 0 ? 4 : 2;
  const bool vec = aligned16(pre) && aligned16(ft) && (dim * elem) % 16 == 0;
  const int warps_per_block = kThreads / 32;
  int64_t blocks = (rows + warps_per_block - 1) / warps_per_block;
  const int64_t cap = static_cast<int64_t>(sm_count()) * 32;
  if (blocks > cap) blocks = cap;
  const int grid = static_cast<int>(blocks);
  switch (dtype) {
    case 0:
      embedding_kernel<F32><<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(pre),
          static_cast<const uint32_t*>(ft), freqs, rows, dim, c, out, vec);
      break;
    case 1:
      embedding_kernel<F16><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(pre),
          static_cast<const uint16_t*>(ft), freqs, rows, dim, c, out, vec);
      break;
    case 2:
      embedding_kernel<BF16><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(pre),
          static_cast<const uint16_t*>(ft), freqs, rows, dim, c, out, vec);
      break;
    default: return kBadDtype;
  }
  return static_cast<int>(cudaGetLastError());
}

// `flag` is one device int; it is zeroed here and set to 1 if any element is NaN/Inf.
int pf_ws_all_finite(const void* x, int64_t n, int dtype, int* flag, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(flag, 0, sizeof(int), stream);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (n <= 0) return 0;
  const bool vec = aligned16(x);
  const int grid = grid_for(n / 8 + 1);
  switch (dtype) {
    case 0: nonfinite_kernel<uint32_t, 0x7F800000ull><<<grid, kThreads, 0, stream>>>(static_cast<const uint32_t*>(x), n, flag, vec); break;
    case 1: nonfinite_kernel<uint16_t, 0x7C00ull><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(x), n, flag, vec); break;
    case 2: nonfinite_kernel<uint16_t, 0x7F80ull><<<grid, kThreads, 0, stream>>>(static_cast<const uint16_t*>(x), n, flag, vec); break;
    case 3: nonfinite_kernel<uint64_t, 0x7FF0000000000000ull><<<grid, kThreads, 0, stream>>>(static_cast<const uint64_t*>(x), n, flag, vec); break;
    default: return kBadDtype;
  }
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
