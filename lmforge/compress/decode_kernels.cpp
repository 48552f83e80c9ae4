// lmforge's CPU kernels for decoding steps: y = x W^T with float32, int8 and int4 weights for a
// few rows of activations, bound by the bytes of weights read; and attention of one new token per
// sequence over its cached keys and values (see `decode_attention` at the end).
//
// For int8 and int4 weights, each row of x is quantized to int8 in blocks of 32 values (one
// float scale a block, the way llama.cpp's Q8 activations are), so the dot products run on
// the CPU's integer
// multiply-add (AVX-512 VNNI: 64 byte pairs an instruction; AVX2: 32, in two instructions)
// and each weight is read once for all rows. Rows are quantized alone, so a row's result does
// not depend on the others. The instruction set is chosen when the file is compiled (for the
// CPU it runs on); below, the few operations that differ come first, then the kernels.
//
// Weights come in a kernel layout made once from lmforge's (`lmforge/compress/kernels.py`):
// chunks of 64 values, two blocks of 32, permuted so that the 32-bit lanes of an
// accumulator alternate between the two blocks (lane j holds bytes 4j..4j+3, of block j % 2);
// one broadcast pair of scales then scales all lanes. x is permuted the same way.
//   int8: w (N, K) int8; scale (N,) float: W = w * scale.
//   int4: w (N, K/2) uint8, the chunk's value at lane byte p in the low nibble of byte p and
//         the one at p + 32 in the high nibble; scales (N, K/32) bfloat16 and offsets (N, K/32)
//         float, one a block: W = q * scale + offset, q in 0..15. A block's offset times the
//         sum of x over the block is its share of the result: a few vector multiply-adds a
//         row, after the dot products.

#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int CHUNK = 64;  // values a step: two blocks of 32
constexpr int MAX_ROWS = 8;  // rows of x done together (accumulators kept in registers)

// Position in a chunk of the value that lane byte p holds: lanes alternate between the
// chunk's two blocks of 32.
inline int source_of(int p) {
  int lane = p / 4, block = lane % 2;
  return block * 32 + (lane / 2) * 4 + p % 4;
}

