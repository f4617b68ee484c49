// W8A8 / W4A8 linears on the CPU: int8 activations, integer dot products (AVX-512 VNNI).
//
// y[m, n] = sum_k x[m, k] * w[n, k], with both sides quantized:
//   activations, at run time, per row in blocks of 32 (llama.cpp's Q8_1):
//       x[k] ~ dx[g] * xq[k],  xq int8 in [-127, 127],  dx[g] = max |x| over block g / 127,
//       sx[g] = dx[g] * sum of xq over block g
//   weights, once, in blocks of 32 values (a weight group of r blocks shares its two floats):
//       w[k] = a * u[k] + b,  u unsigned: 0..15 (4-bit) or 0..255 (8-bit, int8 + 128)
// so one block's contribution is an integer dot product and two scalings:
//       sum_{k in g} x[k] w[k] ~ dx[g] * (a * <u, xq>_g + b * sum xq) = a * dx[g] * <u, xq>_g + b * sx[g]
// <u, xq> is VPDPBUSD: unsigned bytes times signed bytes, four products summed into each int32 lane,
// exact (on a CPU with AVX2 but no AVX-512 VNNI: VPMADDUBSW + VPMADDWD, see dot_u8_i8).
// llama.cpp's ggml_vec_dot_q4_1_q8_1 and ggml_vec_dot_q8_0_q8_0 (ggml-cpu/arch/x86/quants.c)
// compute the same sums.
//
// Weight layout (packed once by minfer/kernels/cpu_quant_linear.py):
//   u   uint8 (N, K)      8-bit: one byte per value
//       uint8 (N, K / 2)  4-bit: 16 bytes per block; byte j holds value j (low nibble) and
//                         value j + 16 (high nibble), the GGUF Q4_0 / Q4_1 order
//   ab  float (N, G / r, 2)   (a, b) per weight group
// 4-bit weights with one (a, b) per block go two blocks at a time (dot_row4_pairs), the rest one
// block per 256-bit product (dot_row). K is a multiple of 32 (the caller pads). The plain-torch
// reference of all of this is linear_a8_reference in cpu_quant_linear.py; tests/test_quant_a8.py
// holds the two equal.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512VNNI__) && defined(__AVX512VL__) && defined(__AVX512BW__)
#define MINFER_VNNI 1
#endif
#if defined(MINFER_VNNI) || (defined(__AVX2__) && defined(__FMA__))
#define MINFER_A8 1
#include <immintrin.h>
#endif

constexpr int64_t QK = 32;  // values per block

// The instructions the kernels below were compiled for: "avx512-vnni", "avx2" (no VNNI: each
// VPDPBUSD becomes VPMADDUBSW + VPMADDWD, as llama.cpp's AVX2 path does), or "" (they do not run).
std::string a8_isa() {
#if defined(MINFER_VNNI)
    return "avx512-vnni";
#elif defined(MINFER_A8)
    return "avx2";
#else
    return "";
#endif
}

#ifdef MINFER_A8

// One row x (K) -> xq (K) int8, dx and sx (K / 32). Rounds to nearest, ties to even (as torch.round).
#ifdef MINFER_VNNI
static void quantize_row(const float* x, int64_t K, int8_t* xq, float* dx, float* sx) {
    const __m512 sign = _mm512_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / QK; ++g) {
        __m512 v0 = _mm512_loadu_ps(x + g * QK), v1 = _mm512_loadu_ps(x + g * QK + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_andnot_ps(sign, v0), _mm512_andnot_ps(sign, v1)));
        float d = amax * (1.0f / 127.0f), id = d > 0.0f ? 1.0f / d : 0.0f;  // as the reference
        __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(id)));   // |q| <= 127
        __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(id)));
        _mm_storeu_si128((__m128i*)(xq + g * QK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i*)(xq + g * QK + 16), _mm512_cvtsepi32_epi8(q1));
        dx[g] = d;
        sx[g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}
#else
static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

static void quantize_row(const float* x, int64_t K, int8_t* xq, float* dx, float* sx) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t g = 0; g < K / QK; ++g) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + g * QK + 8 * i);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[i]));
        }
        const float d = hmax(mx) * (1.0f / 127.0f), id = d > 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(id)));
        // int32 -> int8 packs within 128-bit lanes; the permute puts the 4-byte groups back in order
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i*)(xq + g * QK),
                            _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
        const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
        s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
        dx[g] = d;
        sx[g] = d * (float)_mm_cvtsi128_si32(s);
    }
}
#endif

