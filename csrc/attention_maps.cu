// CUDA kernels of the MIMIC attention-map loss, behind extern "C" launchers taking raw pointers
// and a cudaStream_t (no torch headers, so `nvcc -c -arch=sm_90` checks this file on a machine
// without a CUDA torch). The binding (attention_maps_cuda_binding.cpp) wraps them.
//
// Math (purify_fast/reference/attention_maps.py), per row b of B, N positions:
//   s[b,n]  = m[b,n] * sum_c F[b,n,c]^2          (fp32, one warp per position)
//   a = s_S / max(|s_S|, eps),  t = s_T / max(|s_T|, eps),  loss[b] = sum_n (a - t)^2
//   dL/ds_S = (2(a-t) - a <a, 2(a-t)> [|s_S| > eps]) / max(|s_S|, eps)     (teacher: -2(a-t))
//   backward: dF[b,n,c] = scale * dL/ds[b,n] * 2 F[b,n,c]
// Shapes: fs [B,N,CS], ft [B,N,CT] contiguous (dtype code 0 fp32, 1 fp16, 2 bf16), mask [B,N]
// fp32; loss_rows [B], gs [B,N], gt [B,N] fp32 (gs/gt first hold the energies, then dL/ds).
#include "cuda_convert.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using purify_fast::from_f32;
using purify_fast::to_f32;

__device__ __forceinline__ float warp_sum(float v) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Sum over the block; every thread gets the result. `scratch` holds kWarps floats.
__device__ float block_sum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read by the previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  for (int w = 0; w < kWarps; ++w) total += scratch[w];
  return total;
}

// One warp per (row, position): coalesced reads along the channel axis, fp32 accumulation.
template <typename T>
__global__ void sq_sum_kernel(const T* __restrict__ f, const float* __restrict__ mask,
                              float* __restrict__ s, int64_t bn, int64_t c) {
  const int64_t pos = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (pos >= bn) return;
  const int lane = threadIdx.x & 31;
  const T* row = f + pos * c;
  float acc = 0.f;
  for (int64_t i = lane; i < c; i += 32) {
    const float v = to_f32(row[i]);
    acc += v * v;
  }
  acc = warp_sum(acc);
  if (lane == 0) s[pos] = acc * mask[pos];
}

// One block per row: the three passes of the module comment, in place on s and t.
__global__ void row_kernel(float* __restrict__ ss, float* __restrict__ st,
                           float* __restrict__ loss_rows, int64_t n, float eps) {
  __shared__ float scratch[kWarps];
  float* s = ss + static_cast<int64_t>(blockIdx.x) * n;
  float* t = st + static_cast<int64_t>(blockIdx.x) * n;
  float sq_s = 0.f, sq_t = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    sq_s += s[i] * s[i];
    sq_t += t[i] * t[i];
  }
  const float norm_s = sqrtf(block_sum(sq_s, scratch));
  const float norm_t = sqrtf(block_sum(sq_t, scratch));
  const float den_s = fmaxf(norm_s, eps), den_t = fmaxf(norm_t, eps);
  float loss = 0.f, dot_s = 0.f, dot_t = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float a = s[i] / den_s, b = t[i] / den_t, d = a - b;
    loss += d * d;
    dot_s += a * (2.f * d);
    dot_t += b * (-2.f * d);
  }
  loss = block_sum(loss, scratch);
  // Below eps the normaliser is the constant eps, so the projection term drops out.
  const float proj_s = norm_s > eps ? block_sum(dot_s, scratch) : 0.f;
  const float proj_t = norm_t > eps ? block_sum(dot_t, scratch) : 0.f;
  if (threadIdx.x == 0) loss_rows[blockIdx.x] = loss;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const float a = s[i] / den_s, b = t[i] / den_t, d = a - b;
    s[i] = (2.f * d - a * proj_s) / den_s;
    t[i] = (-2.f * d - b * proj_t) / den_t;
  }
}

template <typename T>
__global__ void grad_kernel(const T* __restrict__ f, const float* __restrict__ g,
                            T* __restrict__ out, int64_t total, int64_t c, float two_scale) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    out[i] = from_f32<T>(two_scale * g[i / c] * to_f32(f[i]));
  }
}

template <typename T>
void launch_sq_sum(const void* f, const float* mask, float* s, int64_t bn, int64_t c,
                   cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((bn + kWarps - 1) / kWarps);
  sq_sum_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(f), mask, s, bn, c);
}

bool sq_sum(const void* f, int dtype, const float* mask, float* s, int64_t bn, int64_t c,
            cudaStream_t stream) {
  switch (dtype) {
    case 0: launch_sq_sum<float>(f, mask, s, bn, c, stream); return true;
    case 1: launch_sq_sum<__half>(f, mask, s, bn, c, stream); return true;
    case 2: launch_sq_sum<__nv_bfloat16>(f, mask, s, bn, c, stream); return true;
    default: return false;
  }
}

template <typename T>
void launch_grad(const void* f, const float* g, void* out, int64_t total, int64_t c,
                 float two_scale, cudaStream_t stream) {
  int64_t blocks = (total + kThreads - 1) / kThreads;
  if (blocks > 65535LL * 16) blocks = 65535LL * 16;  // grid-stride loop covers the rest
  grad_kernel<T><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      static_cast<const T*>(f), g, static_cast<T*>(out), total, c, two_scale);
}

}  // namespace

extern "C" cudaError_t purify_fast_attention_map_forward(
    const void* fs, int fs_dtype, const void* ft, int ft_dtype, const float* mask, int64_t b,
    int64_t n, int64_t cs, int64_t ct, float eps, float* loss_rows, float* gs, float* gt,
    cudaStream_t stream) {
  if (b <= 0 || n <= 0) return cudaSuccess;
  if (!sq_sum(fs, fs_dtype, mask, gs, b * n, cs, stream)) return cudaErrorInvalidValue;
  if (!sq_sum(ft, ft_dtype, mask, gt, b * n, ct, stream)) return cudaErrorInvalidValue;
  row_kernel<<<static_cast<unsigned>(b), kThreads, 0, stream>>>(gs, gt, loss_rows, n, eps);
  return cudaGetLastError();
}

extern "C" cudaError_t purify_fast_attention_map_backward(const void* f, int dtype, const float* g,
                                                          int64_t b, int64_t n, int64_t c,
                                                          float scale, void* out,
                                                          cudaStream_t stream) {
  const int64_t total = b * n * c;
  if (total <= 0) return cudaSuccess;
  switch (dtype) {
    case 0: launch_grad<float>(f, g, out, total, c, 2.f * scale, stream); break;
    case 1: launch_grad<__half>(f, g, out, total, c, 2.f * scale, stream); break;
    case 2: launch_grad<__nv_bfloat16>(f, g, out, total, c, 2.f * scale, stream); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}