// Rows of activations, quantized: int8 values in kernel order (and, for AVX-512's int8
// kernel, whose VNNI instruction wants one unsigned operand, their magnitudes and signs); a
// scale per block, and the sum of each block (for int4's zero points). Kept in a buffer of
// the calling thread, reused from call to call: a decoding step makes hundreds of calls.
struct Activations {
  int8_t* q;
  uint8_t* magnitude;
  uint64_t* negative;
  float* scales;
  float* sums;
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

using Floats = __m512;  // an accumulator: lanes alternate between a chunk's two blocks
using Ints = __m512i;   // a chunk's dot products, the same lanes
using W8 = __m512i;     // a chunk of int8 weights
using W4 = __m512i;     // a chunk of int4 weights, as bytes 0..15
using X4 = __m512i;     // a chunk of activations, int8
struct X8 {             // a chunk of activations for the int8 kernel
  __m512i magnitude;
  __mmask64 negative;
};

constexpr int LANES = 16;
inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline float sum_lanes(Floats v) { return _mm512_reduce_add_ps(v); }
inline Floats multiply(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
inline Floats multiply_add(Floats a, Floats b, Floats acc) { return _mm512_fmadd_ps(a, b, acc); }
inline Floats add(Floats a, Floats b) { return _mm512_add_ps(a, b); }
inline Floats maximum(Floats a, Floats b) { return _mm512_max_ps(a, b); }
inline float max_lanes(Floats v) { return _mm512_reduce_max_ps(v); }
inline Floats broadcast(float a) { return _mm512_set1_ps(a); }
inline Floats to_floats(Ints v) { return _mm512_cvtepi32_ps(v); }
// `count` (1..LANES) floats, zeros in the lanes after them
inline Floats load_floats(const float* p, int64_t count) {
  return _mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << count) - 1), p);
}
// the same, with `fill`'s lanes after them
inline Floats load_floats(const float* p, int64_t count, Floats fill) {
  return _mm512_mask_loadu_ps(fill, static_cast<__mmask16>((1u << count) - 1), p);
}
inline void store_floats(float* p, Floats v, int64_t count) {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), v);
}
// e^x for x <= 0 (softmax's exponents): 2^n e^r, n = round(x / ln 2), |r| <= ln 2 / 2, e^r by
// its Taylor polynomial of degree 6 (relative error under 1e-7)
inline Floats exp_nonpositive(Floats x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// Two floats (a, b) as lanes a, b, a, b, ...
inline Floats pair(const float* ab) {
  return _mm512_castpd_ps(_mm512_set1_pd(*reinterpret_cast<const double*>(ab)));
}

// Two bfloat16 values (a, b) as float lanes a, b, a, b, ...: each lane's two bytes moved to
// the top of the lane (a float is a bfloat16 with 16 more bits of zeros)
inline Floats bf16_pair(const uint16_t* ab) {
  const __m512i to_top = _mm512_set1_epi64(0x03028080'01008080);
  return _mm512_castsi512_ps(_mm512_shuffle_epi8(
      _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(ab)), to_top));
}

inline W8 load_w8(const int8_t* p) { return _mm512_loadu_si512(p); }
inline X8 load_x8(const Activations& a, int64_t at, int64_t chunk) {
  return {_mm512_loadu_si512(a.magnitude + at), a.negative[chunk]};
}
// |x| * (w with the sign of x): VNNI multiplies unsigned bytes by signed ones
inline Ints dot8(const X8& x, W8 w) {
  __m512i signed_w = _mm512_mask_sub_epi8(w, x.negative, _mm512_setzero_si512(), w);
  return _mm512_dpbusd_epi32(_mm512_setzero_si512(), x.magnitude, signed_w);
}

// 32 bytes of nibbles: the low ones are the chunk's bytes 0..31, the high ones 32..63
inline W4 load_w4(const uint8_t* p) {
  const __m512i shifts = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
  __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(packed), packed, 1);
  return _mm512_and_si512(_mm512_srlv_epi16(both, shifts), _mm512_set1_epi8(0x0F));
}
inline X4 load_x4(const int8_t* p) { return _mm512_loadu_si512(p); }
inline Ints dot4(W4 q, X4 x) { return _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x); }

// 32 floats rounded on the grid of their largest magnitude: 32 int8 values, and the scale.
inline __m256i quantize_block(const float* x, float* scale, float* sum) {
  __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  *scale = largest / 127.f;
  __m512 inverse = _mm512_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
  // rounded to nearest, ties to even (the default rounding mode)
  __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
  __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
  *sum = static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi))) * *scale;
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtsepi32_epi8(qlo)),
                                 _mm512_cvtsepi32_epi8(qhi), 1);
}

// A chunk's two quantized blocks in kernel order: dword j from block j % 2's dword j / 2.
inline void store_chunk(__m256i first, __m256i second, const Activations& a, int64_t at,
                        int64_t chunk) {
  const __m512i interleave = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
  __m512i v = _mm512_permutexvar_epi32(
      interleave, _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1));
  _mm512_storeu_si512(a.q + at, v);
  _mm512_storeu_si512(a.magnitude + at, _mm512_abs_epi8(v));
  a.negative[chunk] = _mm512_movepi8_mask(v);
}

#elif defined(__AVX2__) && defined(__FMA__)

using Floats = __m256;  // lanes alternate between a chunk's two blocks, as with AVX-512
using Ints = __m256i;   // the dot products of a chunk's two halves, summed (same lanes)
struct W8 {
  __m256i lo, hi;
};
using W4 = W8;
using X4 = W8;
using X8 = W8;

