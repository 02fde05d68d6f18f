// C++/OpenMP CPU kernels of the weight-space ops (module purify_fast._C).
//
// Contract: purify_fast/ops/weight_space.py; math: purify_fast/reference/weight_space.py. Masks
// and histograms are bit-identical to the reference, scores are computed with the reference's fp32
// operation order (this file must be compiled with -ffp-contract=off: a fused d*d+x would change
// score bits and therefore histogram counts and which coordinates are reset).
//
// Layout of the file: dtype adapters (fp32 / fp16 / bf16 as raw bits, converted per element in
// registers), per-chunk kernel bodies written as plain loops the compiler vectorises, the same
// bodies instantiated for AVX-512, AVX2 and baseline x86-64 (chosen once at run time), an OpenMP
// driver that hands each thread large contiguous chunks, and the torch-facing wrappers.
#include "registry.h"
#include "weight_space.h"
#include "philox.h"

#include <ATen/Parallel.h>
#include <omp.h>

// PF_X86=0 (set by other CPUs, e.g. aarch64 GPU hosts, or by -DPF_X86=0 to check that build) keeps
// only the portable loops.
#ifndef PF_X86
#if defined(__x86_64__) || defined(__i386__)
#define PF_X86 1
#else
#define PF_X86 0
#endif
#endif
#if PF_X86
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

