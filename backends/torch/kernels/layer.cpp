// The non-matmul work of a decoder layer in a few calls (backends/torch/model.py's fused path), for
// float32 or bfloat16 activations on a CPU: RMSNorm (with the residual add before it) and decode
// attention (RoPE on q and k, the step's keys and values into the float32 KV pool, attention of each
// position over its sequence's keys so far, GQA). At batch 1 torch spends more time dispatching these
// ~50 small ops per layer than computing them. (SiLU * up stays torch's: its vectorized exp beats a
// scalar loop here, ~6 vs ~11 us a decode row, 4x on a prefill chunk.) Every row (and every position of a row) is computed
// by itself, in the same order whatever else shares the call: a row's output does not depend on its batch.
// The arithmetic follows torch's ops on the same dtypes (bfloat16 rounding after each op that rounds there;
// built with -ffp-contract=off so that RoPE's products and sums round as torch's do); sums (the norm's
// mean square, attention's dot products and softmax) run in another order than torch's, and attention's exp is a
// polynomial (within 1 ulp of the exact value), so results may differ from the torch path in the last float32 bits.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <tuple>
#include <vector>

namespace {

template <typename T>
inline void norm_row(const T* x, const T* w, T* y, int64_t C, float eps) {
  // as HF's LlamaRMSNorm: normalise in float32, round to the activations' dtype, then scale by the weight
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int64_t c = 0; c < C; ++c) {
    const float v = static_cast<float>(x[c]);
    ss += v * v;
  }
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
  for (int64_t c = 0; c < C; ++c) {
    const T n = static_cast<T>(static_cast<float>(x[c]) * r);
    y[c] = static_cast<T>(static_cast<float>(w[c]) * static_cast<float>(n));
  }
}

// 16 floats, GCC/Clang's vector extension: one AVX512 register, two AVX2 ones, four SSE ones; loads by memcpy
// (any alignment). Decode attention's loops over the keys run on these (dot products, the softmax's exp, the
// weighted sum of values): as plain loops (std::exp one key at a time, a store and a load per key and
// dimension) attention was ~5.7 ms of a ~27 ms 8-row decode step (~24 us a row and layer, caches of ~90
// tokens, perf/bench_torch_batch.py); alone on 8 rows, 1 layer: 174 -> 112 us a call, ~50 us of it the exp.
// What is left is mostly reading the float32 keys and values (~150 KB a row and layer at 90 tokens).
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;
inline vf loadv(const float* p) {
  vf x;
  __builtin_memcpy(&x, p, sizeof x);
  return x;
}
inline void storev(float* p, vf x) { __builtin_memcpy(p, &x, sizeof x); }

typedef int32_t vint __attribute__((vector_size(64)));

// exp of 16 floats at once (Cephes' expf: x = n ln2 + r, a polynomial in r, 2^n in the exponent bits), within
// 1 ulp of the exact value over [-87, 0] (softmax's arguments); inputs below -87 give ~1e-38, not a denormal or 0
inline vf expv(vf x) {
  x = x < -87.0f ? vf{} - 87.0f : x;  // lane-wise select (a vector comparison's mask)
  const vf t = x * 1.44269504088896341f + 0.5f;
  vint n = __builtin_convertvector(t, vint);  // truncation; floor for the negative t below
  n += (__builtin_convertvector(n, vf) > t);  // -1 where truncation rounded up
  const vf fn = __builtin_convertvector(n, vf);
  const vf r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  const vf y = p * (r * r) + r + 1.0f;
  vint bits = (n + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return y * scale;
}

// w[i] = exp(w[i] - m) for i < n; returns their sum (lane-wise over blocks of kLanes, the lanes in a fixed
// tree, then the last n % kLanes one by one)
inline float softmax_exp(float* w, int64_t n, float m) {
  vf s = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    const vf e = expv(loadv(w + i) - m);
    storev(w + i, e);
    s += e;
  }
  float t[kLanes];
  storev(t, s);
  for (int64_t k = kLanes / 2; k > 0; k /= 2)
    for (int64_t j = 0; j < k; ++j) t[j] += t[j + k];
  float sum = t[0];
  if (i < n) {
    float x[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) x[j] = i + j < n ? w[i + j] - m : -87.0f;
    storev(x, expv(loadv(x)));
    for (int64_t j = 0; i + j < n; ++j) {
      w[i + j] = x[j];
      sum += x[j];
    }
  }
  return sum;
}

