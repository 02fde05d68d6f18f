// CUDA kernels of the multi-scale LoRA (MSLR) linear op, behind extern "C" launchers that take
// raw pointers and a cudaStream_t (no torch headers, so `nvcc -c -arch=sm_90` checks this file on
// a machine without a CUDA torch). The binding (multiscale_lora_cuda_binding.cpp) wraps them.
//
// Math (purify_fast/reference/multiscale_lora.py), Q = n·r_in:
//   project:      v[M,Q] (fp32) = (x[M,K]·lᵀ)·sᵀ,  l [Q,K] fp32, s [Q,Q] fp32 (= (α/r_in)·S)
//   lowrank_fill: y[M,N] = b[N] + v·rtᵀᵀ = b[n] + Σ_t v[m,t]·rt[t,n],  rt [Q,N] fp32
// The binding finishes y = x·wᵀ + y with cuBLAS (beta = 1), so the big GEMM stays on the vendor
// kernel while the rank-Q update and the bias cost one extra write of y and no [M,N] temporary.
#include "cuda_convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kRows = 16;       // rows of x per block in the projection
constexpr int kTileK = 64;      // K chunk staged in shared memory
constexpr int kQLanes = 16;     // threads per row; thread (row, lane) owns ranks lane, lane+16, ..
constexpr int kMaxQChunks = 4;  // so Q <= 64 (the binding checks)

using purify_fast::from_f32;
using purify_fast::to_f32;

// Block = kRows × kQLanes threads. Each K chunk of x (kRows rows) and of l (all Q rows) is staged
// in shared memory, so l is read from L2 once per kRows rows instead of once per row.
template <typename T>
__global__ void project_kernel(const T* __restrict__ x, const float* __restrict__ l,
                               const float* __restrict__ s, float* __restrict__ v, int64_t m,
                               int64_t k, int q) {
  extern __shared__ float smem[];
  float* xs = smem;                               // [kRows][kTileK + 1]
  float* ls = xs + kRows * (kTileK + 1);          // [q][kTileK + 1]
  float* us = ls + q * (kTileK + 1);              // [kRows][q]
  const int tid = threadIdx.x;
  const int row = tid / kQLanes, lane = tid % kQLanes;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kRows;
  float acc[kMaxQChunks] = {0.f, 0.f, 0.f, 0.f};

  for (int64_t k0 = 0; k0 < k; k0 += kTileK) {
    for (int i = tid; i < kRows * kTileK; i += blockDim.x) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t gm = m0 + r, gk = k0 + c;
      xs[r * (kTileK + 1) + c] = (gm < m && gk < k) ? to_f32(x[gm * k + gk]) : 0.f;
    }
    for (int i = tid; i < q * kTileK; i += blockDim.x) {
      const int r = i / kTileK, c = i % kTileK;
      const int64_t gk = k0 + c;
      ls[r * (kTileK + 1) + c] = gk < k ? l[static_cast<int64_t>(r) * k + gk] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int ch = 0; ch < kMaxQChunks; ++ch) {
      const int t = lane + ch * kQLanes;
      if (t < q) {
        const float* xr = xs + row * (kTileK + 1);
        const float* lr = ls + t * (kTileK + 1);
        float a = 0.f;
#pragma unroll 8
        for (int c = 0; c < kTileK; ++c) a += xr[c] * lr[c];
        acc[ch] += a;
      }
    }
    __syncthreads();
  }
#pragma unroll
  for (int ch = 0; ch < kMaxQChunks; ++ch) {
    const int t = lane + ch * kQLanes;
    if (t < q) us[row * q + t] = acc[ch];
  }
  __syncthreads();
  const int64_t gm = m0 + row;
  if (gm < m) {
    for (int j = lane; j < q; j += kQLanes) {
      float a = 0.f;
      for (int t = 0; t < q; ++t) a += s[j * q + t] * us[row * q + t];
      v[gm * q + j] = a;
    }
  }
}

// One thread per output column n, looping over kFillRows rows: rt[:, n] stays in registers
// (up to 64 values) and the rows' v values are broadcast from shared memory. Row blocks are on
// grid.x (2^31 - 1 blocks; grid.y's 65535 would stop at M = 524,280), column blocks on grid.y,
// which the kernel strides over so that any N fits too.
constexpr int kFillRows = 8;
constexpr int kFillThreads = 256;
constexpr unsigned kMaxGridY = 65535;
constexpr int64_t kMaxGridX = 0x7FFFFFFF;