// ------------------------------------------------------------------------------------ dtypes

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline uint32_t bits_from_f32(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

struct F32 {
  using raw = uint32_t;
  static inline float to_float(raw v) { return f32_from_bits(v); }
};

struct BF16 {
  using raw = uint16_t;
  static inline float to_float(raw v) { return f32_from_bits(static_cast<uint32_t>(v) << 16); }
};

// IEEE half -> float without branches (so the loop still vectorises): normal numbers are rebased
// by moving the exponent field and rescaling by 2^-112; subnormals are rebuilt by placing the
// mantissa under a fixed exponent and subtracting the implicit bias. Exact for every input,
// including subnormals, infinities and NaNs.
struct F16 {
  using raw = uint16_t;
  static inline float to_float(raw v) {
    const uint32_t w = static_cast<uint32_t>(v) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;  // drops the sign bit
    const float normal = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float subnormal = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t mag = two_w < (1u << 27) ? bits_from_f32(subnormal) : bits_from_f32(normal);
    return f32_from_bits(sign | mag);
  }
};

enum class Dtype { F32, F16, BF16 };

Dtype dtype_of(const torch::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return Dtype::F32;
    case at::kHalf: return Dtype::F16;
    case at::kBFloat16: return Dtype::BF16;
    default:
      TORCH_CHECK(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return Dtype::F32;
}

// ------------------------------------------------------------------------------------ scores

// The reference's fp32 expressions, operation for operation (see reference.scores).
template <int IND>
inline float score(float pre, float ft, float h, float eps) {
  const float d = ft - pre;
  if constexpr (IND == 0) {
    return (d * d) / (h + eps);
  } else if constexpr (IND == 1) {
    return std::fabs(d);
  } else if constexpr (IND == 2) {
    return 1.0f / (h + eps);
  } else {
    return (d * d) * h;
  }
}

// ------------------------------------------------------------------------------------ bodies
// Each body handles elements [b, e) of flat buffers. They are always inlined into the ISA-specific
// instantiations below, so one source yields AVX-512, AVX2 and baseline machine code.
#define PF_BODY static inline __attribute__((always_inline))
#define PF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi2")))
#define PF_AVX2 __attribute__((target("avx2,fma,f16c,bmi2")))

// out[i] = keep_i ? ft[i] : pre[i] with keep_i = philox(i) < T, T in (0, 2^32) (the two trivial
// thresholds are handled by the caller as plain copies). Portable version (baseline ISA, tails).
template <class R>
PF_BODY void mix_body(const R* __restrict pre, const R* __restrict ft, R* __restrict out,
                      int64_t b, int64_t e, uint32_t k0, uint32_t k1, uint32_t thr) {
  for (int64_t i = b; i < e; ++i) {
    const uint32_t u = purify_fast::philox::first_word(static_cast<uint64_t>(i), k0, k1);
    out[i] = u < thr ? ft[i] : pre[i];
  }
}

#if PF_X86
// Philox on 16 (AVX-512) or 8 (AVX2) counters at once. Compilers turn the portable 32x32->64
// products into 64x64 multiplies (vpmullq), which made the mask 3x slower than the memory traffic;
// the even/odd-lane widening multiply (vpmuludq) gives both 32-bit halves of every product for two
// multiplies and four shuffles per vector.
PF_AVX512 static inline void mulhilo16(__m512i a, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(a, m);
  const __m512i odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// First Philox word for counters (lo + 0..15, hi, 0, 0); lo + 15 must not wrap.
PF_AVX512 static inline __m512i philox16(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  using namespace purify_fast::philox;
  const __m512i m0 = _mm512_set1_epi32(static_cast<int>(kM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int>(kM1));
  __m512i c0 = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(lo)),
                                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
  __m512i c1 = _mm512_set1_epi32(static_cast<int>(hi));
  __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
  for (int r = 0; r < 9; ++r) {
    __m512i hi0, lo0, hi1, lo1;
    mulhilo16(c0, m0, hi0, lo0);
    mulhilo16(c2, m1, hi1, lo1);
    const __m512i kk0 = _mm512_set1_epi32(static_cast<int>(k0));
    const __m512i kk1 = _mm512_set1_epi32(static_cast<int>(k1));
    c0 = _mm512_xor_si512(_mm512_xor_si512(hi1, c1), kk0);
    c1 = lo1;
    c2 = _mm512_xor_si512(_mm512_xor_si512(hi0, c3), kk1);
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  __m512i hi1, lo1;
  mulhilo16(c2, m1, hi1, lo1);
  return _mm512_xor_si512(_mm512_xor_si512(hi1, c1), _mm512_set1_epi32(static_cast<int>(k0)));
}

template <class R>
PF_AVX512 static void mix_avx512(const R* pre, const R* ft, R* out, int64_t b, int64_t e,
                                 uint32_t k0, uint32_t k1, uint32_t thr) {
  const __m512i t = _mm512_set1_epi32(static_cast<int>(thr));
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
    if (lo > 0xFFFFFFF0u) {  // the 16 counters would carry into the high word
      mix_body(pre, ft, out, i, i + 16, k0, k1, thr);
      continue;
    }
    const __mmask16 keep = _mm512_cmplt_epu32_mask(philox16(lo, hi, k0, k1), t);
    if constexpr (sizeof(R) == 4) {
      const __m512i p = _mm512_loadu_si512(pre + i), f = _mm512_loadu_si512(ft + i);
      _mm512_storeu_si512(out + i, _mm512_mask_blend_epi32(keep, p, f));
    } else {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pre + i));
      const __m256i f = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ft + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_mask_blend_epi16(keep, p, f));
    }
  }
  mix_body(pre, ft, out, i, e, k0, k1, thr);
}

PF_AVX2 static inline void mulhilo8(__m256i a, __m256i m, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

PF_AVX2 static inline __m256i philox8(uint32_t lo, uint32_t hi, uint32_t k0, uint32_t k1) {
  using namespace purify_fast::philox;
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kM1));
  __m256i c0 = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(lo)),
                                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  __m256i c1 = _mm256_set1_epi32(static_cast<int>(hi));
  __m256i c2 = _mm256_setzero_si256(), c3 = _mm256_setzero_si256();
  for (int r = 0; r < 9; ++r) {
    __m256i hi0, lo0, hi1, lo1;
    mulhilo8(c0, m0, hi0, lo0);
    mulhilo8(c2, m1, hi1, lo1);
    c0 = _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
    c1 = lo1;
    c2 = _mm256_xor_si256(_mm256_xor_si256(hi0, c3), _mm256_set1_epi32(static_cast<int>(k1)));
    c3 = lo0;
    k0 += kW0;
    k1 += kW1;
  }
  __m256i hi1, lo1;
  mulhilo8(c2, m1, hi1, lo1);
  return _mm256_xor_si256(_mm256_xor_si256(hi1, c1), _mm256_set1_epi32(static_cast<int>(k0)));
}