// Block g of a 4-bit row: 16 bytes -> 32 values 0..15 in order (low nibbles, then high nibbles).
static inline __m256i nibbles(const uint8_t* p) {
    __m128i b = _mm_loadu_si128((const __m128i*)p);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), _mm256_set1_epi8(0x0F));
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 8 int32 lanes, each the exact sum of 4 adjacent products u * x (u unsigned, x signed bytes).
template <int BITS>
static inline __m256i dot_u8_i8(__m256i u, __m256i x) {
#ifdef MINFER_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x);
#else
    const __m256i ones = _mm256_set1_epi16(1);
    if (BITS == 4)                   // VPMADDUBSW's int16 pair sums stay within 2 * 15 * 127
        return _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones);
    // 8-bit: 2 * 255 * 127 would saturate int16, so this returns <q, x> for the signed q = u - 128,
    // as <|q|, sign(q) x> (pair sums within 2 * 128 * 127); the caller adds 128 <1, x> through b
    // (kShift8 below).
    const __m256i q = _mm256_xor_si256(u, _mm256_set1_epi8((char)0x80));
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)), ones);
#endif
}

// What dot_u8_i8<8> leaves out: it returns <u - kShift8, x>, so a block's b * sum(x) term takes
// b + kShift8 * a, which turns the stored b = b0 - 128 a (pack in the .py) back into b0.
#ifdef MINFER_VNNI
constexpr float kShift8 = 0.0f;
#else
constexpr float kShift8 = 128.0f;
#endif

// Block g as 8 float lanes, each the exact integer sum of 4 of its 32 products u * xq.
template <int BITS>
static inline __m256 block_dot(const uint8_t* u, const int8_t* xq, int64_t g) {
    __m256i w = BITS == 4 ? nibbles(u + g * QK / 2) : _mm256_loadu_si256((const __m256i*)(u + g * QK));
    __m256i x = _mm256_loadu_si256((const __m256i*)(xq + g * QK));
    return _mm256_cvtepi32_ps(dot_u8_i8<BITS>(w, x));
}

// The 4-bit, one-(a, b)-per-block case (Q4_0, Q4_1, int4-g32) with G even, two blocks per 512-bit
// VPDPBUSD. A pair's 32 packed bytes hold [lo g | lo g+1] and, shifted, [hi g | hi g+1]; the
// activations come in the same order (pair_order below). The scales of eight blocks at a time are
// one vector product: ab (a0 b0 a1 b1 ...) times dxsx (dx0 sx0 dx1 sx1 ...) gives a * dx in the
// even lanes, one permute spreads a pair's two over its lanes, and b * sx (odd lanes) is summed.
static void pair_order(const int8_t* xq, int64_t K, int8_t* xp) {
    for (int64_t g = 0; g + 1 < K / QK; g += 2)
        for (int h = 0; h < 2; ++h) {
            std::copy(xq + g * QK + 16 * h, xq + g * QK + 16 * h + 16, xp + g * QK + 32 * h);
            std::copy(xq + (g + 1) * QK + 16 * h, xq + (g + 1) * QK + 16 * h + 16, xp + g * QK + 32 * h + 16);
        }
}

#ifdef MINFER_VNNI
static float dot_row4_pairs(const uint8_t* u, const float* ab, const int8_t* xp, const float* dxsx,
                            int64_t G) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    __m512 acc = _mm512_setzero_ps(), bacc = _mm512_setzero_ps();
    for (int64_t c = 0; c < G; c += 8) {
        const int64_t nb = std::min<int64_t>(8, G - c);
        const __mmask16 m = (__mmask16)((1u << (2 * nb)) - 1);
        const __m512 prod = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, ab + 2 * c), _mm512_maskz_loadu_ps(m, dxsx + 2 * c));
        bacc = _mm512_mask_add_ps(bacc, m & 0xAAAA, bacc, prod);
        for (int64_t p = 0; p < nb / 2; ++p) {
            const int64_t g = c + 2 * p;
            const __m256i b = _mm256_loadu_si256((const __m256i*)(u + g * QK / 2));
            const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low)),
                                                 _mm256_and_si256(_mm256_srli_epi16(b, 4), low), 1);
            const __m512i x = _mm512_loadu_si512((const void*)(xp + g * QK));
            const __m512 d = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), w, x));
            const int i = 4 * (int)p, j = i + 2;
            const __m512i idx = _mm512_set_epi32(j, j, j, j, i, i, i, i, j, j, j, j, i, i, i, i);
            acc = _mm512_fmadd_ps(d, _mm512_permutexvar_ps(idx, prod), acc);
        }
    }
    return _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(bacc);
}
#else
// The same on 256 bits (AVX2): a pair's [lo g | lo g+1] and [hi g | hi g+1] each take one
// VPMADDUBSW against their 32 activations, the int16 sums of the two add (within 4 * 15 * 127),
// and one VPMADDWD leaves block g in lanes 0-3 and block g+1 in lanes 4-7 (pair_dot). Four
// blocks' scales are one vector product, spread over a pair's lanes by one permute.
static inline __m256 pair_dot(const uint8_t* u, const int8_t* xp, int64_t g) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i b = _mm256_loadu_si256((const __m256i*)(u + g * QK / 2));
    const __m256i lo = _mm256_and_si256(b, low), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
    const __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xp + g * QK))),
                                         _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xp + g * QK + 32))));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
}

