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
// Weights come in kernel layouts made once from lmforge's (`lmforge/compress/kernels.py`):
// tiles of 16 outputs by one block of 32 values, in parts of 64 bytes that hold 4 values of
// each output (4 bytes a lane, output i in lane i), so that one integer multiply-add of a part
// by 4 values of x broadcast gives 16 outputs' partial sums: no sums across lanes, and each
// part is multiplied by every row of x once loaded. Outputs are padded to whole tiles.
//   int8: 8 parts a tile (512 bytes), part j holding values 4j..4j+3 as w + 128 (VNNI
//         multiplies unsigned bytes by signed ones); w (N, K) uint8 holds the tiles in the order
//         (outputs / 16, blocks); scale (N,) float: W = w * scale.
//   int4: 4 parts a tile (256 bytes), part j holding values 4j..4j+3 in its low nibbles and
//         4j+16..4j+19 in its high ones; w (N, K/2) uint8, the tiles in the same order; scales
//         and zeros (N, K/32) bfloat16, a tile's 16 values each, in the same order:
//         W = (q - 8) * scale + zero, q in 0..15.
// x stays in its order.

#include <immintrin.h>
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int BLOCK = 32;  // values of x that share a scale
constexpr int TILE = 16;   // outputs of a weight tile
constexpr int MAX_ROWS = 8;  // rows of x done together (accumulators kept in registers)

// Rows of activations, quantized: int8 values; a scale per block, and the sum of each block's
// values, as integers and scaled (for the int8 weights' offset of 128 and int4's zero points).
// Block-major: block b of row m at q + (b * rows + m) * BLOCK, its scale and sums at b * rows +
// m, so that a kernel reaches every row's values of a block at fixed offsets from one address
// (8 rows' addresses in registers of their own spilled, and ran 8 rows at half the speed).
// Kept in a buffer of the calling thread, reused from call to call: a decoding step makes
// hundreds of calls.
struct Activations {
  int8_t* q;
  float* scales;
  float* sums;
  int32_t* int_sums;
  int64_t rows;
};

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

using Floats = __m512;  // an accumulator, a lane per output
using Ints = __m512i;   // integer partial sums, a lane per output

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
// the first of the `count` floats at p equal to `value` (-1 if none is)
inline int first_equal(const float* p, int64_t count, float value) {
  const __mmask16 first = static_cast<__mmask16>((1u << count) - 1);
  unsigned lanes = _mm512_mask_cmp_ps_mask(first, _mm512_maskz_loadu_ps(first, p), broadcast(value),
                                           _CMP_EQ_OQ);
  return lanes ? __builtin_ctz(lanes) : -1;
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

inline Ints zero_ints() { return _mm512_setzero_si512(); }
inline Ints load_ints(const uint8_t* p) { return _mm512_loadu_si512(p); }
// A part of an int4 tile (LANES outputs): its low nibbles and its high ones, as bytes 0..15
inline void load_nibbles(const uint8_t* p, Ints* low, Ints* high) {
  const __m512i packed = load_ints(p), mask = _mm512_set1_epi8(0x0F);
  *low = _mm512_and_si512(packed, mask);
  *high = _mm512_and_si512(_mm512_srli_epi16(packed, 4), mask);
}
// acc + each lane's 4 unsigned bytes of w times the 4 signed bytes at x
inline Ints dot_quad(Ints acc, Ints w, const int8_t* x) {
  return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(x)));
}
// The int8 kernel's sums: of the bytes w + 128 times x, started at -128 times the sum of
// the block of x, which leaves the sum of w times x
inline Ints int8_start(int32_t int_sum) { return _mm512_set1_epi32(-128 * int_sum); }
inline Ints dot_quad_int8(Ints acc, Ints w, const int8_t* x) { return dot_quad(acc, w, x); }
// `count` (1..LANES) 16-bit values, zeros after them
inline __m256i load_halves(const void* p, int64_t count) {
  return _mm256_maskz_loadu_epi16(static_cast<__mmask16>((1u << count) - 1), p);
}
// bfloat16 values as floats (a float is a bfloat16 with 16 more bits of zeros)
inline Floats load_bf16(const uint16_t* p, int64_t count = LANES) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(load_halves(p, count)), 16));
}
inline Floats load_f16(const at::Half* p, int64_t count) {
  return _mm512_cvtph_ps(load_halves(p, count));
}
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
// 16 bytes as floats, (b - offset) * scale [+ zero], to dst: each operation rounded alone
inline void widen_bytes(__m128i b, float* dst, float offset, float scale) {
  __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(offset));
  _mm512_storeu_ps(dst, _mm512_mul_ps(f, _mm512_set1_ps(scale)));
}
inline void widen_bytes(__m128i b, float* dst, float offset, float scale, float zero) {
  __m512 f = _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b)), _mm512_set1_ps(offset));
  f = _mm512_mul_ps(f, _mm512_set1_ps(scale));
  _mm512_storeu_ps(dst, _mm512_add_ps(f, _mm512_set1_ps(zero)));
}
#pragma GCC pop_options