template <class R>
PF_AVX2 static void mix_avx2(const R* pre, const R* ft, R* out, int64_t b, int64_t e,
                             uint32_t k0, uint32_t k1, uint32_t thr) {
  // AVX2 has no unsigned compare: flip the sign bits and compare signed.
  const __m256i flip = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  const __m256i t = _mm256_xor_si256(_mm256_set1_epi32(static_cast<int>(thr)), flip);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const uint32_t lo = static_cast<uint32_t>(i), hi = static_cast<uint32_t>(static_cast<uint64_t>(i) >> 32);
    if (lo > 0xFFFFFFF8u) {
      mix_body(pre, ft, out, i, i + 8, k0, k1, thr);
      continue;
    }
    const __m256i u = _mm256_xor_si256(philox8(lo, hi, k0, k1), flip);
    const __m256i keep = _mm256_cmpgt_epi32(t, u);  // all-ones lanes where u < thr
    if constexpr (sizeof(R) == 4) {
      const __m256i p = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pre + i));
      const __m256i f = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ft + i));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), _mm256_blendv_epi8(p, f, keep));
    } else {
      const __m128i keep16 = _mm_packs_epi32(_mm256_castsi256_si128(keep),
                                             _mm256_extracti128_si256(keep, 1));
      const __m128i p = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pre + i));
      const __m128i f = _mm_loadu_si128(reinterpret_cast<const __m128i*>(ft + i));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm_blendv_epi8(p, f, keep16));
    }
  }
  mix_body(pre, ft, out, i, e, k0, k1, thr);
}

#endif  // PF_X86

template <class R>
static void mix_base(const R* pre, const R* ft, R* out, int64_t b, int64_t e, uint32_t k0,
                     uint32_t k1, uint32_t thr) {
  mix_body(pre, ft, out, b, e, k0, k1, thr);
}

// acc[i] = acc[i] + (g*g)*scale, the reference's order (no fused multiply-add).
template <class D>
PF_BODY void fisher_body(float* __restrict acc, const typename D::raw* __restrict g, int64_t b,
                         int64_t e, float scale) {
  for (int64_t i = b; i < e; ++i) {
    const float x = D::to_float(g[i]);
    const float sq = x * x;
    acc[i] = acc[i] + sq * scale;
  }
}

constexpr int64_t kTile = 2048;  // scores of one tile live in a stack buffer (8 KiB)

// Scores of a tile into `bits` (vectorised), then the bin increments (scalar scatter).
template <class D, int IND>
PF_BODY void hist_body(const typename D::raw* __restrict pre, const typename D::raw* __restrict ft,
                       const float* __restrict h, int64_t b, int64_t e, float eps,
                       int64_t* __restrict bins, int prefix) {
  alignas(64) uint32_t bits[kTile];
  for (int64_t t0 = b; t0 < e; t0 += kTile) {
    const int64_t n = std::min<int64_t>(kTile, e - t0);
    const typename D::raw* p = pre + t0;
    const typename D::raw* f = ft + t0;
    if (h != nullptr) {
      const float* hh = h + t0;
      for (int64_t j = 0; j < n; ++j)
        bits[j] = bits_from_f32(score<IND>(D::to_float(p[j]), D::to_float(f[j]), hh[j], eps)) &
                  0x7FFFFFFFu;
    } else {
      for (int64_t j = 0; j < n; ++j)
        bits[j] = bits_from_f32(score<IND>(D::to_float(p[j]), D::to_float(f[j]), 0.0f, eps)) &
                  0x7FFFFFFFu;
    }
    if (prefix < 0) {
      for (int64_t j = 0; j < n; ++j) ++bins[bits[j] >> 16];
    } else {
      const uint32_t want = static_cast<uint32_t>(prefix);
      for (int64_t j = 0; j < n; ++j)
        if ((bits[j] >> 16) == want) ++bins[bits[j] & 0xFFFFu];
    }
  }
}