static float dot_row4_pairs(const uint8_t* u, const float* ab, const int8_t* xp, const float* dxsx,
                            int64_t G) {
    const __m256i first = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), second = _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6);
    const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps(), bacc = _mm256_setzero_ps();
    int64_t g = 0;
    for (; g + 4 <= G; g += 4) {                    // two pairs: two FMA chains
        const __m256 prod = _mm256_mul_ps(_mm256_loadu_ps(ab + 2 * g), _mm256_loadu_ps(dxsx + 2 * g));
        bacc = _mm256_add_ps(bacc, _mm256_and_ps(prod, odd));           // b * sx of the four
        acc0 = _mm256_fmadd_ps(pair_dot(u, xp, g), _mm256_permutevar8x32_ps(prod, first), acc0);
        acc1 = _mm256_fmadd_ps(pair_dot(u, xp, g + 2), _mm256_permutevar8x32_ps(prod, second), acc1);
    }
    if (g < G) {                                    // a last pair
        const __m128 prod = _mm_mul_ps(_mm_loadu_ps(ab + 2 * g), _mm_loadu_ps(dxsx + 2 * g));
        const __m256 p8 = _mm256_insertf128_ps(_mm256_setzero_ps(), prod, 0);
        bacc = _mm256_add_ps(bacc, _mm256_and_ps(p8, odd));
        acc0 = _mm256_fmadd_ps(pair_dot(u, xp, g), _mm256_permutevar8x32_ps(p8, first), acc0);
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + hsum(bacc);
}
#endif  // MINFER_VNNI

// One output: sum over the G blocks of a * dx[g] * <u, xq>_g + b * sx[g], (a, b) = ab[g / r].
// Blocks go in pairs into two accumulators, so that consecutive FMAs do not wait on each other.
template <int BITS>
static float dot_row(const uint8_t* u, const float* ab, int64_t r, const int8_t* xq, const float* dx,
                     const float* sx, int64_t G) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float b0 = 0.0f, b1 = 0.0f;
    const float shift = BITS == 8 ? kShift8 : 0.0f;
    if (r == 1) {                                   // one (a, b) per block: Q4_0, Q4_1, Q8_0, int4-g32
        int64_t g = 0;
        for (; g + 1 < G; g += 2) {
            const float* f = ab + 2 * g;
            acc0 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g), _mm256_set1_ps(f[0] * dx[g]), acc0);
            acc1 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g + 1), _mm256_set1_ps(f[2] * dx[g + 1]), acc1);
            b0 += (f[1] + shift * f[0]) * sx[g];
            b1 += (f[3] + shift * f[2]) * sx[g + 1];
        }
        if (g < G) {
            acc0 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g), _mm256_set1_ps(ab[2 * g] * dx[g]), acc0);
            b0 += (ab[2 * g + 1] + shift * ab[2 * g]) * sx[g];
        }
    } else {                                        // r blocks share (a, b): int8 rows, int4-g64 ...
        for (int64_t g = 0; g < G; ab += 2) {
            const float a = ab[0];
            const int64_t end = g + r;
            float s = 0.0f;
            for (; g + 1 < end; g += 2) {
                acc0 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g), _mm256_set1_ps(a * dx[g]), acc0);
                acc1 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g + 1), _mm256_set1_ps(a * dx[g + 1]), acc1);
                s += sx[g] + sx[g + 1];
            }
            if (g < end) {
                acc0 = _mm256_fmadd_ps(block_dot<BITS>(u, xq, g), _mm256_set1_ps(a * dx[g]), acc0);
                s += sx[g++];
            }
            b0 += (ab[1] + shift * a) * s;
        }
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + (b0 + b1);
}

#endif  // MINFER_A8

