// A Llama decoder layer in two calls on the CPU, for float32 weights and the int8-activation (a8) formats.
//
// At batch 1 a layer's linears take ~0.2 ms, and the ~60 small torch ops around them (norms, RoPE,
// splits, silu, residual adds) cost about as much again in dispatch alone. Here they are plain loops
// around the linears: float32 ones (linear_f32 below) or the a8 ones of cpu_quant_linear.cpp:
//   attn_in       x -> rms_norm -> qkv_proj -> RoPE on q and k -> q, k, v
//   attn_out_mlp  (x, attention output) -> o_proj -> + x -> rms_norm -> gate_up_proj
//                 -> silu(gate) * up -> down_proj -> + residual
// Between them, the KV write and the attention: the cache's own (any cache, any number of rows M = B * T),
// or, for a few rows over a contiguous cache or a batch of decodes over the paged pool, attn_cached /
// attn_paged: attn_in, then the write and the attention in place (no views, no SDPA dispatch).
// llama.cpp reaches the same end with its graph of ggml ops (no interpreter between them); vLLM's CPU
// backend fuses the norms and activations into ops of their own (csrc/cpu/).
// The plain path is DecoderLayer.forward in minfer/model.py; tests/test_fused_layer.py holds them equal.
#define MINFER_NO_MODULE
#include "cpu_quant_linear.cpp"

// x (M, h) -> x * rsqrt(mean(x^2) + eps) * w, as minfer.model.rms_norm.
static torch::Tensor rms_norm_rows(const torch::Tensor& x, const torch::Tensor& w, double eps) {
    const int64_t M = x.size(0), h = x.size(1);
    auto y = torch::empty_like(x);
    const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m) {
        const float* r = xp + m * h;
        double ss = 0.0;                            // in double: the scale as torch's within an ulp
        for (int64_t k = 0; k < h; ++k) ss += (double)r[k] * r[k];
        const float s = (float)(1.0 / std::sqrt(ss / (double)h + eps));
        float* o = yp + m * h;                       // x * s, then times w: torch's order (two loops,
        for (int64_t k = 0; k < h; ++k) o[k] = r[k] * s;     // or -ffast-math makes it (w * x) * s)
        for (int64_t k = 0; k < h; ++k) o[k] *= wp[k];
    }
    return y;
}

#ifdef __AVX512F__
#include <immintrin.h>
#endif

// <w, x> over K floats. The row is read once, in memory order, into two vector accumulators (so
// that consecutive FMAs do not wait on each other); the last 1-31 values with a masked load.
static inline float dot_f32(const float* w, const float* x, int64_t K) {
#ifdef __AVX512F__
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k), _mm512_loadu_ps(x + k), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + k + 16), _mm512_loadu_ps(x + k + 16), a1);
    }
    for (; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + k), _mm512_maskz_loadu_ps(m, x + k), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#elif defined(MINFER_A8)                            // AVX2 + FMA: four 8-float accumulators
    __m256 a[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int64_t k = 0;
    for (; k + 32 <= K; k += 32)
        for (int j = 0; j < 4; ++j)
            a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8 * j), _mm256_loadu_ps(x + k + 8 * j), a[j]);
    for (; k + 8 <= K; k += 8) a[0] = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a[0]);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3])));
    for (; k < K; ++k) s += w[k] * x[k];
    return s;
#else
    float s = 0.0f;                                 // -ffast-math lets the compiler vectorize this
    for (int64_t k = 0; k < K; ++k) s += w[k] * x[k];
    return s;
#endif
}

