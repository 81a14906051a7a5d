// Group-quantized matmuls with bfloat16 activations on AVX512-BF16: q4_mm over 4-bit planes (GGUF Q4_0/Q4_1,
// MLX 4-bit; it sums P planes, backends/torch/quant.py packs one) and q8_mm over bytes (GGUF Q8_0, MLX 8-bit),
// below. q4_mm: group-quantized matmul over 4-bit planes with bfloat16
// activations, on AVX512-BF16. Output rows sit in the vector lanes (blocks of 16 rows), so one
// vdpbf16ps does 16 rows x 2 inputs against a broadcast pair of activations, and a group's scale is one
// multiply per 16 rows. A nibble q becomes the bfloat16 128 + q by one OR (0x4300 | q is exact); the
// 128 offset and the group's bias come back through per-group sums of x (bias - 128 sum_p scale_p).
// Scales and biases come as float16 (GGUF's and MLX's own, 4 bytes a group as torch's kernel) or float32.
// Weights are decoded once per tile of up to 4 activation rows. Float32 accumulation, bfloat16 out.
// A row's sums run in the same order whatever the number of rows in the call (two chains per row in
// every tile, groups and tiles in a fixed order), so a row's output does not depend on its batch.
#include <torch/extension.h>
#include <torch/library.h>
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline __m512bh pair(const uint16_t* p) {  // x[k], x[k+1] in every lane (memcpy: any alignment)
  int32_t v;
  std::memcpy(&v, p, sizeof v);
  return (__m512bh)_mm512_set1_epi32(v);
}
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }

// rows per tile: 4 measured fastest at 1, 4, 8 and 16 rows (8 ran out of registers: 24 accumulators)
constexpr int TILE = 4;
constexpr int64_t BLOCK = 16;  // output rows per vector

// q: (N/16, P, K/4, 32) bytes: byte j of step t holds row j/2 of the block, low nibble k = 4t + j%2,
// high nibble k = 4t + 2 + j%2. s: (N/16, P, G, 16); c (the biases): (N/16, G, 16).
// x's sums over each group of g inputs (bfloat16 -> float32 is a 16-bit shift), for the groups' constants
std::vector<float> group_sums(const uint16_t* xp, int64_t n, int64_t g) {
  std::vector<float> xs(n);
  for (int64_t i = 0; i < n; ++i) {
    __m512 a = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= g; j += 16)
      a = _mm512_add_ps(a, _mm512_castsi512_ps(_mm512_slli_epi32(
          _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(xp + i * g + j))), 16)));
    float sum = _mm512_reduce_add_ps(a);
    for (; j < g; ++j) sum += float(c10::bit_cast<at::BFloat16>(xp[i * g + j]));
    xs[i] = sum;
  }
  return xs;
}

template <int MT, typename T>
void block_tile(const uint16_t* x, int64_t K, const float* xs, int64_t G, int64_t g, const uint8_t* q,
                const T* s, const T* c, int64_t P, uint16_t* y, int64_t ldy, int64_t b0, int64_t b1) {
  // two independent chains per row hide dpbf16's latency; the same two for every MT, or a row's sum would
  // be grouped differently by the size of its tile and so by its batch (a constant chain index also keeps
  // the accumulators in registers: with 4, (2t) % 4 indexed them at run time, 1.6x slower at one row)
  constexpr int NA = 2;
  const __m512i lowmask = _mm512_set1_epi16(0x000F), one28 = _mm512_set1_epi16(0x4300);
  const int64_t steps = g / 4;
  for (int64_t b = b0; b < b1; ++b) {
    __m512 tot[MT];
    for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
    for (int64_t p = 0; p < P; ++p) {
      const uint8_t* qb = q + (b * P + p) * (K / 4) * 32;
      const T* sb = s + (b * P + p) * G * BLOCK;
      for (int64_t gi = 0; gi < G; ++gi) {
        __m512 acc[MT][NA];
        for (int m = 0; m < MT; ++m)
          for (int a = 0; a < NA; ++a) acc[m][a] = _mm512_setzero_ps();
        const uint8_t* qg = qb + gi * steps * 32;
        const int64_t kg = gi * g;
        for (int64_t t = 0; t < steps; ++t) {
          __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i*)(qg + t * 32)));
          __m512bh lo = (__m512bh)_mm512_ternarylogic_epi32(w, lowmask, one28, 0xEA);  // (w & 15) | 0x4300
          __m512bh hi = (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), lowmask, one28, 0xEA);
                    for (int m = 0; m < MT; ++m) {
            const uint16_t* xm = x + m * K + kg + 4 * t;
            __m512bh x0 = pair(xm), x1 = pair(xm + 2);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], lo, x0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], hi, x1);
          }
        }
        __m512 sv = load16(sb + gi * BLOCK);
        for (int m = 0; m < MT; ++m) {
          tot[m] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc[m][0], acc[m][1]), tot[m]);
        }
      }
    }
    const T* cb = c + b * G * BLOCK;
    const __m512 m128 = _mm512_set1_ps(-128.0f);
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 ss = load16(s + (b * P) * G * BLOCK + gi * BLOCK);
      for (int64_t p = 1; p < P; ++p) ss = _mm512_add_ps(ss, load16(s + (b * P + p) * G * BLOCK + gi * BLOCK));
      __m512 cv = _mm512_fmadd_ps(m128, ss, load16(cb + gi * BLOCK));  // bias - 128 sum_p scale_p
      for (int m = 0; m < MT; ++m) tot[m] = _mm512_fmadd_ps(cv, _mm512_set1_ps(xs[m * G + gi]), tot[m]);
    }
    for (int m = 0; m < MT; ++m)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + b * BLOCK), (__m256i)_mm512_cvtneps_pbh(tot[m]));
  }
}