constexpr int LANES = 8;
inline Floats zero_floats() { return _mm256_setzero_ps(); }
inline float sum_lanes(Floats v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)));
}
inline Floats multiply(Floats a, Floats b) { return _mm256_mul_ps(a, b); }
inline Floats multiply_add(Floats a, Floats b, Floats acc) { return _mm256_fmadd_ps(a, b, acc); }
inline Floats add(Floats a, Floats b) { return _mm256_add_ps(a, b); }
inline Floats maximum(Floats a, Floats b) { return _mm256_max_ps(a, b); }
inline float max_lanes(Floats v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
}
inline Floats broadcast(float a) { return _mm256_set1_ps(a); }
inline Floats to_floats(Ints v) { return _mm256_cvtepi32_ps(v); }
inline __m256i first_lanes(int64_t count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline Floats load_floats(const float* p, int64_t count) {
  return _mm256_maskload_ps(p, first_lanes(count));
}
inline Floats load_floats(const float* p, int64_t count, Floats fill) {
  __m256i lanes = first_lanes(count);
  return _mm256_blendv_ps(fill, _mm256_maskload_ps(p, lanes), _mm256_castsi256_ps(lanes));
}
inline void store_floats(float* p, Floats v, int64_t count) {
  _mm256_maskstore_ps(p, first_lanes(count), v);
}
inline Floats exp_nonpositive(Floats x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  // times 2^n: n added to the float's exponent
  __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
inline Floats pair(const float* ab) {
  return _mm256_castpd_ps(_mm256_set1_pd(*reinterpret_cast<const double*>(ab)));
}
inline Floats bf16_pair(const uint16_t* ab) {
  const __m256i to_top = _mm256_set1_epi64x(0x03028080'01008080);
  return _mm256_castsi256_ps(_mm256_shuffle_epi8(
      _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(ab)), to_top));
}

inline W8 load_pair(const void* p) {
  const __m256i* v = reinterpret_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
inline W8 load_w8(const int8_t* p) { return load_pair(p); }
inline X8 load_x8(const Activations& a, int64_t at, int64_t) { return load_pair(a.q + at); }
inline X4 load_x4(const int8_t* p) { return load_pair(p); }
// unsigned bytes times signed ones, pairs summed to int16 (at most 2 * 127 * 127: no
// saturation), then to int32 lanes
inline __m256i dot_bytes(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
// |x| * (w with the sign of x), as llama.cpp does
inline Ints dot8(const X8& x, const W8& w) {
  return _mm256_add_epi32(
      dot_bytes(_mm256_sign_epi8(x.lo, x.lo), _mm256_sign_epi8(w.lo, x.lo)),
      dot_bytes(_mm256_sign_epi8(x.hi, x.hi), _mm256_sign_epi8(w.hi, x.hi)));
}
inline W4 load_w4(const uint8_t* p) {
  __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i low = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(packed, low), _mm256_and_si256(_mm256_srli_epi16(packed, 4), low)};
}
inline Ints dot4(const W4& q, const X4& x) {
  return _mm256_add_epi32(dot_bytes(q.lo, x.lo), dot_bytes(q.hi, x.hi));
}

inline __m256i quantize_block(const float* x, float* scale, float* sum) {
  __m256 v[4];
  __m256 largest = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int i = 0; i < 4; ++i) {
    v[i] = _mm256_loadu_ps(x + 8 * i);
    largest = _mm256_max_ps(largest, _mm256_and_ps(v[i], magnitude));
  }
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  float top = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
  *scale = top / 127.f;
  __m256 inverse = _mm256_set1_ps(top > 0.f ? 127.f / top : 0.f);
  __m256i q[4];
  for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
  __m256i total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  *sum = static_cast<float>(_mm_cvtsi128_si32(t)) * *scale;
  // packing works within 128-bit lanes; the permutation puts the dwords back in order
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

inline void store_chunk(__m256i first, __m256i second, const Activations& a, int64_t at,
                        int64_t) {
  __m256i lo = _mm256_unpacklo_epi32(first, second), hi = _mm256_unpackhi_epi32(first, second);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q + at), _mm256_permute2x128_si256(lo, hi, 0x20));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q + at + 32),
                      _mm256_permute2x128_si256(lo, hi, 0x31));
}