// x (M, K) @ w^T, w float32 (N, K) -> (M, N). One row (batch-1 decode) is a GEMV that needs only
// to stream w once. torch's 1-row F.linear reads an (N, K) weight at about half the rate of a
// plain .sum() over it on one core (docs/measuring.md); the loop below reads w row after row, in
// memory order, which the hardware prefetchers follow, and keeps up with the .sum(). Only a large
// weight (the LM head: 16M values and up) is split over the threads: a parallel region ends when
// every thread has finished, and on a busy machine a thread's wake-up can take a scheduler slice
// (milliseconds), far more than a layer's GEMV gains from a second core. More rows (prefill) go to
// at::linear, the plain path's own GEMM.
torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w) {
    TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && w.is_contiguous() &&
                x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32,
                "linear_f32: x (M, K) and a contiguous w (N, K), both float32");
    if (x.size(0) != 1)
        return at::linear(x, w);
    const int64_t N = w.size(0), K = w.size(1);
    auto xc = x.contiguous();
    auto y = torch::empty({1, N}, x.options());
    const float *xp = xc.data_ptr<float>(), *wp = w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, N, N * K >= (int64_t(1) << 24) ? 256 : N, [&](int64_t n0, int64_t n1) {
        for (int64_t n = n0; n < n1; ++n) yp[n] = dot_f32(wp + n * K, xp, K);
    });
    return y;
}

// Linear i of a layer: w[2i] float32 (N, K) (w[2i + 1], br unused), or the a8 pair [u, ab], [bits, r].
static torch::Tensor linear(const torch::Tensor& x, const std::vector<torch::Tensor>& w,
                            const std::vector<int64_t>& br, int i) {
    if (w[2 * i].scalar_type() == torch::kFloat32)
        return linear_f32(x, w[2 * i]);
    return linear_a8(x, w[2 * i], w[2 * i + 1], br[2 * i], br[2 * i + 1]);
}