template <typename T>
void run_tile(int mt, const uint16_t* x, int64_t K, const float* xs, int64_t G, int64_t g, const uint8_t* q,
              const T* s, const T* c, int64_t P, uint16_t* y, int64_t ldy, int64_t b0, int64_t b1) {
  switch (mt) {
#define CASE(M) case M: block_tile<M, T>(x, K, xs, G, g, q, s, c, P, y, ldy, b0, b1); break;
    CASE(1) CASE(2) CASE(3) CASE(4)
#undef CASE
  }
}

// The matmuls' shared part: checks of x and of the groups' constants, x's group sums, then `tile(mt, m0, b0, b1,
// ...)` over blocks of 16 output-row vectors (split over torch's intra-op threads, one on a peer; 16 blocks, 256
// rows, stay in cache while every tile of up to `rows` activation rows passes over them).
template <typename F>
torch::Tensor run_blocks(const char* name, torch::Tensor x, const torch::Tensor& s, const torch::Tensor& c,
                         int64_t NB, int64_t g, int64_t planes, int rows, F tile) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, name, ": x must be (M, K) bfloat16");
  x = x.contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = NB * BLOCK, G = K / g;
  TORCH_CHECK(g % 4 == 0 && K % g == 0, name, ": K and the group size disagree");
  TORCH_CHECK((s.scalar_type() == at::kFloat || s.scalar_type() == at::kHalf) && s.scalar_type() == c.scalar_type(),
              name, ": scales and biases must be both float16 or both float32");
  TORCH_CHECK(s.is_contiguous() && s.numel() == N * planes * G && c.is_contiguous() && c.numel() == N * G,
              name, ": scales or biases of the wrong shape");
  auto y = torch::empty({M, N}, x.options());
  const uint16_t* xp = (const uint16_t*)x.data_ptr();
  const std::vector<float> xs = group_sums(xp, M * G, g);
  uint16_t* yp = (uint16_t*)y.data_ptr();
  const bool half = s.scalar_type() == at::kHalf;
  at::parallel_for(0, NB, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t b0 = lo; b0 < hi; b0 += 16) {
      const int64_t b1 = std::min<int64_t>(hi, b0 + 16);
      for (int64_t m0 = 0; m0 < M; m0 += rows)
        tile((int)std::min<int64_t>(rows, M - m0), xp + m0 * K, K, xs.data() + m0 * G, G, yp + m0 * N, N, b0, b1,
             half);
    }
  });
  return y;
}

// x (M, K) bfloat16; q (N/16, P, K/4, 32) uint8; scales s (N/16, P, G, 16), biases c (N/16, G, 16), both
// float16 or both float32 -> (M, N) bfloat16
torch::Tensor q4_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor c, int64_t g) {
  TORCH_CHECK(q.dim() == 4 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(3) == 32 &&
              q.size(2) * 4 == x.size(-1), "q4_mm: q must be (N/16, P, K/4, 32) uint8");
  const int64_t P = q.size(1);
  const uint8_t* qp = q.data_ptr<uint8_t>();
  return run_blocks("q4_mm", x, s, c, q.size(0), g, P, TILE,
                    [&](int mt, const uint16_t* xm, int64_t K, const float* xs, int64_t G, uint16_t* y, int64_t N,
                        int64_t b0, int64_t b1, bool half) {
    if (half)
      run_tile(mt, xm, K, xs, G, g, qp, s.data_ptr<at::Half>(), c.data_ptr<at::Half>(), P, y, N, b0, b1);
    else
      run_tile(mt, xm, K, xs, G, g, qp, s.data_ptr<float>(), c.data_ptr<float>(), P, y, N, b0, b1);
  });
}

// 8-bit groups (GGUF Q8_0, MLX 8-bit) in one plane: a byte u becomes the bfloat16 u exactly (u < 256 has 8
// significant bits) through float32, so each weight takes one vdpbf16ps lane instead of two nibble planes'.
// q: (N/16, K/2, 32) bytes: step t holds k = 2t, 2t + 1; byte j is row j/2 (bytes 0-15, rows 0-7) or
// 8 + (j-16)/2 (bytes 16-31), input k = 2t + j%2. s and c (the biases): (N/16, G, 16); w = s u + c.
constexpr int TILE8 = 8;  // rows per tile of q8_mm: its decode costs more than a nibble's, so more rows share it