// 32 floats rounded on the grid of their largest magnitude: 32 int8 values, and the scale.
inline __m256i quantize_block(const float* x, float* scale, float* sum, int32_t* int_sum) {
  __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + 16);
  float largest = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  *scale = largest / 127.f;
  __m512 inverse = _mm512_set1_ps(largest > 0.f ? 127.f / largest : 0.f);
  // rounded to nearest, ties to even (the default rounding mode)
  __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inverse));
  __m512i qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inverse));
  *int_sum = _mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi));
  *sum = static_cast<float>(*int_sum) * *scale;
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm512_cvtsepi32_epi8(qlo)),
                                 _mm512_cvtsepi32_epi8(qhi), 1);
}

#elif defined(__AVX2__) && defined(__FMA__)

using Floats = __m256;
using Ints = __m256i;

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
inline int first_equal(const float* p, int64_t count, float value) {
  int lanes = _mm256_movemask_ps(_mm256_cmp_ps(load_floats(p, count), broadcast(value), _CMP_EQ_OQ));
  lanes &= (1 << count) - 1;
  return lanes ? __builtin_ctz(lanes) : -1;
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

// unsigned bytes times signed ones, pairs summed to int16, then to int32 lanes
inline __m256i dot_bytes(__m256i u, __m256i s) {
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
inline Ints zero_ints() { return _mm256_setzero_si256(); }
inline Ints load_ints(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline void load_nibbles(const uint8_t* p, Ints* low, Ints* high) {
  const __m256i packed = load_ints(p), mask = _mm256_set1_epi8(0x0F);
  *low = _mm256_and_si256(packed, mask);
  *high = _mm256_and_si256(_mm256_srli_epi16(packed, 4), mask);
}
// at most 2 * 15 * 127 in a pair's int16 sum: no saturation
inline Ints dot_quad(Ints acc, Ints w, const int8_t* x) {
  return _mm256_add_epi32(
      acc, dot_bytes(w, _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x))));
}
// (w + 128) * x would overflow the int16 pairs: w's bytes are made signed again, and |x|
// times w with the sign of x summed instead (at most 2 * 127 * 127: no saturation), as
// llama.cpp does
inline Ints int8_start(int32_t) { return zero_ints(); }
inline Ints dot_quad_int8(Ints acc, Ints w, const int8_t* x) {
  const __m256i xs = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(x));
  const __m256i signed_w = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));
  return _mm256_add_epi32(acc, dot_bytes(_mm256_sign_epi8(xs, xs), _mm256_sign_epi8(signed_w, xs)));
}
inline __m128i load_halves(const void* p, int64_t count) {
  if (count == LANES) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  alignas(16) uint16_t part[LANES] = {};
  std::memcpy(part, p, count * sizeof(uint16_t));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(part));
}
inline Floats load_bf16(const uint16_t* p, int64_t count = LANES) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load_halves(p, count)), 16));
}
inline Floats load_f16(const at::Half* p, int64_t count) {
  return _mm256_cvtph_ps(load_halves(p, count));
}
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
inline __m256 widened_less(__m128i b, float offset) {  // 8 bytes as floats, less `offset`
  return _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_set1_ps(offset));
}
inline void widen_bytes(__m128i b, float* dst, float offset, float scale) {
  for (int half = 0; half < 2; ++half, b = _mm_srli_si128(b, 8))
    _mm256_storeu_ps(dst + 8 * half, _mm256_mul_ps(widened_less(b, offset), _mm256_set1_ps(scale)));
}
inline void widen_bytes(__m128i b, float* dst, float offset, float scale, float zero) {
  for (int half = 0; half < 2; ++half, b = _mm_srli_si128(b, 8)) {
    __m256 f = _mm256_mul_ps(widened_less(b, offset), _mm256_set1_ps(scale));
    _mm256_storeu_ps(dst + 8 * half, _mm256_add_ps(f, _mm256_set1_ps(zero)));
  }
}
#pragma GCC pop_options