// out[i] = (score_i >= thr) == take_ft ? ft[i] : pre[i], selecting raw bits (exact copies).
template <class D, int IND>
PF_BODY void select_body(const typename D::raw* __restrict pre, const typename D::raw* __restrict ft,
                         const float* __restrict h, int64_t b, int64_t e, float eps, float thr,
                         bool take_ft, typename D::raw* __restrict out) {
  // Branch on take_ft outside the loop so the inner loop is a single compare + blend.
  if (take_ft) {
    for (int64_t i = b; i < e; ++i) {
      const float s = score<IND>(D::to_float(pre[i]), D::to_float(ft[i]), h ? h[i] : 0.0f, eps);
      out[i] = s >= thr ? ft[i] : pre[i];
    }
  } else {
    for (int64_t i = b; i < e; ++i) {
      const float s = score<IND>(D::to_float(pre[i]), D::to_float(ft[i]), h ? h[i] : 0.0f, eps);
      out[i] = s >= thr ? pre[i] : ft[i];
    }
  }
}

// E-PUR: out[r] = sqrt(sum_j (ft[r,j]-pre[r,j])^2) / log(max(freq[r], c)) for rows [b, e).
// 32 independent fp32 partial sums per row (a float reduction does not vectorise otherwise, and
// the split also keeps the rounding error of long rows small), folded pairwise. Each block of 32 is
// first widened into float buffers: written as one fused loop, the half-precision variants were
// left scalar by the vectoriser (bf16 ran at a quarter of the fp32 bandwidth).
template <class D>
PF_BODY void embed_body(const typename D::raw* __restrict pre, const typename D::raw* __restrict ft,
                        const float* __restrict freqs, int64_t dim, float c, int64_t b, int64_t e,
                        float* __restrict out) {
  constexpr int L = 32;
  for (int64_t r = b; r < e; ++r) {
    const typename D::raw* p = pre + r * dim;
    const typename D::raw* f = ft + r * dim;
    float acc[L] = {};
    int64_t j = 0;
    for (; j + L <= dim; j += L) {
      float pv[L], fv[L];
      for (int k = 0; k < L; ++k) pv[k] = D::to_float(p[j + k]);
      for (int k = 0; k < L; ++k) fv[k] = D::to_float(f[j + k]);
      for (int k = 0; k < L; ++k) {
        const float d = fv[k] - pv[k];
        acc[k] += d * d;
      }
    }
    for (int k = 0; j < dim; ++j, ++k) {
      const float d = D::to_float(f[j]) - D::to_float(p[j]);
      acc[k] += d * d;
    }
    for (int w = L / 2; w > 0; w /= 2)
      for (int k = 0; k < w; ++k) acc[k] += acc[k + w];
    const float fr = freqs[r];
    // max(fr, c) as torch.clamp(min=c): a NaN frequency stays NaN (ops rejects those anyway).
    const float denom = std::log(fr < c ? c : fr);
    out[r] = std::sqrt(acc[0]) / denom;
  }
}

// 0 when every element of [b, e) is finite. Integer OR-reduction on the exponent field: vectorises
// and needs no float compares.
template <class R, uint64_t EXP_MASK>
PF_BODY uint32_t nonfinite_body(const R* __restrict x, int64_t b, int64_t e) {
  uint32_t bad = 0;
  for (int64_t i = b; i < e; ++i)
    bad |= static_cast<uint32_t>((static_cast<uint64_t>(x[i]) & EXP_MASK) == EXP_MASK);
  return bad;
}

// ------------------------------------------------------------------------------------ ISA variants

enum class Isa { Base = 0, Avx2 = 1, Avx512 = 2 };


// Instantiate NAME##_base / _avx2 / _avx512, each running the same (inlined) body statement, so
// PF_DISPATCH can pick one by the ISA level detected once.
#if PF_X86
#define PF_VARIANTS(TPL, NAME, PARAMS, ...)                                   \
  TPL static void NAME##_base PARAMS { __VA_ARGS__; }                         \
  TPL PF_AVX2 static void NAME##_avx2 PARAMS { __VA_ARGS__; }                 \
  TPL PF_AVX512 static void NAME##_avx512 PARAMS { __VA_ARGS__; }
#else
#define PF_VARIANTS(TPL, NAME, PARAMS, ...) TPL static void NAME##_base PARAMS { __VA_ARGS__; }
#endif