#else
#error "lmforge's int kernels need AVX2 and FMA, or AVX-512 with VNNI"
#endif

void quantize_row(const float* x, int64_t K, const Activations& a, int64_t m) {
  const int64_t blocks = K / 32;
  for (int64_t c = 0; c < K / CHUNK; ++c) {
    int64_t b = m * blocks + 2 * c;
    __m256i first = quantize_block(x + c * CHUNK, a.scales + b, a.sums + b);
    __m256i second = quantize_block(x + c * CHUNK + 32, a.scales + b + 1, a.sums + b + 1);
    store_chunk(first, second, a, m * K + c * CHUNK, m * (K / CHUNK) + c);
  }
}

Activations quantize(const at::Tensor& x) {
  int64_t M = x.size(0), K = x.size(1);
  thread_local std::vector<uint8_t> buffer;
  size_t values = M * K, chunks = M * (K / CHUNK), blocks = M * (K / 32);
  buffer.resize(2 * values + 8 * chunks + 8 * blocks + 64);
  uint8_t* start = buffer.data();
  start += (64 - reinterpret_cast<uintptr_t>(start) % 64) % 64;
  Activations a{reinterpret_cast<int8_t*>(start), start + values,
                reinterpret_cast<uint64_t*>(start + 2 * values),
                reinterpret_cast<float*>(start + 2 * values + 8 * chunks),
                reinterpret_cast<float*>(start + 2 * values + 8 * chunks + 4 * blocks)};
  const float* xp = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, a, m);
  return a;
}

void check(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              what, ": x must be a contiguous float32 matrix");
  TORCH_CHECK(x.size(1) == K && K % CHUNK == 0, what, ": x has ", x.size(1),
              " columns; the weight has ", K, " (a multiple of 64)");
}

// Rows n0..n1 of y for M rows of x, R weight rows at a time (R independent accumulator
// chains hide the instructions' latency; x's loads are shared by the R rows).
template <int M, int R>
void int8_rows(const Activations& a, const int8_t* w, const float* scale, float* y,
               int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t chunks = K / CHUNK, blocks = K / 32;
  for (int64_t n = n0; n + R <= n1; n += R) {
    Floats acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = zero_floats();
    for (int64_t c = 0; c < chunks; ++c) {
      W8 wc[R];
      for (int r = 0; r < R; ++r) {
        wc[r] = load_w8(w + (n + r) * K + c * CHUNK);
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + c * CHUNK), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        X8 x = load_x8(a, (m0 + m) * K + c * CHUNK, (m0 + m) * chunks + c);
        Floats xscale = pair(a.scales + (m0 + m) * blocks + 2 * c);
        for (int r = 0; r < R; ++r)
          acc[m][r] = multiply_add(to_floats(dot8(x, wc[r])), xscale, acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[(m0 + m) * N + n + r] = sum_lanes(acc[m][r]) * scale[n + r];
  }
}

template <int M, int R>
void int4_rows(const Activations& a, const uint8_t* w, const uint16_t* scales, const float* offsets,
               float* y, int64_t K, int64_t N, int64_t m0, int64_t n0, int64_t n1) {
  const int64_t chunks = K / CHUNK, blocks = K / 32;
  for (int64_t n = n0; n + R <= n1; n += R) {
    Floats acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = zero_floats();
    for (int64_t c = 0; c < chunks; ++c) {
      W4 q[R];
      Floats ws[R];
      for (int r = 0; r < R; ++r) {
        q[r] = load_w4(w + (n + r) * (K / 2) + c * 32);
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * (K / 2) + c * 32), _MM_HINT_T0);
        ws[r] = bf16_pair(scales + (n + r) * blocks + 2 * c);
      }
      for (int m = 0; m < M; ++m) {
        X4 x = load_x4(a.q + (m0 + m) * K + c * CHUNK);
        Floats xscale = pair(a.scales + (m0 + m) * blocks + 2 * c);
        for (int r = 0; r < R; ++r)
          acc[m][r] = multiply_add(to_floats(dot4(q[r], x)), multiply(ws[r], xscale), acc[m][r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* offset = offsets + (n + r) * blocks;
      for (int m = 0; m < M; ++m) {
        const float* sum = a.sums + (m0 + m) * blocks;
        Floats total = acc[m][r];
        for (int64_t b = 0; b < blocks; b += LANES) {
          int64_t count = std::min<int64_t>(LANES, blocks - b);
          total = multiply_add(load_floats(offset + b, count), load_floats(sum + b, count), total);
        }
        y[(m0 + m) * N + n + r] = sum_lanes(total);
      }
    }
  }
}

template <typename Rows>
void over_rows(int64_t M, int64_t N, Rows rows) {
  // Each thread takes a range of output features, for all rows of x at once (8 at a time).
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t m0 = 0; m0 < M; m0 += MAX_ROWS) rows(m0, std::min<int64_t>(MAX_ROWS, M - m0), n0, n1);
  });
}

