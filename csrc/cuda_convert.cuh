// Per-element conversions between the storage dtypes the CUDA kernels take (fp32, fp16, bf16) and
// the fp32 they compute in: loads widen with to_f32, stores round to nearest even with
// from_f32<T>. Shared by attention_maps.cu and multiscale_lora.cu (weight_space.cu works on raw
// bit patterns instead, to match the reference's scores bit for bit).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace purify_fast {

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

}  // namespace purify_fast