// q . k over D (a multiple of kLanes): lane-wise products summed block by block, then the lanes in a fixed tree
inline float dotv(const float* q, const float* k, int64_t D) {
  vf s = loadv(q) * loadv(k);
  for (int64_t d = kLanes; d < D; d += kLanes) s += loadv(q + d) * loadv(k + d);
  float t[kLanes];
  storev(t, s);
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t j = 0; j < w; ++j) t[j] += t[j + w];
  return t[0];
}

// acc[d] = sum over i < n of w[i] v[i][d] (v: n rows of D floats, D a multiple of kLanes), each d's sum in key
// order from 0, as a running `acc[d] += w[i] * v[i][d]` rounds; four registers of dimensions at a time
inline void weighv(const float* w, const float* v, int64_t n, int64_t D, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 4 * kLanes <= D; d0 += 4 * kLanes) {
    vf a0 = {}, a1 = {}, a2 = {}, a3 = {};
    for (int64_t i = 0; i < n; ++i) {
      const float* vi = v + i * D + d0;
      const vf e = vf{} + w[i];
      a0 += e * loadv(vi);
      a1 += e * loadv(vi + kLanes);
      a2 += e * loadv(vi + 2 * kLanes);
      a3 += e * loadv(vi + 3 * kLanes);
    }
    storev(acc + d0, a0), storev(acc + d0 + kLanes, a1), storev(acc + d0 + 2 * kLanes, a2);
    storev(acc + d0 + 3 * kLanes, a3);
  }
  for (; d0 < D; d0 += kLanes) {
    vf a = {};
    for (int64_t i = 0; i < n; ++i) a += (vf{} + w[i]) * loadv(v + i * D + d0);
    storev(acc + d0, a);
  }
}

void check_act(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, what, " must be float32 or bfloat16");
}

}  // namespace

// y = weight * rmsnorm(x) over the last dimension
at::Tensor rmsnorm(at::Tensor x, at::Tensor w, double eps) {
  check_act(x, "x");
  x = x.contiguous();
  w = w.to(x.scalar_type()).contiguous();
  const int64_t C = x.size(-1), R = x.numel() / C;
  TORCH_CHECK(w.numel() == C, "norm weight size");
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rmsnorm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t r = 0; r < R; ++r) norm_row(xp + r * C, wp, yp + r * C, C, static_cast<float>(eps));
  });
  return y;
}

// h = x + a (the residual, rounded as torch's add), and weight * rmsnorm(h)
std::vector<at::Tensor> add_rmsnorm(at::Tensor x, at::Tensor a, at::Tensor w, double eps) {
  check_act(x, "x");
  x = x.contiguous();
  a = a.to(x.scalar_type()).contiguous();
  w = w.to(x.scalar_type()).contiguous();
  TORCH_CHECK(a.numel() == x.numel(), "residual size");
  const int64_t C = x.size(-1), R = x.numel() / C;
  auto h = at::empty_like(x), y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "add_rmsnorm", [&] {
    const scalar_t *xp = x.data_ptr<scalar_t>(), *ap = a.data_ptr<scalar_t>(), *wp = w.data_ptr<scalar_t>();
    scalar_t *hp = h.data_ptr<scalar_t>(), *yp = y.data_ptr<scalar_t>();
    for (int64_t i = 0; i < R * C; ++i)
      hp[i] = static_cast<scalar_t>(static_cast<float>(xp[i]) + static_cast<float>(ap[i]));
    for (int64_t r = 0; r < R; ++r) norm_row(hp + r * C, wp, yp + r * C, C, static_cast<float>(eps));
  });
  return {h, y};
}