// R weight rows at a time: 4 for up to 2 rows of x, else 2 (registers run out); the rows
// left over at the end of a thread's range go one at a time.
#define WITH_R(KERNEL, M, R, n0, n1, ...) \
  KERNEL<M, R>(__VA_ARGS__, n0, n1);      \
  KERNEL<M, 1>(__VA_ARGS__, n1 - (n1 - n0) % R, n1);
#define DISPATCH_ROWS(KERNEL, count, n0, n1, ...)                  \
  switch (count) {                                                 \
    case 1: WITH_R(KERNEL, 1, 4, n0, n1, __VA_ARGS__) break;       \
    case 2: WITH_R(KERNEL, 2, 4, n0, n1, __VA_ARGS__) break;       \
    case 3: WITH_R(KERNEL, 3, 2, n0, n1, __VA_ARGS__) break;       \
    case 4: WITH_R(KERNEL, 4, 2, n0, n1, __VA_ARGS__) break;       \
    case 5: WITH_R(KERNEL, 5, 2, n0, n1, __VA_ARGS__) break;       \
    case 6: WITH_R(KERNEL, 6, 2, n0, n1, __VA_ARGS__) break;       \
    case 7: WITH_R(KERNEL, 7, 2, n0, n1, __VA_ARGS__) break;       \
    default: WITH_R(KERNEL, 8, 2, n0, n1, __VA_ARGS__) break;      \
  }

// float32 weights, read once for up to 8 rows of x: y = x w^T, w (N, K). The weights of the
// next R rows are prefetched as these are read: without it, 8 rows of x ran at about half
// the bandwidth one row gets.
template <int M, int R>
void float_rows(const float* x, const float* w, float* y, int64_t K, int64_t N, int64_t m0,
                int64_t n0, int64_t n1) {
  for (int64_t n = n0; n + R <= n1; n += R) {
    Floats acc[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) acc[m][r] = zero_floats();
    for (int64_t k = 0; k < K; k += LANES) {
      const int64_t count = std::min<int64_t>(LANES, K - k);
      Floats wk[R];
      for (int r = 0; r < R; ++r) {
        wk[r] = load_floats(w + (n + r) * K + k, count);
        _mm_prefetch(reinterpret_cast<const char*>(w + (n + R + r) * K + k), _MM_HINT_T0);
      }
      for (int m = 0; m < M; ++m) {
        Floats xk = load_floats(x + (m0 + m) * K + k, count);
        for (int r = 0; r < R; ++r) acc[m][r] = multiply_add(xk, wk[r], acc[m][r]);
      }
    }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) y[(m0 + m) * N + n + r] = sum_lanes(acc[m][r]);
  }
}