Isa detect_isa() {
#if !PF_X86
  return Isa::Base;
#else
  __builtin_cpu_init();
  Isa best = Isa::Base;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::Avx2;
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    best = Isa::Avx512;
  // PURIFY_FAST_CPU_ISA=base|avx2|avx512 caps the level (to test the fallbacks on a big machine).
  if (const char* env = std::getenv("PURIFY_FAST_CPU_ISA")) {
    const std::string s(env);
    Isa cap = s == "base" ? Isa::Base : s == "avx2" ? Isa::Avx2 : Isa::Avx512;
    if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
  }
  return best;
#endif
}

Isa& current_isa() {
  static Isa isa = detect_isa();
  return isa;
}

#if PF_X86
#define PF_DISPATCH(NAME, TARGS, ...)                                        \
  do {                                                                        \
    switch (current_isa()) {                                                  \
      case Isa::Avx512: NAME##_avx512 TARGS(__VA_ARGS__); break;              \
      case Isa::Avx2: NAME##_avx2 TARGS(__VA_ARGS__); break;                  \
      default: NAME##_base TARGS(__VA_ARGS__); break;                         \
    }                                                                         \
  } while (0)
#else
#define PF_DISPATCH(NAME, TARGS, ...) NAME##_base TARGS(__VA_ARGS__)
#endif

#define COMMA ,
PF_VARIANTS(template <class D>, fisher,
            (float* acc, const typename D::raw* g, int64_t b, int64_t e, float scale),
            fisher_body<D>(acc, g, b, e, scale))
PF_VARIANTS(template <class D COMMA int IND>, hist,
            (const typename D::raw* pre, const typename D::raw* ft, const float* h, int64_t b,
             int64_t e, float eps, int64_t* bins, int prefix),
            hist_body<D, IND>(pre, ft, h, b, e, eps, bins, prefix))
PF_VARIANTS(template <class D COMMA int IND>, select,
            (const typename D::raw* pre, const typename D::raw* ft, const float* h, int64_t b,
             int64_t e, float eps, float thr, bool take_ft, typename D::raw* out),
            select_body<D, IND>(pre, ft, h, b, e, eps, thr, take_ft, out))
PF_VARIANTS(template <class D>, embed,
            (const typename D::raw* pre, const typename D::raw* ft, const float* freqs, int64_t dim,
             float c, int64_t b, int64_t e, float* out),
            embed_body<D>(pre, ft, freqs, dim, c, b, e, out))
PF_VARIANTS(template <class R COMMA uint64_t M>, nonfinite,
            (const R* x, int64_t b, int64_t e, uint32_t* bad),
            *bad = nonfinite_body<R, M>(x, b, e))

// ------------------------------------------------------------------------------------ OpenMP driver

constexpr int64_t kGrain = 1 << 16;  // elements per chunk: big enough to amortise scheduling

int num_threads_for(int64_t chunks) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks)));
}

// fn(begin, end, thread) over contiguous chunks of `grain`; small inputs stay on the calling
// thread. Chunks are handed out dynamically: on a shared machine a thread that loses its core would
// otherwise hold up the whole call with its fixed half of the work; at 64K elements per chunk the
// hand-out is cheap.
template <class Fn>
void parallel_chunks(int64_t n, int64_t grain, Fn&& fn) {
  const int64_t chunks = (n + grain - 1) / grain;
  const int nt = num_threads_for(chunks);
  if (nt <= 1) {
    if (n > 0) fn(int64_t{0}, n, 0);
    return;
  }
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < chunks; ++c) fn(c * grain, std::min(n, (c + 1) * grain), omp_get_thread_num());
}

// ------------------------------------------------------------------------------------ checks

void check_flat(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor (the cpp backend), got ", t.device());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

void check_same(const torch::Tensor& a, const char* an, const torch::Tensor& b, const char* bn) {
  check_flat(b, bn);
  TORCH_CHECK(a.numel() == b.numel(), bn, " has ", b.numel(), " elements but ", an, " has ", a.numel());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), bn, " dtype ", b.scalar_type(), " differs from ", an,
              " dtype ", a.scalar_type());
}