// Decode attention of layer `layer` over the KV pool. qkv: (B, L, (H + 2 Hkv) D) or (B L, (H + 2 Hkv) D),
// the fused projection's output (q heads, k heads, v heads); cos, sin: (B, L, D/2) float32; pk, pv: the pool, (layers, slots, Hkv,
// cap, D) float32; slots, starts: (B,) int64, row b's slot and the position of its first token. Each
// position's k and v go to the pool, then each position p attends over its slot's keys [0, p] (causal, one
// position at a time: a chunk's position attends exactly as a decode step of its own would). Returns the
// attention output (B, L, H D) (or (B L, H D)) in qkv's dtype.
at::Tensor attend(at::Tensor qkv, at::Tensor cos, at::Tensor sin, at::Tensor pk, at::Tensor pv, int64_t layer,
                  at::Tensor slots, at::Tensor starts, int64_t H, int64_t Hkv) {
  check_act(qkv, "qkv");
  TORCH_CHECK(pk.scalar_type() == at::kFloat && pv.scalar_type() == at::kFloat, "the KV pool must be float32");
  TORCH_CHECK(pk.is_contiguous() && pv.is_contiguous(), "the KV pool must be contiguous");
  const bool flat = qkv.dim() == 2;
  qkv = qkv.contiguous();
  if (flat) qkv = qkv.view({slots.size(0), -1, qkv.size(-1)});
  cos = cos.to(at::kFloat).contiguous();
  sin = sin.to(at::kFloat).contiguous();
  slots = slots.to(at::kLong).contiguous();
  starts = starts.to(at::kLong).contiguous();
  const int64_t B = qkv.size(0), L = qkv.size(1), D = pk.size(4), half = D / 2, W = (H + 2 * Hkv) * D;
  const int64_t NS = pk.size(1), cap = pk.size(3);
  TORCH_CHECK(qkv.size(2) == W && H % Hkv == 0 && pk.size(2) == Hkv && layer < pk.size(0), "attend: shapes");
  TORCH_CHECK(cos.numel() == B * L * half && sin.numel() == B * L * half, "attend: rope shapes");
  const int64_t *sl = slots.data_ptr<int64_t>(), *st = starts.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sl[b] >= 0 && sl[b] < NS && st[b] >= 0 && st[b] + L <= cap, "attend: row outside the pool");
  float* K = pk.data_ptr<float>() + layer * NS * Hkv * cap * D;
  float* V = pv.data_ptr<float>() + layer * NS * Hkv * cap * D;
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  auto q32 = at::empty({B, L, H, D}, qkv.options().dtype(at::kFloat));
  float* Q = q32.data_ptr<float>();
  auto out = flat ? at::empty({B * L, H * D}, qkv.options()) : at::empty({B, L, H * D}, qkv.options());
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "attend", [&] {
    const scalar_t* X = qkv.data_ptr<scalar_t>();
    scalar_t* O = out.data_ptr<scalar_t>();
    // RoPE (half-split, as HF's rotate_half) on q into Q and on k into the pool; v into the pool
    for (int64_t b = 0; b < B; ++b) {
      for (int64_t j = 0; j < L; ++j) {
        const int64_t row = b * L + j, p = st[b] + j;
        const scalar_t* x = X + row * W;
        const float *c = cp + row * half, *s = sp + row * half;
        for (int64_t h = 0; h < H + Hkv; ++h) {
          const scalar_t* src = x + h * D;
          float* dst = h < H ? Q + (row * H + h) * D : K + ((sl[b] * Hkv + (h - H)) * cap + p) * D;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = static_cast<float>(src[i]), x2 = static_cast<float>(src[i + half]);
            const float a = x1 * c[i], bb = x2 * s[i], a2 = x2 * c[i], b2 = x1 * s[i];
            dst[i] = a - bb;
            dst[i + half] = a2 + b2;
          }
        }
        for (int64_t g = 0; g < Hkv; ++g) {
          const scalar_t* src = x + (H + Hkv + g) * D;
          float* dst = V + ((sl[b] * Hkv + g) * cap + p) * D;
          for (int64_t i = 0; i < D; ++i) dst[i] = static_cast<float>(src[i]);
        }
      }
    }
    // attention, one (row, position, head) at a time: softmax(q k^T * scale) v over keys [0, p]
    const int64_t rep = H / Hkv;
    const bool lanes = D % kLanes == 0;  // every model we serve (head_dim 64 or 128); plain loops else
    at::parallel_for(0, B * L * H, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> w;
      std::vector<float> acc(D);
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t row = t / H, h = t % H, b = row / L, n = st[b] + row % L + 1;
        const float* q = Q + t * D;
        const float* k = K + (sl[b] * Hkv + h / rep) * cap * D;
        const float* v = V + (sl[b] * Hkv + h / rep) * cap * D;
        w.resize(n);
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < n; ++i) {
          const float* ki = k + i * D;
          float dot = 0.f;
          if (lanes) {
            dot = dotv(q, ki, D);
          } else {
            _Pragma("omp simd reduction(+ : dot)") for (int64_t d = 0; d < D; ++d) dot += q[d] * ki[d];
          }
          w[i] = dot * scale;
          m = w[i] > m ? w[i] : m;
        }
        float sum = 0.f;
        if (lanes) {
          sum = softmax_exp(w.data(), n, m);
        } else {
          for (int64_t i = 0; i < n; ++i) {
            w[i] = std::exp(w[i] - m);
            sum += w[i];
          }
        }
        if (lanes) {
          weighv(w.data(), v, n, D, acc.data());
        } else {
          std::fill(acc.begin(), acc.end(), 0.f);
          for (int64_t i = 0; i < n; ++i) {
            const float e = w[i];
            const float* vi = v + i * D;
            _Pragma("omp simd") for (int64_t d = 0; d < D; ++d) acc[d] += e * vi[d];
          }
        }
        const float inv = 1.0f / sum;
        scalar_t* o = O + row * H * D + h * D;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<scalar_t>(acc[d] * inv);
      }
    });
  });
  return out;
}