at::Tensor float_mm(const at::Tensor& x, const at::Tensor& w) {
  int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.scalar_type() == at::kFloat &&
                  w.scalar_type() == at::kFloat && x.is_contiguous() && w.is_contiguous() &&
                  x.size(1) == K, "float_mm: x (M, K) and w (N, K), contiguous float32");
  at::Tensor y = at::empty({M, N}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    DISPATCH_ROWS(float_rows, rows, n0, n1, xp, wp, yp, K, N, m0)
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  check(x, K, "int8_mm");
  Activations a = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scale.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    DISPATCH_ROWS(int8_rows, rows, n0, n1, a, wp, sp, yp, K, N, m0)
  });
  return y;
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const at::Tensor& offsets) {
  int64_t M = x.size(0), N = w.size(0), K = w.size(1) * 2;
  check(x, K, "int4_mm");
  Activations a = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && offsets.scalar_type() == at::kFloat,
              "int4_mm: scales must be bfloat16 and offsets float32");
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(scales.data_ptr());
  const float* zp = offsets.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  over_rows(M, N, [&](int64_t m0, int64_t rows, int64_t n0, int64_t n1) {
    DISPATCH_ROWS(int4_rows, rows, n0, n1, a, wp, sp, zp, yp, K, N, m0)
  });
  return y;
}