const float* hessian_ptr(const c10::optional<torch::Tensor>& hessian, const torch::Tensor& pre,
                         int64_t indicator) {
  TORCH_CHECK(indicator >= 0 && indicator <= 3, "indicator must be 0..3 (drift_over_hessian, drift, "
              "inv_hessian, product), got ", indicator);
  if (!hessian.has_value()) {
    TORCH_CHECK(indicator == 1, "indicator ", indicator, " needs a hessian tensor (got None)");
    return nullptr;
  }
  const torch::Tensor& h = *hessian;
  check_flat(h, "hessian");
  TORCH_CHECK(h.scalar_type() == at::kFloat, "hessian must be float32, got ", h.scalar_type());
  TORCH_CHECK(h.numel() == pre.numel(), "hessian has ", h.numel(), " elements but pre has ", pre.numel());
  return indicator == 1 ? nullptr : h.data_ptr<float>();
}

template <class R>
const R* raw(const torch::Tensor& t) {
  return reinterpret_cast<const R*>(t.data_ptr());
}
template <class R>
R* raw_mut(const torch::Tensor& t) {
  return reinterpret_cast<R*>(t.data_ptr());
}

// Calls fn(D{}, std::integral_constant<int, IND>{}) for the runtime dtype and indicator.
template <class Fn>
void with_dtype_indicator(Dtype dt, int64_t ind, Fn&& fn) {
  auto by_ind = [&](auto d) {
    switch (ind) {
      case 0: fn(d, std::integral_constant<int, 0>{}); break;
      case 1: fn(d, std::integral_constant<int, 1>{}); break;
      case 2: fn(d, std::integral_constant<int, 2>{}); break;
      default: fn(d, std::integral_constant<int, 3>{}); break;
    }
  };
  switch (dt) {
    case Dtype::F32: by_ind(F32{}); break;
    case Dtype::F16: by_ind(F16{}); break;
    default: by_ind(BF16{}); break;
  }
}

template <class Fn>
void with_dtype(Dtype dt, Fn&& fn) {
  switch (dt) {
    case Dtype::F32: fn(F32{}); break;
    case Dtype::F16: fn(F16{}); break;
    default: fn(BF16{}); break;
  }
}

// ------------------------------------------------------------------------------------ ops

void mix_random(const torch::Tensor& pre, const torch::Tensor& ft, const torch::Tensor& out,
                int64_t seed_word, int64_t key_word, int64_t keep_threshold) {
  check_flat(pre, "pre");
  const Dtype dt = dtype_of(pre, "pre");
  check_same(pre, "pre", ft, "ft");
  check_same(pre, "pre", out, "out");
  TORCH_CHECK(keep_threshold >= 0 && keep_threshold <= (int64_t{1} << 32),
              "keep_threshold must be in [0, 2**32], got ", keep_threshold);
  TORCH_CHECK(key_word >= 0 && key_word <= 0xFFFFFFFFll, "key_word must be a uint32, got ", key_word);
  const int64_t n = pre.numel();
  // The trivial thresholds are copies (and 2^32 does not fit the uint32 compare below).
  if (keep_threshold == 0 || keep_threshold == (int64_t{1} << 32)) {
    const char* src = static_cast<const char*>((keep_threshold == 0 ? pre : ft).data_ptr());
    char* dst = static_cast<char*>(out.data_ptr());
    const int64_t es = pre.element_size();
    if (src != dst)
      parallel_chunks(n, kGrain * 4, [&](int64_t b, int64_t e, int) {
        std::memcpy(dst + b * es, src + b * es, static_cast<size_t>((e - b) * es));
      });
    return;
  }
  const uint32_t k0 = static_cast<uint32_t>(seed_word & 0xFFFFFFFFll);
  const uint32_t k1 = static_cast<uint32_t>(key_word);
  const uint32_t thr = static_cast<uint32_t>(keep_threshold);
  auto run = [&](auto tag) {
    using R = decltype(tag);
    const R* p = raw<R>(pre);
    const R* f = raw<R>(ft);
    R* o = raw_mut<R>(out);
    parallel_chunks(n, kGrain, [&](int64_t b, int64_t e, int) {
      PF_DISPATCH(mix, <R>, p, f, o, b, e, k0, k1, thr);
    });
  };
  if (dt == Dtype::F32) run(uint32_t{});
  else run(uint16_t{});
}