inline __m256i quantize_block(const float* x, float* scale, float* sum, int32_t* int_sum) {
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
  *int_sum = _mm_cvtsi128_si32(t);
  *sum = static_cast<float>(*int_sum) * *scale;
  // packing works within 128-bit lanes; the permutation puts the dwords back in order
  __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
  return _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

#else
#error "lmforge's int kernels need AVX2 and FMA, or AVX-512 with VNNI"
#endif

inline float bf16_value(uint16_t bits) {  // a bfloat16's bits as the float it is
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, 4);
  return value;
}

// Asks for the cache lines of `count` values from p on (HINT: _MM_HINT_T0 into L1, T1 into L2).
template <int HINT, typename T>
inline void prefetch(const T* p, int64_t count) {
  constexpr int64_t PER_LINE = 64 / sizeof(T);
  for (int64_t i = 0; i < count; i += PER_LINE)
    _mm_prefetch(reinterpret_cast<const char*>(p + i), static_cast<_mm_hint>(HINT));
}

// `count` (1..LANES) values of a KV cache, float32, bfloat16 or float16, as floats
inline Floats load_cached(const float* p, int64_t count) { return load_floats(p, count); }
inline Floats load_cached(const at::BFloat16* p, int64_t count) {
  return load_bf16(reinterpret_cast<const uint16_t*>(p), count);
}
inline Floats load_cached(const at::Half* p, int64_t count) { return load_f16(p, count); }

Activations quantize(const at::Tensor& x) {
  int64_t M = x.size(0), K = x.size(1), blocks = M * (K / BLOCK);
  thread_local std::vector<uint8_t> buffer;
  buffer.resize(M * K + 12 * blocks + 64);
  uint8_t* start = buffer.data();
  start += (64 - reinterpret_cast<uintptr_t>(start) % 64) % 64;
  Activations a{reinterpret_cast<int8_t*>(start), reinterpret_cast<float*>(start + M * K),
                reinterpret_cast<float*>(start + M * K + 4 * blocks),
                reinterpret_cast<int32_t*>(start + M * K + 8 * blocks), M};
  const float* xp = x.data_ptr<float>();
  const int64_t per_row = K / BLOCK;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < per_row; ++b) {
      const int64_t at = b * M + m;
      __m256i q = quantize_block(xp + m * K + b * BLOCK, a.scales + at, a.sums + at, a.int_sums + at);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(a.q + at * BLOCK), q);
    }
  return a;
}

void check(const at::Tensor& x, int64_t K, const char* what) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous(),
              what, ": x must be a contiguous float32 matrix");
  TORCH_CHECK(x.size(1) == K && K % BLOCK == 0, what, ": x has ", x.size(1),
              " columns; the weight has ", K, " (a multiple of 32)");
}

// Int weights in their kernel layout (see the top of this file): int8's `row_scales`, or
// int4's `scales` and `zeros`.
struct IntWeights {
  const uint8_t* values;
  const float* row_scales;
  const uint16_t* scales;
  const uint16_t* zeros;
};

// A loop over rows, columns or parts unrolled in full, so that a kernel's arrays of
// accumulators become registers (as loops, GCC kept them on the stack at every block).
#define UNROLLED _Pragma("GCC unroll 8")