// Attention of one query per sequence (a decoding step) over its first `length` cached keys
// and values, or with a sliding `window` the last `window` of them: for each sequence and
// key/value head, the scores of its group of query heads, their softmax, and the weighted
// sum of the values, each key and value read once for the group. q (B, H, 1, D). k, v (NB, Hkv,
// BS, D), unit stride along D: blocks of BS positions, row b's j-th block being k[table[b, j]]
// (a paged cache); with an empty table, row b's positions are all of block b (a cache of one
// block a row). lengths (B,), or empty: `end` for every row.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& lengths, const at::Tensor& table, int64_t end,
                            double scale, int64_t window) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), Hkv = k.size(1), BS = k.size(2);
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == at::kFloat &&
                  v.scalar_type() == at::kFloat, "decode_attention: float32 tensors only");
  TORCH_CHECK(q.size(2) == 1 && H % Hkv == 0 && k.sizes() == v.sizes() && k.size(3) == D &&
                  q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "decode_attention: q (B, H, 1, D) and k, v (blocks, Hkv, BS, D), unit stride along D");
  TORCH_CHECK(lengths.numel() == 0 || (lengths.scalar_type() == at::kLong && lengths.numel() == B),
              "decode_attention: lengths must be B int64 values or empty");
  const bool paged = table.numel() > 0;
  TORCH_CHECK(paged ? table.scalar_type() == at::kLong && table.dim() == 2 && table.size(0) == B &&
                          table.stride(1) == 1
                    : k.size(0) == B,
              "decode_attention: table must be (B, blocks) int64, or empty with one block a row");
  const int64_t L = paged ? table.size(1) * BS : BS;  // positions a row can hold
  const int64_t* tp = paged ? table.data_ptr<int64_t>() : nullptr;
  const int64_t ts = paged ? table.stride(0) : 0, NB = k.size(0);
  const int64_t group = H / Hkv;
  // strides read once: the tensors' accessors are calls
  const int64_t qb = q.stride(0), qh = q.stride(1), kb = k.stride(0), kh = k.stride(1),
                kl = k.stride(2), vb = v.stride(0), vh = v.stride(1), vl = v.stride(2);
  at::Tensor out = at::empty({B, H, 1, D}, q.options());
  const float *qp = q.data_ptr<float>(), *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  const int64_t* lp = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    thread_local std::vector<float> buffer;
    thread_local std::vector<int64_t> offsets;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      const int64_t length = lp ? lp[b] : end;
      TORCH_CHECK(length >= 1 && length <= L, "decode_attention: length ", length, " outside 1..", L);
      const int64_t first = window > 0 ? std::max<int64_t>(0, length - window) : 0, n = length - first;
      // where position `first + j` of this row is in k and in v, found once for all heads' loops
      offsets.resize(2 * n);
      int64_t *key_at = offsets.data(), *value_at = offsets.data() + n;
      for (int64_t j = 0; j < n; ++j) {
        int64_t p = first + j, block = paged ? tp[b * ts + p / BS] : b, in_block = paged ? p % BS : p;
        TORCH_CHECK(block >= 0 && block < NB, "decode_attention: block ", block, " outside the cache");
        key_at[j] = block * kb + in_block * kl;
        value_at[j] = block * vb + in_block * vl;
      }
      const float* keys = kp + h * kh;
      const float* values = vp + h * vh;
      const float* queries = qp + b * qb + h * group * qh;
      buffer.resize(group * n);
      float* scores = buffer.data();
      for (int64_t j = 0; j < n; ++j) {
        const float* key = keys + key_at[j];
        for (int64_t g = 0; g < group; ++g) {
          const float* query = queries + g * qh;
          Floats dot = zero_floats();
          for (int64_t d = 0; d < D; d += LANES) {
            int64_t count = std::min<int64_t>(LANES, D - d);
            dot = multiply_add(load_floats(query + d, count), load_floats(key + d, count), dot);
          }
          scores[g * n + j] = sum_lanes(dot) * fscale;
        }
      }
      for (int64_t g = 0; g < group; ++g) {  // softmax, in place
        float* s = scores + g * n;
        Floats largest = broadcast(s[0]);
        for (int64_t j = 0; j < n; j += LANES)
          largest = maximum(largest, load_floats(s + j, std::min<int64_t>(LANES, n - j), largest));
        const float top = max_lanes(largest);
        Floats total = zero_floats();
        for (int64_t j = 0; j < n; j += LANES) {
          int64_t count = std::min<int64_t>(LANES, n - j);
          store_floats(s + j, exp_nonpositive(add(load_floats(s + j, count), broadcast(-top))), count);
          total = add(total, load_floats(s + j, count));
        }
        const float inverse = 1.f / sum_lanes(total);
        for (int64_t j = 0; j < n; ++j) s[j] *= inverse;
      }
      for (int64_t g = 0; g < group; ++g) {  // the weighted sum of the values, a vector at a time
        const float* p = scores + g * n;
        float* o = op + (b * H + h * group + g) * D;
        for (int64_t d = 0; d < D; d += LANES) {
          int64_t count = std::min<int64_t>(LANES, D - d);
          // two sums, of the even and the odd positions: two chains of multiply-adds at once
          const float* value = values + d;
          Floats even = zero_floats(), odd = zero_floats();
          int64_t j = 0;
          for (; j + 2 <= n; j += 2) {
            even = multiply_add(broadcast(p[j]), load_floats(value + value_at[j], count), even);
            odd = multiply_add(broadcast(p[j + 1]), load_floats(value + value_at[j + 1], count), odd);
          }
          if (j < n) even = multiply_add(broadcast(p[j]), load_floats(value + value_at[j], count), even);
          store_floats(o + d, add(even, odd), count);
        }
      }
    }
  });
  return out;
}

at::Tensor lane_order() {
  at::Tensor order = at::empty({CHUNK}, at::kLong);
  for (int p = 0; p < CHUNK; ++p) order[p] = source_of(p);
  return order;
}

}  // namespace

TORCH_LIBRARY(lmforge_kernels, m) {
  m.def("float_mm(Tensor x, Tensor w) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor offsets) -> Tensor");
  m.def("lane_order() -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, Tensor table, int end, "
        "float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge_kernels, CPU, m) {
  m.impl("float_mm", &float_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("decode_attention", &decode_attention);
}

TORCH_LIBRARY_IMPL(lmforge_kernels, CompositeExplicitAutograd, m) {
  m.impl("lane_order", &lane_order);
}