// x (B, T, h) float32; w, br: qkv_proj as linear() takes it; cos, sin (B*T, hd), rotate-half tables
// (both halves equal) -> (M, (nh + 2 nkv) * hd): each row's q heads, then k, then v, q and k rotated.
static torch::Tensor qkv_rope(const torch::Tensor& x, const torch::Tensor& norm_w, double eps,
                              const std::vector<torch::Tensor>& w, const std::vector<int64_t>& br,
                              const torch::Tensor& cos, const torch::Tensor& sin, int64_t nh, int64_t nkv, int64_t hd) {
    const int64_t M = x.size(0) * x.size(1), n = (nh + 2 * nkv) * hd, half = hd / 2;
    TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == M * hd && sin.numel() == M * hd,
                "attn_in: cos and sin must be contiguous (B*T, head_dim)");
    auto y = linear(rms_norm_rows(x.reshape({M, x.size(2)}).contiguous(), norm_w, eps), w, br, 0);
    TORCH_CHECK(y.size(1) == n, "attn_in: qkv_proj gives ", y.size(1), " outputs, the heads need ", n);
    float* yp = y.data_ptr<float>();
    const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)                 // q and k heads: (a, b) -> (a cos - b sin, b cos + a sin)
        for (int64_t head = 0; head < nh + nkv; ++head) {
            float* v = yp + m * n + head * hd;
            const float *c = cp + m * hd, *s = sp + m * hd;
            for (int64_t i = 0; i < half; ++i) {
                const float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    return y;
}

// As qkv_rope -> q (B, nh, T, hd), k, v (B, nkv, T, hd): views of its one (M, n*hd) buffer.
std::vector<torch::Tensor> attn_in(torch::Tensor x, torch::Tensor norm_w, double eps,
                                   std::vector<torch::Tensor> w, std::vector<int64_t> br,
                                   torch::Tensor cos, torch::Tensor sin, int64_t nh, int64_t nkv, int64_t hd) {
    const int64_t B = x.size(0), T = x.size(1);
    auto y = qkv_rope(x, norm_w, eps, w, br, cos, sin, nh, nkv, hd);
    auto heads = [&](int64_t first, int64_t count) {   // (M, count*hd) columns -> (B, count, T, hd)
        return y.narrow(1, first * hd, count * hd).view({B, T, count, hd}).transpose(1, 2);
    };
    return {heads(0, nh), heads(nh, nkv), heads(nh + nkv, nkv)};
}

// Softmax attention of the g query heads q (g, hd) that share one K/V head over its keys
// first .. end-1 (krow(s), vrow(s): key / value s, hd floats) -> out (g, hd). scale 1/sqrt(hd),
// float32 throughout, as SDPA's CPU kernel; sc: g * (end - first) floats of scratch. Two passes
// over the keys (scores, then the weighted values), as vLLM's CPU decode kernel (csrc/cpu/attention.cpp,
// paged_attention_v1) and cpu_paged_decode.cpp; llama.cpp's flash_attn_ext does one online pass.
template <typename K, typename V>
static void attend_group(const float* q, float* out, int64_t g, int64_t hd, int64_t first, int64_t end,
                         K krow, V vrow, float* sc) {
    const int64_t n = end - first;
    const float scale = 1.0f / std::sqrt((float)hd);
    for (int64_t s = first; s < end; ++s)
        for (int64_t j = 0; j < g; ++j) sc[j * n + s - first] = scale * dot_f32(krow(s), q + j * hd, hd);
    for (int64_t j = 0; j < g; ++j) {               // softmax numerators; out_j starts at 0
        float* p = sc + j * n;
        float mx = p[0], sum = 0.0f;
        for (int64_t i = 1; i < n; ++i) mx = std::max(mx, p[i]);
        for (int64_t i = 0; i < n; ++i) sum += (p[i] = std::exp(p[i] - mx));
        for (int64_t i = 0; i < n; ++i) p[i] /= sum;
        std::fill(out + j * hd, out + (j + 1) * hd, 0.0f);
    }
    for (int64_t s = first; s < end; ++s) {         // out_j += p_j[s] * v_s
        const float* v = vrow(s);
        for (int64_t j = 0; j < g; ++j) {
            const float p = sc[j * n + s - first];
            float* o = out + j * hd;
            for (int64_t d = 0; d < hd; ++d) o[d] += p * v[d];
        }
    }
}

// The KV write and the attention of attn_cached / attn_paged. y (M, (nh + 2 nkv) * hd): qkv_rope's rows;
// at(m, h, t): where key (in kc) and value (in vc) t of row m's K/V head h are. Row m writes its k, v
// at t = end[m] - 1 (its own position); then, every row written, its query head j attends over K/V
// head j / (nh / nkv) at t in [end[m] - window, end[m]) (from 0 when window = 0) -> (M, nh*hd).
template <typename At>
static torch::Tensor write_attend(const torch::Tensor& y, float* kc, float* vc, At at, const int64_t* end,
                                  int64_t nh, int64_t nkv, int64_t hd, int64_t window) {
    const int64_t M = y.size(0), n = y.size(1), g = nh / nkv;
    const float* yp = y.data_ptr<float>();
    int64_t longest = 0;
    for (int64_t m = 0; m < M; ++m) {               // the KV write (the plain path's index_copy_)
        longest = std::max(longest, end[m]);
        for (int64_t h = 0; h < nkv; ++h) {
            std::copy_n(yp + m * n + (nh + h) * hd, hd, kc + at(m, h, end[m] - 1));
            std::copy_n(yp + m * n + (nh + nkv + h) * hd, hd, vc + at(m, h, end[m] - 1));
        }
    }
    auto out = torch::empty({M, nh * hd}, y.options());
    float* op = out.data_ptr<float>();
    // One item per (row, K/V head), split over the threads only for long contexts (linear_f32 says
    // what a parallel region can cost). Measured, SmolLM2's 9 heads, 2 cores, int4-a8 layer: 100 keys
    // no gain; 1000 keys 188 -> 165 us a layer; 4000 keys 458 -> 343 us.
    at::parallel_for(0, M * nkv, longest * nh >= (1 << 13) ? 1 : M * nkv, [&](int64_t i0, int64_t i1) {
        std::vector<float> sc(g * longest);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t m = i / nkv, h = i % nkv;
            const int64_t first = window > 0 ? std::max<int64_t>(0, end[m] - window) : 0;
            attend_group(yp + m * n + h * g * hd, op + m * nh * hd + h * g * hd, g, hd, first, end[m],
                         [&](int64_t t) { return kc + at(m, h, t); }, [&](int64_t t) { return vc + at(m, h, t); },
                         sc.data());
        }
    });
    return out;
}