// A slice's decode step in one call (backends/torch/model.py: SliceModel._fused_forward), made once per plan: every
// block's norms, projections and attention as the Python loop over the ops above would run them, op for op (the
// same kernels, in the same order: the same numbers), with the GIL let go for the whole step. Called op by op, the
// compute thread took the GIL back ~9 times a layer, and each time waited on whatever Python the peer's event loop
// was running (a decode step of 19 layers: 3.0 ms alone, 4.7 ms beside a thread running Python 40 % of the time).
// A projection is dense (kind 0: x W^T, as nn.Linear without a bias) or group-quantized (kind 1: q4.cpp's
// together::q4_mm, kind 2: together::q8_mm, on tensors q, s, c and group size g).
using MMFn = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t);

struct Proj {
  int64_t kind;
  std::vector<at::Tensor> t;  // kind 0: {W}; kinds 1, 2: {q, s, c}
  int64_t g;
};

class Blocks {
 public:
  Blocks(std::vector<at::Tensor> attn_norms, std::vector<at::Tensor> ffn_norms,
         std::vector<std::tuple<int64_t, std::vector<at::Tensor>, int64_t>> projs, std::vector<int64_t> heads,
         std::vector<int64_t> kv_heads, c10::optional<at::Tensor> final_norm, double eps)
      : an_(std::move(attn_norms)), fn_(std::move(ffn_norms)), H_(std::move(heads)), Hkv_(std::move(kv_heads)),
        norm_(std::move(final_norm)), eps_(eps) {
    const size_t n = an_.size();
    TORCH_CHECK(n > 0 && fn_.size() == n && H_.size() == n && Hkv_.size() == n && projs.size() == 4 * n,
                "Blocks: 4 projections, 2 norms and head counts per block");
    for (auto& p : projs) {
      Proj q{std::get<0>(p), std::move(std::get<1>(p)), std::get<2>(p)};
      TORCH_CHECK((q.kind == 0 && q.t.size() == 1) || ((q.kind == 1 || q.kind == 2) && q.t.size() == 3),
                  "Blocks: a projection is (0, [W], 0) or (1 or 2, [q, s, c], g)");
      if (q.kind != 0 && !mm_[q.kind - 1]) {
        const char* name = q.kind == 1 ? "together::q4_mm" : "together::q8_mm";
        auto op = c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
        mm_[q.kind - 1] = std::make_shared<c10::TypedOperatorHandle<MMFn>>(op.typed<MMFn>());
      }
      p_.push_back(std::move(q));
    }
  }