void fisher_accumulate_(const torch::Tensor& acc, const torch::Tensor& grad, double scale) {
  check_flat(acc, "acc");
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "acc must be float32, got ", acc.scalar_type());
  check_flat(grad, "grad");
  const Dtype dt = dtype_of(grad, "grad");
  TORCH_CHECK(grad.numel() == acc.numel(), "grad has ", grad.numel(), " elements but acc has ", acc.numel());
  const float s = static_cast<float>(scale);
  float* a = acc.data_ptr<float>();
  with_dtype(dt, [&](auto d) {
    using D = decltype(d);
    const auto* g = raw<typename D::raw>(grad);
    parallel_chunks(acc.numel(), kGrain, [&](int64_t b, int64_t e, int) {
      PF_DISPATCH(fisher, <D>, a, g, b, e, s);
    });
  });
}

void score_histogram(const torch::Tensor& pre, const torch::Tensor& ft,
                     const c10::optional<torch::Tensor>& hessian, int64_t indicator, double eps,
                     const torch::Tensor& hist, int64_t prefix) {
  check_flat(pre, "pre");
  const Dtype dt = dtype_of(pre, "pre");
  check_same(pre, "pre", ft, "ft");
  const float* h = hessian_ptr(hessian, pre, indicator);
  check_flat(hist, "hist");
  TORCH_CHECK(hist.scalar_type() == at::kLong && hist.numel() == 65536,
              "hist must be int64 with 65536 bins, got ", hist.scalar_type(), " with ", hist.numel());
  TORCH_CHECK(prefix < 32768, "prefix must be < 32768 (scores are >= 0, the sign bit is clear) or "
              "negative for level 1, got ", prefix);
  const int64_t n = pre.numel();
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  const int nt = num_threads_for(chunks);
  // One private 65536-bin table per thread (no atomics in the hot loop), summed at the end. A
  // single thread counts straight into `hist`: models have many small tensors (biases, norms) and
  // zeroing plus merging a 512 KiB table would cost more than counting them.
  int64_t* out = hist.data_ptr<int64_t>();
  std::vector<int64_t> local(nt > 1 ? static_cast<size_t>(nt) << 16 : 0, 0);
  const float e32 = static_cast<float>(eps);
  const int pf = static_cast<int>(prefix < 0 ? -1 : prefix);
  with_dtype_indicator(dt, indicator, [&](auto d, auto ind) {
    using D = decltype(d);
    constexpr int IND = decltype(ind)::value;
    const auto* p = raw<typename D::raw>(pre);
    const auto* f = raw<typename D::raw>(ft);
    parallel_chunks(n, kGrain, [&](int64_t b, int64_t e, int tid) {
      int64_t* bins = nt > 1 ? local.data() + (static_cast<size_t>(tid) << 16) : out;
      PF_DISPATCH(hist, <D COMMA IND>, p, f, h, b, e, e32, bins, pf);
    });
  });
  for (int t = 0; nt > 1 && t < nt; ++t) {
    const int64_t* src = local.data() + (static_cast<size_t>(t) << 16);
    for (int64_t i = 0; i < 65536; ++i) out[i] += src[i];
  }
}

void select_by_score(const torch::Tensor& pre, const torch::Tensor& ft,
                     const c10::optional<torch::Tensor>& hessian, int64_t indicator, double eps,
                     double threshold, bool selected_takes_finetuned, const torch::Tensor& out) {
  check_flat(pre, "pre");
  const Dtype dt = dtype_of(pre, "pre");
  check_same(pre, "pre", ft, "ft");
  check_same(pre, "pre", out, "out");
  const float* h = hessian_ptr(hessian, pre, indicator);
  const float e32 = static_cast<float>(eps);
  // The reference compares against torch.tensor(threshold, dtype=float32): round the same way.
  const float thr = static_cast<float>(threshold);
  with_dtype_indicator(dt, indicator, [&](auto d, auto ind) {
    using D = decltype(d);
    constexpr int IND = decltype(ind)::value;
    const auto* p = raw<typename D::raw>(pre);
    const auto* f = raw<typename D::raw>(ft);
    auto* o = raw_mut<typename D::raw>(out);
    parallel_chunks(pre.numel(), kGrain, [&](int64_t b, int64_t e, int) {
      PF_DISPATCH(select, <D COMMA IND>, p, f, h, b, e, e32, thr, selected_takes_finetuned, o);
    });
  });
}