#define ATTN_IN_ARGS torch::Tensor x, torch::Tensor norm_w, double eps, std::vector<torch::Tensor> w, \
    std::vector<int64_t> br, torch::Tensor cos, torch::Tensor sin, int64_t nh, int64_t nkv, int64_t hd

static void check_cache(const torch::Tensor& c, int64_t dims, int64_t nkv, int64_t hd, int64_t nh, const char* what) {
    TORCH_CHECK(c.dim() == dims && c.is_contiguous() && c.scalar_type() == torch::kFloat32 && c.device().is_cpu() &&
                c.size(dims - 1) == hd && nh % nkv == 0, what);
}

// attn_in, the KV write and the attention in one call, over a contiguous cache (minfer/kv/contiguous.py):
// k_cache, v_cache (L, B, nkv, max_len, hd), slot t holds position t; row (b, t) of x at positions[b, t]
// sees slots 0 .. positions[b, t]: the plain path's update + attend. -> (B*T, nh*hd), for attn_out_mlp.
torch::Tensor attn_cached(ATTN_IN_ARGS, torch::Tensor k_cache, torch::Tensor v_cache, int64_t layer,
                          torch::Tensor positions, int64_t window) {
    const int64_t B = x.size(0), T = x.size(1), M = B * T;
    check_cache(k_cache, 5, nkv, hd, nh, "attn_cached: k_cache must be contiguous float32 (L, B, nkv, max_len, hd)");
    TORCH_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.is_contiguous() && v_cache.dtype() == k_cache.dtype(),
                "attn_cached: v_cache must be as k_cache");
    const int64_t S = k_cache.size(3);
    TORCH_CHECK(layer >= 0 && layer < k_cache.size(0) && k_cache.size(1) == B && k_cache.size(2) == nkv &&
                positions.numel() == M && positions.scalar_type() == torch::kLong,
                "attn_cached: the cache or positions (B, T), int64, do not fit the layer");
    auto pos = positions.contiguous();
    std::vector<int64_t> end(pos.data_ptr<int64_t>(), pos.data_ptr<int64_t>() + M);
    for (int64_t& e : end) {
        TORCH_CHECK(e >= 0 && e < S, "attn_cached: position ", e, " outside the cache's ", S, " slots");
        e += 1;                                     // keys 0 .. position
    }
    auto y = qkv_rope(x, norm_w, eps, w, br, cos, sin, nh, nkv, hd);    // (M, (nh + 2 nkv) * hd)
    const int64_t per_layer = B * nkv * S * hd;
    auto at = [&](int64_t m, int64_t h, int64_t t) { return ((m / T * nkv + h) * S + t) * hd; };
    return write_attend(y, k_cache.data_ptr<float>() + layer * per_layer, v_cache.data_ptr<float>() + layer * per_layer,
                        at, end.data(), nh, nkv, hd, window);
}