template <typename T>
__global__ void lowrank_fill_kernel(T* __restrict__ y, const float* __restrict__ v,
                                    const float* __restrict__ rt, const float* __restrict__ b,
                                    int64_t m, int64_t n, int q) {
  __shared__ float vs[kFillRows * 64];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kFillRows;
  for (int i = threadIdx.x; i < kFillRows * q; i += blockDim.x) {
    const int64_t gm = m0 + i / q;
    vs[i] = gm < m ? v[gm * q + i % q] : 0.f;
  }
  __syncthreads();
  for (int64_t cb = blockIdx.y; cb * blockDim.x < n; cb += gridDim.y) {
    const int64_t col = cb * blockDim.x + threadIdx.x;
    if (col >= n) break;
    float r[64];
#pragma unroll
    for (int t = 0; t < 64; ++t) r[t] = t < q ? rt[static_cast<int64_t>(t) * n + col] : 0.f;
    const float bias = b != nullptr ? b[col] : 0.f;
    for (int i = 0; i < kFillRows; ++i) {
      const int64_t gm = m0 + i;
      if (gm >= m) break;
      float a = bias;
#pragma unroll
      for (int t = 0; t < 64; ++t) {
        if (t < q) a += vs[i * q + t] * r[t];
      }
      y[gm * n + col] = from_f32<T>(a);
    }
  }
}

template <typename T>
cudaError_t launch_project(const void* x, const float* l, const float* s, float* v, int64_t m,
                           int64_t k, int q, cudaStream_t stream) {
  if (m == 0) return cudaSuccess;  // a zero-block grid is a launch error
  if ((m + kRows - 1) / kRows > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>((m + kRows - 1) / kRows));
  const size_t shmem = sizeof(float) * ((kRows + q) * (kTileK + 1) + kRows * q);
  project_kernel<T><<<grid, kRows * kQLanes, shmem, stream>>>(static_cast<const T*>(x), l, s, v,
                                                              m, k, q);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_fill(void* y, const float* v, const float* rt, const float* b, int64_t m,
                        int64_t n, int q, cudaStream_t stream) {
  if (m == 0 || n == 0) return cudaSuccess;
  if ((m + kFillRows - 1) / kFillRows > kMaxGridX) return cudaErrorInvalidValue;
  const int64_t col_blocks = (n + kFillThreads - 1) / kFillThreads;
  const dim3 grid(static_cast<unsigned>((m + kFillRows - 1) / kFillRows),
                  static_cast<unsigned>(col_blocks < kMaxGridY ? col_blocks : kMaxGridY));
  lowrank_fill_kernel<T><<<grid, kFillThreads, 0, stream>>>(static_cast<T*>(y), v, rt, b, m, n, q);
  return cudaGetLastError();
}

}  // namespace

// dtype: 0 = float32, 1 = float16, 2 = bfloat16. x, y row-major contiguous; q <= 64.
extern "C" cudaError_t purify_fast_mslora_project(const void* x, int dtype, const float* l,
                                                  const float* s, float* v, int64_t m, int64_t k,
                                                  int q, cudaStream_t stream) {
  if (q < 1 || q > kQLanes * kMaxQChunks) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_project<float>(x, l, s, v, m, k, q, stream);
    case 1: return launch_project<__half>(x, l, s, v, m, k, q, stream);
    case 2: return launch_project<__nv_bfloat16>(x, l, s, v, m, k, q, stream);
    default: return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t purify_fast_mslora_lowrank_fill(void* y, int dtype, const float* v,
                                                       const float* rt, const float* b, int64_t m,
                                                       int64_t n, int q, cudaStream_t stream) {
  if (q < 1 || q > 64) return cudaErrorInvalidValue;
  switch (dtype) {
    case 0: return launch_fill<float>(y, v, rt, b, m, n, q, stream);
    case 1: return launch_fill<__half>(y, v, rt, b, m, n, q, stream);
    case 2: return launch_fill<__nv_bfloat16>(y, v, rt, b, m, n, q, stream);
    default: return cudaErrorInvalidValue;
  }
}