void embedding_drift_scores(const torch::Tensor& pre, const torch::Tensor& ft,
                            const torch::Tensor& freqs, double c, const torch::Tensor& out) {
  check_flat(pre, "pre");
  const Dtype dt = dtype_of(pre, "pre");
  TORCH_CHECK(pre.dim() == 2, "pre must be 2-D [vocab, dim], got ", pre.dim(), "-D");
  check_same(pre, "pre", ft, "ft");
  TORCH_CHECK(ft.sizes() == pre.sizes(), "ft shape ", ft.sizes(), " differs from pre shape ", pre.sizes());
  const int64_t rows = pre.size(0), dim = pre.size(1);
  check_flat(freqs, "freqs");
  TORCH_CHECK(freqs.scalar_type() == at::kFloat && freqs.numel() == rows,
              "freqs must be float32 with one entry per row (", rows, "), got ", freqs.scalar_type(),
              " with ", freqs.numel());
  check_flat(out, "out");
  TORCH_CHECK(out.scalar_type() == at::kFloat && out.numel() == rows,
              "out must be float32 with one entry per row (", rows, "), got ", out.scalar_type(),
              " with ", out.numel());
  const float c32 = static_cast<float>(c);
  const float* fr = freqs.data_ptr<float>();
  float* o = out.data_ptr<float>();
  // Row chunks sized to ~64K elements so each thread still streams long contiguous spans.
  const int64_t grain = std::max<int64_t>(1, kGrain / std::max<int64_t>(dim, 1));
  with_dtype(dt, [&](auto d) {
    using D = decltype(d);
    const auto* p = raw<typename D::raw>(pre);
    const auto* f = raw<typename D::raw>(ft);
    parallel_chunks(rows, grain, [&](int64_t b, int64_t e, int) {
      PF_DISPATCH(embed, <D>, p, f, fr, dim, c32, b, e, o);
    });
  });
}

template <class R, uint64_t M>
bool all_finite_impl(const torch::Tensor& t) {
  const R* x = raw<R>(t);
  const int64_t n = t.numel();
  const int64_t chunks = (n + kGrain - 1) / kGrain;
  std::vector<uint32_t> bad(static_cast<size_t>(chunks), 0u);
  parallel_chunks(n, kGrain, [&](int64_t b, int64_t e, int) {
    uint32_t r = 0;
    PF_DISPATCH(nonfinite, <R COMMA M>, x, b, e, &r);
    bad[static_cast<size_t>(b / kGrain)] = r;
  });
  return std::none_of(bad.begin(), bad.end(), [](uint32_t v) { return v != 0; });
}

bool all_finite(const torch::Tensor& t) {
  check_flat(t, "t");
  switch (t.scalar_type()) {
    case at::kFloat: return all_finite_impl<uint32_t, 0x7F800000ull>(t);
    case at::kHalf: return all_finite_impl<uint16_t, 0x7C00ull>(t);
    case at::kBFloat16: return all_finite_impl<uint16_t, 0x7F80ull>(t);
    case at::kDouble: return all_finite_impl<uint64_t, 0x7FF0000000000000ull>(t);
    default:
      TORCH_CHECK(false, "t must be a floating-point tensor (float32/16, bfloat16, float64), got ",
                  t.scalar_type());
  }
  return false;
}

std::string cpu_isa() {
  switch (current_isa()) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "base";
  }
}

void register_ops(pybind11::module_& m) {
  purify_fast::def_weight_space_ops(
      m, {&mix_random, &fisher_accumulate_, &score_histogram, &select_by_score,
          &embedding_drift_scores, &all_finite});
  m.def("cpu_isa", &cpu_isa, "Instruction set the CPU kernels dispatch to (base, avx2, avx512)");
}

const purify_fast::RegisterOps kRegister(register_ops);

}  // namespace