// The same over the paged pool (minfer/kv/paged.py), for a batch of decodes (x (1, S, h): one new token
// per sequence): kv (L, 2, blocks, block_size, nkv, hd); sequence m's key t is in block
// block_tables[m, t / block_size] at offset t % block_size; its context is seq_lens[m] keys, the last
// one its own, written at slot_mapping[m] (checked). vLLM: reshape_and_cache, then paged_attention_v1.
torch::Tensor attn_paged(ATTN_IN_ARGS, torch::Tensor kv, int64_t layer, torch::Tensor slot_mapping,
                         torch::Tensor block_tables, torch::Tensor seq_lens, int64_t window) {
    const int64_t M = x.size(0) * x.size(1);
    check_cache(kv, 6, nkv, hd, nh, "attn_paged: kv must be contiguous float32 (L, 2, blocks, block_size, nkv, hd)");
    const int64_t nb = kv.size(2), bs = kv.size(3), maxb = block_tables.size(1);
    auto tables = block_tables.contiguous(), lens = seq_lens.contiguous(), slots = slot_mapping.contiguous();
    for (const auto& t : {tables, lens, slots})
        TORCH_CHECK(t.scalar_type() == torch::kLong, "attn_paged: block_tables, seq_lens, slot_mapping must be int64");
    TORCH_CHECK(layer >= 0 && layer < kv.size(0) && kv.size(4) == nkv && tables.size(0) == M && lens.numel() == M &&
                slots.numel() == M, "attn_paged: the pool or the batch's tables do not fit the layer");
    const int64_t *tp = tables.data_ptr<int64_t>(), *end = lens.data_ptr<int64_t>(), *sp = slots.data_ptr<int64_t>();
    for (int64_t m = 0; m < M; ++m) {
        TORCH_CHECK(end[m] >= 1 && end[m] <= maxb * bs, "attn_paged: seq_lens[", m, "] = ", end[m], " out of range");
        for (int64_t j = 0; j < (end[m] + bs - 1) / bs; ++j)
            TORCH_CHECK(tp[m * maxb + j] >= 0 && tp[m * maxb + j] < nb, "attn_paged: a block outside the pool");
        TORCH_CHECK(sp[m] == tp[m * maxb + (end[m] - 1) / bs] * bs + (end[m] - 1) % bs,
                    "attn_paged: slot_mapping[", m, "] is not the last position's slot");
    }
    auto y = qkv_rope(x, norm_w, eps, w, br, cos, sin, nh, nkv, hd);    // (M, (nh + 2 nkv) * hd)
    float* kc = kv.data_ptr<float>() + layer * 2 * nb * bs * nkv * hd;
    auto at = [&](int64_t m, int64_t h, int64_t t) { return ((tp[m * maxb + t / bs] * bs + t % bs) * nkv + h) * hd; };
    return write_attend(y, kc, kc + nb * bs * nkv * hd, at, end, nh, nkv, hd, window);
}

// x (B, T, h), attn (B, nh, T, hd) or attn_cached's (B*T, nh*hd); w, br: o_proj, gate_up_proj,
// down_proj as linear() takes them -> the layer's output (B, T, h).
torch::Tensor attn_out_mlp(torch::Tensor x, torch::Tensor attn, torch::Tensor norm_w, double eps,
                           std::vector<torch::Tensor> w, std::vector<int64_t> br) {
    const int64_t B = x.size(0), T = x.size(1), h = x.size(2), M = B * T;
    auto a = attn.dim() == 2 ? attn : attn.transpose(1, 2).reshape({M, -1}).contiguous();   // (M, nh*hd)
    auto r = linear(a, w, br, 0);                                         // (M, h), becomes x + o
    const float* xp = x.contiguous().data_ptr<float>();
    float* rp = r.data_ptr<float>();
    for (int64_t i = 0; i < M * h; ++i) rp[i] += xp[i];
    auto gu = linear(rms_norm_rows(r, norm_w, eps), w, br, 1);            // (M, 2f)
    const int64_t f = gu.size(1) / 2;
    auto act = torch::empty({M, f}, x.options());
    const float* g = gu.data_ptr<float>();
    float* ap = act.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < f; ++j) {
            const float gate = g[m * 2 * f + j];
            ap[m * f + j] = gate / (1.0f + std::exp(-gate)) * g[m * 2 * f + f + j];
        }
    auto out = linear(act, w, br, 2);                                     // (M, h)
    float* op = out.data_ptr<float>();
    for (int64_t i = 0; i < M * h; ++i) op[i] += rp[i];
    return out.view({B, T, h});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("a8_isa", &a8_isa, "the instructions the a8 linears were compiled for ('' when they do not run)");
    m.def("linear_f32", &linear_f32, "float32 linear; one row by a GEMV streaming the weight once");
    m.def("attn_in", &attn_in, "rms_norm -> qkv_proj -> RoPE: q, k, v");
    m.def("attn_cached", &attn_cached, "attn_in, then the KV write and attention over a contiguous cache");
    m.def("attn_paged", &attn_paged, "attn_in, then the KV write and decode attention over the paged pool");
    m.def("attn_out_mlp", &attn_out_mlp, "o_proj -> residual -> rms_norm -> SwiGLU MLP -> residual");
}