// Columns c0..c1 of y (LANES outputs each: a tile holds TILE / LANES of them) for M rows of
// x, G columns at a time, from int8 (BITS 8) or int4 weights. A block's partial sums stay
// integers until its 32 values are done.
template <int BITS, int M, int G>
void int_columns(const Activations& a, const IntWeights& w, float* y, int64_t K, int64_t N,
                 int64_t m0, int64_t c0, int64_t c1) {
  constexpr int PER_TILE = TILE / LANES, TILE_BYTES = TILE * BLOCK * BITS / 8;
  const int64_t blocks = K / BLOCK;
  for (int64_t c = c0; c + G <= c1; c += G) {
    Floats acc[M][G];
    UNROLLED for (int m = 0; m < M; ++m)
      UNROLLED for (int g = 0; g < G; ++g) acc[m][g] = zero_floats();
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* part[G];  // column c + g's lanes of its tile's first part
      Floats scale[G], offset[G];
      UNROLLED for (int g = 0; g < G; ++g) {
        const int64_t tile = (c + g) / PER_TILE * blocks + b;
        const int lane0 = (c + g) % PER_TILE * LANES;
        part[g] = w.values + tile * TILE_BYTES + lane0 * 4;
        if constexpr (BITS == 4) {
          scale[g] = load_bf16(w.scales + tile * TILE + lane0);
          offset[g] = multiply_add(broadcast(-8.f), scale[g], load_bf16(w.zeros + tile * TILE + lane0));
        }
      }
      Ints dot[M][G];
      UNROLLED for (int m = 0; m < M; ++m) {
        const Ints start = BITS == 8 ? int8_start(a.int_sums[b * a.rows + m0 + m]) : zero_ints();
        UNROLLED for (int g = 0; g < G; ++g) dot[m][g] = start;
      }
      const int8_t* x = a.q + (b * a.rows + m0) * BLOCK;  // row m at x + m * BLOCK
      if constexpr (BITS == 8) {
        UNROLLED for (int j = 0; j < 8; ++j)
          UNROLLED for (int g = 0; g < G; ++g) {
            const Ints u = load_ints(part[g] + 64 * j);
            UNROLLED for (int m = 0; m < M; ++m) dot[m][g] = dot_quad_int8(dot[m][g], u, x + m * BLOCK + 4 * j);
          }
      } else {
        UNROLLED for (int j = 0; j < 4; ++j)
          UNROLLED for (int g = 0; g < G; ++g) {
            Ints low, high;
            load_nibbles(part[g] + 64 * j, &low, &high);
            UNROLLED for (int m = 0; m < M; ++m)
              dot[m][g] = dot_quad(dot_quad(dot[m][g], low, x + m * BLOCK + 4 * j), high,
                                  x + m * BLOCK + 4 * j + 16);
          }
      }
      UNROLLED for (int m = 0; m < M; ++m) {
        const Floats xscale = broadcast(a.scales[b * a.rows + m0 + m]);
        UNROLLED for (int g = 0; g < G; ++g) {
          if constexpr (BITS == 8) {
            acc[m][g] = multiply_add(to_floats(dot[m][g]), xscale, acc[m][g]);
          } else {
            acc[m][g] = multiply_add(to_floats(dot[m][g]), multiply(scale[g], xscale), acc[m][g]);
            acc[m][g] = multiply_add(offset[g], broadcast(a.sums[b * a.rows + m0 + m]), acc[m][g]);
          }
        }
      }
    }
    UNROLLED for (int m = 0; m < M; ++m)
      UNROLLED for (int g = 0; g < G; ++g) {
        Floats out = acc[m][g];
        if constexpr (BITS == 8) out = multiply(out, load_floats(w.row_scales + (c + g) * LANES, LANES));
        store_floats(y + (m0 + m) * N + (c + g) * LANES, out, LANES);
      }
  }
}

// Columns a step: as many as the registers hold accumulators for (AVX2 has half as many). Two
// for 3 or 4 rows ran slower than one (int8, 4 rows of a 49152 x 576 weight: 673 us against 268).
constexpr int columns_for(int M) {
  return LANES == 16 ? (M <= 2 ? 4 : 1) : (M == 1 ? 2 : 1);
}

template <int BITS, int M>
void int_rows(const Activations& a, const IntWeights& w, float* y, int64_t K, int64_t N,
              int64_t m0, int64_t c0, int64_t c1) {
  constexpr int G = columns_for(M);
  int_columns<BITS, M, G>(a, w, y, K, N, m0, c0, c1);
  if (G > 1) int_columns<BITS, M, 1>(a, w, y, K, N, m0, c1 - (c1 - c0) % G, c1);
}