template <int MT, typename T>
void block_tile8(const uint16_t* x, int64_t K, const float* xs, int64_t G, int64_t g, const uint8_t* q,
                 const T* s, const T* c, uint16_t* y, int64_t ldy, int64_t b0, int64_t b1) {
  const int64_t steps = g / 2;  // even: g % 4 == 0
  for (int64_t b = b0; b < b1; ++b) {
    __m512 tot[MT];
    for (int m = 0; m < MT; ++m) tot[m] = _mm512_setzero_ps();
    const uint8_t* qb = q + b * (K / 2) * 32;
    const T* sb = s + b * G * BLOCK;
    const T* cb = c + b * G * BLOCK;
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 acc[MT][2];  // two chains, alternate steps: the same for every MT (rows batch-invariant)
      for (int m = 0; m < MT; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
      const uint8_t* qg = qb + gi * steps * 32;
      const int64_t kg = gi * g;
      for (int64_t t = 0; t < steps; t += 2) {
        __m512bh w[2];
        for (int e = 0; e < 2; ++e) {
          const uint8_t* qt = qg + (t + e) * 32;
          __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)qt)));
          __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(qt + 16))));
          w[e] = _mm512_cvtne2ps_pbh(hi, lo);  // bfloat16 elements 0-15 from lo, 16-31 from hi
        }
        for (int m = 0; m < MT; ++m) {
          const uint16_t* xm = x + m * K + kg + 2 * t;
          acc[m][0] = _mm512_dpbf16_ps(acc[m][0], w[0], pair(xm));
          acc[m][1] = _mm512_dpbf16_ps(acc[m][1], w[1], pair(xm + 2));
        }
      }
      __m512 sv = load16(sb + gi * BLOCK);
      for (int m = 0; m < MT; ++m) tot[m] = _mm512_fmadd_ps(sv, _mm512_add_ps(acc[m][0], acc[m][1]), tot[m]);
    }
    for (int64_t gi = 0; gi < G; ++gi) {
      __m512 cv = load16(cb + gi * BLOCK);
      for (int m = 0; m < MT; ++m) tot[m] = _mm512_fmadd_ps(cv, _mm512_set1_ps(xs[m * G + gi]), tot[m]);
    }
    for (int m = 0; m < MT; ++m)
      _mm256_storeu_si256((__m256i*)(y + m * ldy + b * BLOCK), (__m256i)_mm512_cvtneps_pbh(tot[m]));
  }
}


// x (M, K) bfloat16; q (N/16, K/2, 32) uint8; scales s and biases c (N/16, G, 16), both float16 or both
// float32 -> (M, N) bfloat16
torch::Tensor q8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s, torch::Tensor c, int64_t g) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kByte && q.is_contiguous() && q.size(2) == 32 &&
              q.size(1) * 2 == x.size(-1), "q8_mm: q must be (N/16, K/2, 32) uint8");
  const uint8_t* qp = q.data_ptr<uint8_t>();
  return run_blocks("q8_mm", x, s, c, q.size(0), g, 1, TILE8,
                    [&](int mt, const uint16_t* xm, int64_t K, const float* xs, int64_t G, uint16_t* y, int64_t N,
                        int64_t b0, int64_t b1, bool half) {
    switch (mt) {
#define CASE(MT) case MT: \
        if (half) block_tile8<MT>(xm, K, xs, G, g, qp, s.data_ptr<at::Half>(), c.data_ptr<at::Half>(), y, N, b0, b1); \
        else block_tile8<MT>(xm, K, xs, G, g, qp, s.data_ptr<float>(), c.data_ptr<float>(), y, N, b0, b1); \
        break;
      CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
  });
}
// the operators' form (const references, as the dispatcher calls them): layer.cpp's Blocks runs a slice's decode
// step in one call and reaches these through the dispatcher, as together::q4_mm and together::q8_mm
at::Tensor q4_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& c, int64_t g) {
  return q4_mm(x, q, s, c, g);
}
at::Tensor q8_op(const at::Tensor& x, const at::Tensor& q, const at::Tensor& s, const at::Tensor& c, int64_t g) {
  return q8_mm(x, q, s, c, g);
}
}  // namespace

TORCH_LIBRARY(together, m) {
  m.def("q4_mm(Tensor x, Tensor q, Tensor s, Tensor c, int g) -> Tensor");
  m.def("q8_mm(Tensor x, Tensor q, Tensor s, Tensor c, int g) -> Tensor");
}

TORCH_LIBRARY_IMPL(together, CPU, m) {
  m.impl("q4_mm", &q4_op);
  m.impl("q8_mm", &q8_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // the GIL is let go while they run: the peer's event loop serves frames and the API meanwhile
  m.def("q4_mm", &q4_mm, py::call_guard<py::gil_scoped_release>(),
        "group-quantized 4-bit-plane matmul, bfloat16 activations (AVX512-BF16)");
  m.def("q8_mm", &q8_mm, py::call_guard<py::gil_scoped_release>(),
        "group-quantized 8-bit matmul, bfloat16 activations (AVX512-BF16)");
}