// x (M, K) float32 -> (xq int8 (M, K), dx (M, K/32), sx (M, K/32)): the activations' quantization.
std::vector<torch::Tensor> quantize_rows(torch::Tensor x) {
    TORCH_CHECK(!a8_isa().empty(), "minfer's int8-activation kernel needs AVX2 (or AVX-512 VNNI), which this CPU lacks");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.size(1) % QK == 0,
                "quantize_rows: x must be contiguous float32 (M, K) with K % 32 == 0");
    const int64_t M = x.size(0), K = x.size(1);
    auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
    auto dx = torch::empty({M, K / QK}, x.options()), sx = torch::empty({M, K / QK}, x.options());
#ifdef MINFER_A8
    for (int64_t m = 0; m < M; ++m)
        quantize_row(x.data_ptr<float>() + m * K, K, xq.data_ptr<int8_t>() + m * K,
                     dx.data_ptr<float>() + m * (K / QK), sx.data_ptr<float>() + m * (K / QK));
#endif
    return {xq, dx, sx};
}

// y (M, N) = x (M, K) @ W^T for W packed as above (bits 4 or 8, r blocks per weight group).
torch::Tensor linear_a8(torch::Tensor x, torch::Tensor u, torch::Tensor ab, int64_t bits, int64_t r) {
    auto q = quantize_rows(x);
    const int64_t M = x.size(0), K = x.size(1), N = u.size(0), G = K / QK;
    TORCH_CHECK(bits == 4 || bits == 8, "linear_a8: bits must be 4 or 8");
    TORCH_CHECK(u.scalar_type() == torch::kUInt8 && u.is_contiguous() && u.size(1) * (8 / bits) == K,
                "linear_a8: u must be contiguous uint8 (N, K * bits / 8)");
    TORCH_CHECK(ab.scalar_type() == torch::kFloat32 && ab.is_contiguous() && ab.size(0) == N &&
                ab.size(1) * r == G && ab.size(2) == 2, "linear_a8: ab must be float32 (N, K / 32 / r, 2)");
    auto y = torch::empty({M, N}, x.options());
#ifdef MINFER_A8
    const uint8_t* up = u.data_ptr<uint8_t>();
    const float* abp = ab.data_ptr<float>();
    const int8_t* xq = q[0].data_ptr<int8_t>();
    const float *dx = q[1].data_ptr<float>(), *sx = q[2].data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const int64_t row_bytes = K * bits / 8, ab_row = 2 * (G / r);
    // 4-bit weights with one (a, b) per block and an even block count take the pairs kernel, which
    // reads the activations in its own order and their two scales side by side.
    const bool pairs = bits == 4 && r == 1 && G % 2 == 0;
    std::vector<int8_t> xp_buf(pairs ? M * K : 0);                     // (M, K) in pair order
    std::vector<float> dxsx_buf(pairs ? M * 2 * G : 0);                 // (M, G, 2): dx, sx
    if (pairs) {
        for (int64_t m = 0; m < M; ++m) pair_order(xq + m * K, K, xp_buf.data() + m * K);
        for (int64_t i = 0; i < M * G; ++i) dxsx_buf[2 * i] = dx[i], dxsx_buf[2 * i + 1] = sx[i];
    }
    const int8_t* xp = xp_buf.data();
    const float* dxsx = dxsx_buf.data();
    auto one = [&](int64_t m, int64_t n) -> float {
        const uint8_t* w = up + n * row_bytes;
        if (pairs)
            return dot_row4_pairs(w, abp + n * ab_row, xp + m * K, dxsx + m * 2 * G, G);
        return bits == 4 ? dot_row<4>(w, abp + n * ab_row, r, xq + m * K, dx + m * G, sx + m * G, G)
                         : dot_row<8>(w, abp + n * ab_row, r, xq + m * K, dx + m * G, sx + m * G, G);
    };
    // Output rows are split over the threads, in tiles of 16 rows: a tile of W stays in L1/L2
    // while it serves every activation row, so W is read from memory once per call.
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
        for (int64_t t = n0; t < n1; t += 16)
            for (int64_t m = 0; m < M; ++m)
                for (int64_t n = t; n < std::min(t + 16, n1); ++n)
                    yp[m * N + n] = one(m, n);
    });
#endif
    return y;
}

#ifndef MINFER_NO_MODULE  // cpu_fused_layer.cpp includes this file and defines its own module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("a8_isa", &a8_isa, "the instructions the kernels were compiled for ('' when they do not run)");
    m.def("quantize_rows", &quantize_rows, "float32 rows -> int8 blocks of 32, their scales and scaled sums");
    m.def("linear_a8", &linear_a8, "int8-activation linear on packed 4- or 8-bit weights");
}
#endif