template <typename Rows>
void over_rows(int64_t M, int64_t N, Rows rows) {
  // Each thread takes a range of N's outputs (the int kernels': of their columns of LANES
  // outputs), for all rows of x at once (8 at a time).
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

template <int BITS>
at::Tensor int_mm(const at::Tensor& x, const IntWeights& w, int64_t N) {
  const int64_t M = x.size(0), K = x.size(1);
  Activations a = quantize(x);
  at::Tensor y = at::empty({M, N}, x.options());
  float* yp = y.data_ptr<float>();
  over_rows(M, N / LANES, [&](int64_t m0, int64_t rows, int64_t c0, int64_t c1) {
    switch (rows) {
      case 1: int_rows<BITS, 1>(a, w, yp, K, N, m0, c0, c1); break;
      case 2: int_rows<BITS, 2>(a, w, yp, K, N, m0, c0, c1); break;
      case 3: int_rows<BITS, 3>(a, w, yp, K, N, m0, c0, c1); break;
      case 4: int_rows<BITS, 4>(a, w, yp, K, N, m0, c0, c1); break;
      case 5: int_rows<BITS, 5>(a, w, yp, K, N, m0, c0, c1); break;
      case 6: int_rows<BITS, 6>(a, w, yp, K, N, m0, c0, c1); break;
      case 7: int_rows<BITS, 7>(a, w, yp, K, N, m0, c0, c1); break;
      default: int_rows<BITS, 8>(a, w, yp, K, N, m0, c0, c1); break;
    }
  });
  return y;
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  const int64_t N = w.size(0), K = w.size(1);
  check(x, K, "int8_mm");
  TORCH_CHECK(N % TILE == 0 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int8_mm: w must hold whole tiles of 16 outputs, as uint8");
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.numel() == N && scale.is_contiguous(),
              "int8_mm: scale must be (N,) float32");
  return int_mm<8>(x, {w.data_ptr<uint8_t>(), scale.data_ptr<float>(), nullptr, nullptr}, N);
}

at::Tensor int4_mm(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales,
                   const at::Tensor& zeros) {
  const int64_t N = w.size(0), K = w.size(1) * 2;
  check(x, K, "int4_mm");
  TORCH_CHECK(N % TILE == 0 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "int4_mm: w must hold whole tiles of 16 outputs, as uint8");
  TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
                  scales.numel() == N * (K / BLOCK) && zeros.numel() == N * (K / BLOCK) &&
                  scales.is_contiguous() && zeros.is_contiguous(),
              "int4_mm: scales and zeros must be (N, K / 32) bfloat16");
  return int_mm<4>(x, {w.data_ptr<uint8_t>(), nullptr,
                       reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                       reinterpret_cast<const uint16_t*>(zeros.data_ptr())}, N);
}

// The float32 weight (N, K) of int8 or int4 tiles (`BITS`), the same numbers as lmforge's
// dequantize_int8 / dequantize_int4 make from its own layout: each value widened, less its
// offset (128 or 8), times its scale, plus its zero, each operation rounded alone (no fused
// multiply-add) as PyTorch's are. A long prompt's product dequantizes each weight, and reads it
// from the tiles: the weights as stored stay paged out. A tile's output o holds, in part p,
// bytes p * 64 + o * 4 .. + 3: values 4p..4p+3 of its block of 32 (int8), or those in the low
// nibbles and 16 + 4p.. in the high ones (int4).
#pragma GCC push_options
#pragma GCC optimize("fp-contract=off")
template <int BITS>
void dequantize_tiles(const uint8_t* w, const float* scale8, const uint16_t* scales,
                      const uint16_t* zeros, float* out, int64_t N, int64_t K) {
  const int64_t blocks = K / BLOCK;
  constexpr int64_t TILE_BYTES = TILE * BLOCK * BITS / 8;
  at::parallel_for(0, N / TILE, 8, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* tile = w + (t * blocks + b) * TILE_BYTES;
        for (int o = 0; o < TILE; ++o) {
          float* row = out + (t * TILE + o) * K + b * BLOCK;
          int32_t part[BLOCK / 4];
          for (int p = 0; p < BLOCK * BITS / 32; ++p) std::memcpy(part + p, tile + p * 64 + o * 4, 4);
          if (BITS == 8) {
            const float scale = scale8[t * TILE + o];
            widen_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(part)), row, 128.f, scale);
            widen_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(part + 4)), row + 16, 128.f, scale);
          } else {
            const int64_t at = (t * blocks + b) * TILE + o;
            const float scale = bf16_value(scales[at]), zero = bf16_value(zeros[at]);
            const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(part));
            const __m128i low = _mm_set1_epi8(15);
            widen_bytes(_mm_and_si128(bytes, low), row, 8.f, scale, zero);
            widen_bytes(_mm_and_si128(_mm_srli_epi16(bytes, 4), low), row + 16, 8.f, scale, zero);
          }
        }
      }
  });
}
#pragma GCC pop_options