  // x: (B L, C) rows; cos, sin, pk, pv, slots, starts as attend's. Returns (B L, C): the last block's output,
  // final-normed when the slice holds the norm
  at::Tensor forward(at::Tensor x, at::Tensor cos, at::Tensor sin, at::Tensor pk, at::Tensor pv, at::Tensor slots,
                     at::Tensor starts) const {
    at::Tensor h = x, y = x, xn;
    for (size_t i = 0; i < an_.size(); ++i) {
      if (i == 0) {
        xn = rmsnorm(x, an_[i], eps_);
      } else {  // the previous block's MLP residual, then this block's norm
        auto r = add_rmsnorm(h, y, an_[i], eps_);
        x = r[0], xn = r[1];
      }
      const at::Tensor qkv = mm(p_[4 * i], xn);
      const at::Tensor o = attend(qkv, cos, sin, pk, pv, static_cast<int64_t>(i), slots, starts, H_[i], Hkv_[i]);
      auto r = add_rmsnorm(x, mm(p_[4 * i + 1], o), fn_[i], eps_);
      h = r[0];
      auto gu = mm(p_[4 * i + 2], r[1]).chunk(2, -1);
      y = mm(p_[4 * i + 3], at::silu(gu[0]) * gu[1]);
    }
    return norm_.has_value() ? add_rmsnorm(h, y, *norm_, eps_)[1] : h + y;
  }

 private:
  at::Tensor mm(const Proj& p, const at::Tensor& x) const {
    if (p.kind == 0) return at::linear(x, p.t[0]);
    return mm_[p.kind - 1]->call(x, p.t[0], p.t[1], p.t[2], p.g);
  }

  std::vector<at::Tensor> an_, fn_;
  std::vector<Proj> p_;
  std::vector<int64_t> H_, Hkv_;
  c10::optional<at::Tensor> norm_;
  double eps_;
  std::shared_ptr<c10::TypedOperatorHandle<MMFn>> mm_[2];
};

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<Blocks>(m, "Blocks")
      .def(py::init<std::vector<at::Tensor>, std::vector<at::Tensor>,
                    std::vector<std::tuple<int64_t, std::vector<at::Tensor>, int64_t>>, std::vector<int64_t>,
                    std::vector<int64_t>, c10::optional<at::Tensor>, double>())
      .def("forward", &Blocks::forward, py::call_guard<py::gil_scoped_release>(),
           "a decode step through every block (the GIL let go throughout)");
  m.def("rmsnorm", &rmsnorm, py::call_guard<py::gil_scoped_release>(), "weight * rmsnorm(x)");
  m.def("add_rmsnorm", &add_rmsnorm, py::call_guard<py::gil_scoped_release>(), "(x + a, weight * rmsnorm(x + a))");
  m.def("attend", &attend, py::call_guard<py::gil_scoped_release>(), "RoPE, KV append and decode attention over the pool");
}