at::Tensor dequantize(const at::Tensor& w, const at::Tensor& scales, const at::Tensor& zeros) {
  const bool int8 = zeros.numel() == 0;
  TORCH_CHECK(w.scalar_type() == at::kByte && w.is_contiguous() && w.size(0) % TILE == 0,
              "dequantize: w must hold whole tiles of 16 outputs, as uint8");
  const int64_t N = w.size(0), K = int8 ? w.size(1) : w.size(1) * 2;
  at::Tensor out = at::empty({N, K}, w.options().dtype(at::kFloat));
  if (int8) {
    TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.numel() == N && scales.is_contiguous(),
                "dequantize: int8 scales must be (N,) float32");
    dequantize_tiles<8>(w.data_ptr<uint8_t>(), scales.data_ptr<float>(), nullptr, nullptr,
                        out.data_ptr<float>(), N, K);
  } else {
    TORCH_CHECK(scales.scalar_type() == at::kBFloat16 && zeros.scalar_type() == at::kBFloat16 &&
                    scales.numel() == N * (K / BLOCK) && zeros.numel() == N * (K / BLOCK) &&
                    scales.is_contiguous() && zeros.is_contiguous(),
                "dequantize: int4 scales and zeros must be (N, K / 32) bfloat16");
    dequantize_tiles<4>(w.data_ptr<uint8_t>(), nullptr,
                        reinterpret_cast<const uint16_t*>(scales.data_ptr()),
                        reinterpret_cast<const uint16_t*>(zeros.data_ptr()), out.data_ptr<float>(),
                        N, K);
  }
  return out;
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
  TORCH_CHECK(q.scalar_type() == at::kFloat && k.scalar_type() == v.scalar_type() &&
                  (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16 ||
                   k.scalar_type() == at::kHalf),
              "decode_attention: q float32, and k and v float32, bfloat16 or float16 alike");
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
  const float* qp = q.data_ptr<float>();
  const int64_t* lp = lengths.numel() ? lengths.data_ptr<int64_t>() : nullptr;
  float* op = out.data_ptr<float>();
  const float fscale = static_cast<float>(scale);
  // the positions row b attends over, [first, length)
  auto span = [&](int64_t b) {
    const int64_t length = lp ? lp[b] : end;
    TORCH_CHECK(length >= 1 && length <= L, "decode_attention: length ", length, " outside 1..", L);
    return std::pair<int64_t, int64_t>{window > 0 ? std::max<int64_t>(0, length - window) : 0, length};
  };
  // at(j, block, place) for row b's positions first + j, first..length - 1 in turn: the block
  // each is in, and its place in the block (counted, not divided out for each)
  auto each_position = [&](int64_t b, int64_t first, int64_t length, auto&& at) {
    int64_t column = paged ? first / BS : 0, place = paged ? first % BS : first;
    for (int64_t j = 0; j < length - first; ++j, ++place) {
      if (paged && place == BS) place = 0, ++column;
      const int64_t block = paged ? tp[b * ts + column] : b;
      TORCH_CHECK(block >= 0 && block < NB, "decode_attention: block ", block, " outside the cache");
      at(j, block, place);
    }
  };
  // kp, vp: the cache's keys and values, of its element type
  auto attend = [&](const auto* kp, const auto* vp) {
    at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
      // Every key and value this thread reads, asked for at once (into L2) before any is read:
      // a step's cache is cold (a model's weights pass through the caches between two steps),
      // its positions scattered over blocks, out of the hardware prefetcher's reach; asked for
      // a head at a time, the reads waited on memory. 8 SmolLM2 sequences, compiled: 10-20%
      // faster steps.
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv;
        const auto [first, length] = span(b);
        each_position(b, first, length, [&](int64_t, int64_t block, int64_t place) {
          prefetch<_MM_HINT_T1>(kp + h * kh + block * kb + place * kl, D);
          prefetch<_MM_HINT_T1>(vp + h * vh + block * vb + place * vl, D);
        });
      }
      thread_local std::vector<float> buffer;
      thread_local std::vector<int64_t> offsets;
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t b = i / Hkv, h = i % Hkv;
        const auto [first, length] = span(b);
        const int64_t n = length - first;
        // where position `first + j` of this row is in k and in v, found once for all heads' loops
        offsets.resize(2 * n);
        int64_t *key_at = offsets.data(), *value_at = offsets.data() + n;
        each_position(b, first, length, [&](int64_t j, int64_t block, int64_t place) {
          key_at[j] = block * kb + place * kl;
          value_at[j] = block * vb + place * vl;
          // into L1 now, read in the loops below
          prefetch<_MM_HINT_T0>(kp + h * kh + key_at[j], D);
          prefetch<_MM_HINT_T1>(vp + h * vh + value_at[j], D);
        });
        const auto* keys = kp + h * kh;
        const auto* values = vp + h * vh;
        const float* queries = qp + b * qb + h * group * qh;
        buffer.resize(group * n);
        float* scores = buffer.data();
        // whole: D a multiple of LANES (as head sizes are), whose loads need no mask made: 12%
        // faster attention for 8 SmolLM2 sequences
        auto score = [&](auto whole) {
          for (int64_t j = 0; j < n; ++j) {
            const auto* key = keys + key_at[j];
            for (int64_t g = 0; g < group; ++g) {
              const float* query = queries + g * qh;
              Floats dot = zero_floats();
              for (int64_t d = 0; d < D; d += LANES) {
                const int64_t count = whole ? LANES : std::min<int64_t>(LANES, D - d);
                dot = multiply_add(load_floats(query + d, count), load_cached(key + d, count), dot);
              }
              scores[g * n + j] = sum_lanes(dot) * fscale;
            }
          }
        };
        if (D % LANES == 0)
          score(std::true_type{});
        else
          score(std::false_type{});
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
        for (int64_t g = 0; g < group; ++g) {  // the weighted sum of the values, 4 vectors at a time
          const float* p = scores + g * n;
          float* o = op + (b * H + h * group + g) * D;
          for (int64_t d = 0; d < D; d += 4 * LANES) {
            const auto* value = values + d;
            Floats sum[4];
            int64_t count[4];
            for (int i = 0; i < 4; ++i) {
              sum[i] = zero_floats();
              count[i] = std::clamp<int64_t>(D - d - i * LANES, 0, LANES);
            }
            for (int64_t j = 0; j < n; ++j) {
              const Floats weight = broadcast(p[j]);
              for (int i = 0; i < 4; ++i)
                if (count[i] > 0)
                  sum[i] = multiply_add(weight, load_cached(value + value_at[j] + i * LANES, count[i]), sum[i]);
            }
            for (int i = 0; i < 4; ++i)
              if (count[i] > 0) store_floats(o + d + i * LANES, sum[i], count[i]);
          }
        }
      }
    });
  };
  if (k.scalar_type() == at::kFloat)
    attend(k.data_ptr<float>(), v.data_ptr<float>());
  else if (k.scalar_type() == at::kBFloat16)
    attend(k.data_ptr<at::BFloat16>(), v.data_ptr<at::BFloat16>());
  else
    attend(k.data_ptr<at::Half>(), v.data_ptr<at::Half>());
  return out;
}

// Each row's index of its largest value, the first of equal ones (a greedy decoding step's
// tokens): its largest value, then where it first is. PyTorch's max with indices takes several
// times longer over a row of SmolLM2's 49,152 logits.
at::Tensor greedy(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.is_contiguous(),
              "greedy: logits must be a contiguous (B, V) float32 matrix");
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor tokens = at::zeros({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* tp = tokens.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = lp + b * V;
      Floats top = broadcast(-INFINITY);
      for (int64_t v = 0; v < V; v += LANES)
        top = maximum(top, load_floats(row + v, std::min<int64_t>(LANES, V - v), top));
      const float best = max_lanes(top);
      for (int64_t v = 0; v < V; v += LANES) {
        const int lane = first_equal(row + v, std::min<int64_t>(LANES, V - v), best);
        if (lane >= 0) {
          tp[b] = v + lane;
          break;
        }
      }
    }
  });
  return tokens;
}

}  // namespace

TORCH_LIBRARY(lmforge_kernels, m) {
  m.def("float_mm(Tensor x, Tensor w) -> Tensor");
  m.def("int8_mm(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int4_mm(Tensor x, Tensor w, Tensor scales, Tensor zeros) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor lengths, Tensor table, int end, "
        "float scale, int window) -> Tensor");
  m.def("greedy(Tensor logits) -> Tensor");
  m.def("dequantize(Tensor w, Tensor scales, Tensor zeros) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge_kernels, CPU, m) {
  m.impl("float_mm", &float_mm);
  m.impl("int8_mm", &int8_mm);
  m.impl("int4_mm", &int4_mm);
  m.impl("decode_attention", &decode_attention);
  m.impl("greedy", &greedy);
  m.impl("dequantize", &dequantize);
}
