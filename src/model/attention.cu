// Fused causal attention for the decoder on CUDA: one kernel per layer instead of the
// materialised path (scores matmul, mask add, softmax, values matmul over a [rows, keys] matrix).
//
// The FlashAttention-2 forward (Dao 2023, arXiv 2307.08691): each block holds 64 query rows of
// one head (16 per warp) and walks the key/value tiles of 64 positions up to the diagonal, with
// an online softmax in registers. Scores and outputs are bf16 tensor-core MMAs (m16n8k16,
// f32 accumulation); the scores' accumulator layout is the next MMA's A-fragment layout, so the
// probabilities never leave registers. Grouped-query attention reads KV head h / n_rep straight
// from the cache (no copy per query head). Head size 64 only.
//
// Compiled to PTX by build.rs (feature "cuda") and loaded through candle's custom-kernel cache.

#include <cuda_bf16.h>
#include <stdint.h>

#define HEAD 64
#define ROWS 64   // query rows per block: 4 warps x 16
#define KEYS 64   // keys per tile
#define LDS 72    // shared row stride (bf16): 64 + 8 makes the fragment loads conflict-free

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t load32(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// c += a (16x16, row-major) * b (16x8, column-major)
__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// q: [b, heads, t, 64] (strides q_sb, q_sh, q_st); k, v: [b, kv heads, kv_len, 64] (their
// strides); o: [b, t, heads, 64] contiguous (the layout the output projection reads); lse
// (may be null; training): [b, heads, t] f32, each row's log2-sum-exp2 of its scaled scores
// (what the backward pass recomputes the probabilities from).
// Query row i sits at position pos + i and sees keys 0..=pos + i. scale_log2: the score scale
// times log2(e) (the decoder's queries come pre-scaled: log2(e)).
extern "C" __global__ void __launch_bounds__(128) refrag_attention_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, __nv_bfloat16* __restrict__ o, float* __restrict__ lse,
    int t, int kv_len, int pos, int heads, int n_rep, float scale_log2, long long q_sb,
    long long q_sh, long long q_st, long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st) {
    __shared__ __align__(16) __nv_bfloat16 sk[KEYS * LDS];  // [key][d]
    __shared__ __align__(16) __nv_bfloat16 svt[HEAD * LDS]; // [d][key]

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    // the tiles nearest the end have the most keys: they start first
    const int tile = gridDim.x - 1 - blockIdx.x;
    const int h = blockIdx.y, b = blockIdx.z, kh = h / n_rep;
    const int row0 = tile * ROWS + warp * 16;
    const __nv_bfloat16* qb = q + b * q_sb + h * q_sh;
    const __nv_bfloat16* kb = k + b * k_sb + kh * k_sh;
    const __nv_bfloat16* vb = v + b * v_sb + kh * v_sh;

    // this warp's queries as A fragments, one per 16 dimensions (rows past t read as 0)
    const int r0 = row0 + g, r1 = row0 + g + 8;
    uint32_t qa[4][4];
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int c = kk * 16 + 2 * tq;
        qa[kk][0] = r0 < t ? load32(qb + r0 * q_st + c) : 0u;
        qa[kk][1] = r1 < t ? load32(qb + r1 * q_st + c) : 0u;
        qa[kk][2] = r0 < t ? load32(qb + r0 * q_st + c + 8) : 0u;
        qa[kk][3] = r1 < t ? load32(qb + r1 * q_st + c + 8) : 0u;
    }

    float acc[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;
    const int qp0 = pos + r0, qp1 = pos + r1;
    const int end = min(kv_len, pos + (tile + 1) * ROWS);
    const int tiles = (end + KEYS - 1) / KEYS;

    for (int kt = 0; kt < tiles; ++kt) {
        const int key0 = kt * KEYS;
        __syncthreads();
        // keys: coalesced 16-byte rows; values: one key per thread, stored transposed
        for (int i = tid; i < KEYS * HEAD / 8; i += 128) {
            const int key = i >> 3, dc = (i & 7) * 8;
            uint4 x = make_uint4(0, 0, 0, 0);
            if (key0 + key < kv_len) x = *reinterpret_cast<const uint4*>(kb + (key0 + key) * k_st + dc);
            *reinterpret_cast<uint4*>(&sk[key * LDS + dc]) = x;
        }
        for (int i = tid; i < KEYS * HEAD / 8; i += 128) {
            const int key = i & (KEYS - 1), dc = (i >> 6) * 8;
            uint4 x = make_uint4(0, 0, 0, 0);
            if (key0 + key < kv_len) x = *reinterpret_cast<const uint4*>(vb + (key0 + key) * v_st + dc);
            const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&x);
#pragma unroll
            for (int j = 0; j < 8; ++j) svt[(dc + j) * LDS + key] = e[j];
        }
        __syncthreads();
        if (key0 > pos + row0 + 15) continue;  // the whole tile is after this warp's rows

        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
                const __nv_bfloat16* p = &sk[(j * 8 + g) * LDS + kk * 16 + 2 * tq];
                mma16816(s[j], qa[kk], load32(p), load32(p + 8));
            }
        }
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = key0 + j * 8 + 2 * tq + e;
                if (key > qp0 || key >= kv_len) s[j][e] = -INFINITY;
                if (key > qp1 || key >= kv_len) s[j][2 + e] = -INFINITY;
                mx0 = fmaxf(mx0, s[j][e]);
                mx1 = fmaxf(mx1, s[j][2 + e]);
            }
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // key 0 is visible to every row and is in the first tile: the maxima are finite from
        // there on, and exp2(-inf) = 0 rescales the empty start
        const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
        const float a0 = exp2f((m0 - n0) * scale_log2), a1 = exp2f((m1 - n1) * scale_log2);
        m0 = n0;
        m1 = n1;
        float sum0 = 0.f, sum1 = 0.f;
        uint32_t pa[4][4];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const float p0 = exp2f((s[j][0] - m0) * scale_log2), p1 = exp2f((s[j][1] - m0) * scale_log2);
            const float p2 = exp2f((s[j][2] - m1) * scale_log2), p3 = exp2f((s[j][3] - m1) * scale_log2);
            sum0 += p0 + p1;
            sum1 += p2 + p3;
            pa[j >> 1][(j & 1) * 2] = pack_bf16(p0, p1);
            pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p2, p3);
        }
        l0 = l0 * a0 + sum0;
        l1 = l1 * a1 + sum1;
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            acc[j][0] *= a0;
            acc[j][1] *= a0;
            acc[j][2] *= a1;
            acc[j][3] *= a1;
#pragma unroll
            for (int kc = 0; kc < 4; ++kc) {
                const __nv_bfloat16* p = &svt[(j * 8 + g) * LDS + kc * 16 + 2 * tq];
                mma16816(acc[j], pa[kc], load32(p), load32(p + 8));
            }
        }
    }

    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float i0 = 1.f / l0, i1 = 1.f / l1;
    if (lse != nullptr && tq == 0) {
        if (r0 < t) lse[((long long)b * heads + h) * t + r0] = m0 * scale_log2 + log2f(l0);
        if (r1 < t) lse[((long long)b * heads + h) * t + r1] = m1 * scale_log2 + log2f(l1);
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = j * 8 + 2 * tq;
        if (r0 < t)
            *reinterpret_cast<uint32_t*>(o + (((long long)b * t + r0) * heads + h) * HEAD + c) =
                pack_bf16(acc[j][0] * i0, acc[j][1] * i0);
        if (r1 < t)
            *reinterpret_cast<uint32_t*>(o + (((long long)b * t + r1) * heads + h) * HEAD + c) =
                pack_bf16(acc[j][2] * i1, acc[j][3] * i1);
    }
}

// Decoding: one query row per sequence over a long cache (flash-decoding, split over keys).
// Grid (splits, kv heads, b), 4 warps; a block reads 128 keys of one KV head for its R query
// heads (R = n_rep, a template parameter: one entry point per R), a warp 32 of them: first each
// lane scores its own key (the queries in shared memory, the key's 64 dimensions in 16-byte
// loads), the warp takes the maximum and the sum of its 32 weights, then each lane accumulates
// 2 of the 64 output dimensions over the 32 values. Each block writes its partial maximum, sum
// and unnormalised output; the combine kernel merges the splits. (Merging them in the last
// block of each KV head instead, counted with an atomic after a __threadfence, saved that
// launch but took the kernel from ~10 to ~26 us a call on an H200: measured, reverted.) The
// cache holds positions 0..=pos, pos read from the device (*pos_dev, so a captured graph
// replays at any position) or given (pos_host when pos_dev is null); rows past it are never
// read (a lane past it scores nothing and multiplies the last valid value row by a weight of
// 0), blocks past it write an empty partial.
// Code size is what sets this kernel's time: a step runs it once per layer on a few blocks,
// between other kernels, so every block fetches its instructions cold. Fully unrolled over 4
// query heads and 32 values it was ~46 KB and took ~23 us a call on an H200 for ~1 us of loads;
// the loops below are unrolled only as far as the loads need (~6 KB). The sums keep the order
// of the unrolled version (bit-identical).
#define SPLIT_KEYS 128
#define MAX_REP 4

template <int R>
__device__ __forceinline__ void decode_attention(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, float* __restrict__ part_o, float* __restrict__ part_ml,
    const unsigned int* __restrict__ pos_dev, int pos_host, int heads, int splits, float scale_log2,
    long long q_sb, long long q_sh, long long k_sb, long long k_sh, long long k_st, long long v_sb,
    long long v_sh, long long v_st) {
    __shared__ float sml[4][R][2];
    __shared__ float so[4][R][HEAD];
    __shared__ float sq[R][HEAD];
    const int s = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int len = (pos_dev ? (int)pos_dev[0] : pos_host) + 1;
    const int begin = s * SPLIT_KEYS + warp * 32, n = min(32, len - begin);
#pragma unroll 1
    for (int i = threadIdx.x; i < R * HEAD; i += blockDim.x) {
        const int r = i / HEAD, d = i - r * HEAD;
        sq[r][d] = __bfloat162float(q[b * q_sb + (kh * R + r) * q_sh + d]);
    }
    __syncthreads();

    // this lane's key (a valid row past the end: its weight is 0)
    const long long key = min(begin + lane, len - 1);
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) sc[r] = 0.f;
    if (lane < n) {
        const __nv_bfloat16* kr = k + b * k_sb + kh * k_sh + key * k_st;
#pragma unroll 2
        for (int c = 0; c < HEAD / 8; ++c) {
            const uint4 raw = *reinterpret_cast<const uint4*>(kr + 8 * c);
            const __nv_bfloat162* pr = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 kk = __bfloat1622float2(pr[e]);
#pragma unroll
                for (int r = 0; r < R; ++r) sc[r] += sq[r][8 * c + 2 * e] * kk.x + sq[r][8 * c + 2 * e + 1] * kk.y;
            }
        }
    }
    // the warp's maximum and sum of weights per query head
    float m[R], l[R], p[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        float mx = lane < n ? sc[r] : -INFINITY;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        p[r] = lane < n ? exp2f((sc[r] - mx) * scale_log2) : 0.f;
        float sum = p[r];
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
        m[r] = mx;
        l[r] = sum;
    }
    // the values: each lane 2 dimensions, over the warp's keys, 8 rows loaded at a time
    const __nv_bfloat16* vb = v + b * v_sb + kh * v_sh + 2 * lane;
    // (a warp wholly past the end reads no values: the rows there may hold anything, or lie
    // past the buffer when the capacity is not a multiple of SPLIT_KEYS, and 0 * NaN is NaN)
    float2 o[R];
#pragma unroll
    for (int r = 0; r < R; ++r) o[r] = make_float2(0.f, 0.f);
#pragma unroll 1
    for (int j0 = 0; j0 < (n > 0 ? 32 : 0); j0 += 8) {
        float2 vv[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            const long long row = min(begin + j0 + j, len - 1);
            vv[j] = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(vb + row * v_st));
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                const float pj = __shfl_sync(0xffffffffu, p[r], j0 + j);
                o[r].x += pj * vv[j].x;
                o[r].y += pj * vv[j].y;
            }
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        if (lane == 0) {
            sml[warp][r][0] = m[r];
            sml[warp][r][1] = l[r];
        }
        so[warp][r][2 * lane] = o[r].x;
        so[warp][r][2 * lane + 1] = o[r].y;
    }
    __syncthreads();
    if (warp < R) {
        const int r = warp, h = kh * R + r;
        float mx = -INFINITY;
#pragma unroll
        for (int w = 0; w < 4; ++w) mx = fmaxf(mx, sml[w][r][0]);
        float sum = 0.f, o0 = 0.f, o1 = 0.f;
        if (mx != -INFINITY) {
#pragma unroll
            for (int w = 0; w < 4; ++w) {
                const float c = exp2f((sml[w][r][0] - mx) * scale_log2);
                sum += sml[w][r][1] * c;
                o0 += so[w][r][2 * lane] * c;
                o1 += so[w][r][2 * lane + 1] * c;
            }
        }
        const long long at = ((long long)b * heads + h) * splits + s;
        part_o[at * HEAD + 2 * lane] = o0;
        part_o[at * HEAD + 2 * lane + 1] = o1;
        if (lane == 0) {
            part_ml[at * 2] = mx;
            part_ml[at * 2 + 1] = sum;
        }
    }
}

#define DECODE_ATTENTION(R)                                                                              \
    extern "C" __global__ void __launch_bounds__(128) refrag_decode_attention_bf16_r##R(                \
        const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,                      \
        const __nv_bfloat16* __restrict__ v, float* __restrict__ part_o, float* __restrict__ part_ml,  \
        const unsigned int* __restrict__ pos_dev, int pos_host, int heads, int splits, float scale_log2, \
        long long q_sb, long long q_sh, long long k_sb, long long k_sh, long long k_st, long long v_sb, \
        long long v_sh, long long v_st) {                                                              \
        decode_attention<R>(q, k, v, part_o, part_ml, pos_dev, pos_host, heads, splits, scale_log2, q_sb, \
                            q_sh, k_sb, k_sh, k_st, v_sb, v_sh, v_st);                                 \
    }
DECODE_ATTENTION(1)
DECODE_ATTENTION(2)
DECODE_ATTENTION(3)
DECODE_ATTENTION(4)

// Merges the splits: grid (heads, b), 64 threads (one per dimension); out [b, 1, heads, 64].
extern "C" __global__ void refrag_decode_combine_bf16(const float* __restrict__ part_o,
                                                      const float* __restrict__ part_ml,
                                                      __nv_bfloat16* __restrict__ out, int heads,
                                                      int splits, float scale_log2) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const long long base = ((long long)b * heads + h) * splits;
    float mx = -INFINITY;
#pragma unroll 8
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_ml[(base + s) * 2]);
    float sum = 0.f, acc = 0.f;
#pragma unroll 4
    for (int s = 0; s < splits; ++s) {
        const float ms = part_ml[(base + s) * 2];
        if (ms == -INFINITY) continue;
        const float c = exp2f((ms - mx) * scale_log2);
        sum += part_ml[(base + s) * 2 + 1] * c;
        acc += part_o[(base + s) * HEAD + d] * c;
    }
    out[((long long)b * heads + h) * HEAD + d] = __float2bfloat16(acc / sum);
}

// Backward of refrag_attention_bf16 from position 0 (training; FlashAttention-2's backward).
// Grid (key tiles, kv heads, b), 4 warps; a warp owns 16 keys of the block's 64 and keeps their
// dK and dV in registers while the block walks, for each of the n_rep query heads of its KV
// head, the query tiles from the diagonal on: it recomputes the probabilities from lse, then
// dV += P^T dO, dP = dO V^T, dS = P (dP - delta), dK += dS^T Q, and adds dS K into dq (f32,
// zeroed by the caller) with atomics. q, dq: [b, heads, t, 64]; k, v, dk, dv: [b, kv heads, t, 64]
// (dk, dv f32, contiguous); o_grad: [b, t, heads, 64] (the output's gradient, contiguous);
// lse, delta: [b, heads, t] f32 (delta = rowsum(dO * O)).
__device__ __forceinline__ uint32_t pair16(const __nv_bfloat16* a, const __nv_bfloat16* b) {
    const uint32_t lo = *reinterpret_cast<const unsigned short*>(a);
    const uint32_t hi = *reinterpret_cast<const unsigned short*>(b);
    return lo | (hi << 16);
}

extern "C" __global__ void __launch_bounds__(128) refrag_attention_bwd_bf16(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k,
    const __nv_bfloat16* __restrict__ v, const __nv_bfloat16* __restrict__ o_grad,
    const float* __restrict__ lse, const float* __restrict__ delta, float* __restrict__ dq,
    float* __restrict__ dk, float* __restrict__ dv, int t, int heads, int n_rep, float scale_log2,
    long long q_sb, long long q_sh, long long q_st, long long k_sb, long long k_sh,
    long long k_st, long long v_sb, long long v_sh, long long v_st) {
    __shared__ __align__(16) __nv_bfloat16 sq[ROWS * LDS];   // [query][d]
    __shared__ __align__(16) __nv_bfloat16 sdo[ROWS * LDS];  // [query][d]
    __shared__ __align__(16) __nv_bfloat16 sds[ROWS * LDS];  // [query][key]
    __shared__ __align__(16) __nv_bfloat16 skt[HEAD * LDS];  // [d][key]
    __shared__ float slse[ROWS], sdelta[ROWS];

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, tq = lane & 3;
    const int kt = blockIdx.x, kh = blockIdx.y, b = blockIdx.z;
    const int key0 = kt * KEYS, kw = key0 + warp * 16;  // the block's and the warp's first key
    const int kv_heads = heads / n_rep;
    const __nv_bfloat16* kb = k + b * k_sb + kh * k_sh;
    const __nv_bfloat16* vb = v + b * v_sb + kh * v_sh;

    // this warp's keys and values as A fragments (keys past t read as 0)
    uint32_t ka[4][4], va[4][4];
    const int k0 = kw + g, k1 = kw + g + 8;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
        const int c = kk * 16 + 2 * tq;
        ka[kk][0] = k0 < t ? load32(kb + k0 * k_st + c) : 0u;
        ka[kk][1] = k1 < t ? load32(kb + k1 * k_st + c) : 0u;
        ka[kk][2] = k0 < t ? load32(kb + k0 * k_st + c + 8) : 0u;
        ka[kk][3] = k1 < t ? load32(kb + k1 * k_st + c + 8) : 0u;
        va[kk][0] = k0 < t ? load32(vb + k0 * v_st + c) : 0u;
        va[kk][1] = k1 < t ? load32(vb + k1 * v_st + c) : 0u;
        va[kk][2] = k0 < t ? load32(vb + k0 * v_st + c + 8) : 0u;
        va[kk][3] = k1 < t ? load32(vb + k1 * v_st + c + 8) : 0u;
    }
    // the block's keys transposed, for dq's B operand
    for (int i = tid; i < KEYS * HEAD / 8; i += 128) {
        const int key = i & (KEYS - 1), dc = (i >> 6) * 8;
        uint4 x = make_uint4(0, 0, 0, 0);
        if (key0 + key < t) x = *reinterpret_cast<const uint4*>(kb + (key0 + key) * k_st + dc);
        const __nv_bfloat16* e = reinterpret_cast<const __nv_bfloat16*>(&x);
#pragma unroll
        for (int j = 0; j < 8; ++j) skt[(dc + j) * LDS + key] = e[j];
    }

    float dka[8][4], dva[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) dka[j][e] = dva[j][e] = 0.f;

    const int qtiles = (t + ROWS - 1) / ROWS;
    for (int r = 0; r < n_rep; ++r) {
        const int h = kh * n_rep + r;
        const __nv_bfloat16* qb = q + b * q_sb + h * q_sh;
        const float* lb = lse + ((long long)b * heads + h) * t;
        const float* db = delta + ((long long)b * heads + h) * t;
        float* dqb = dq + ((long long)b * heads + h) * t * HEAD;
        for (int qt = kt; qt < qtiles; ++qt) {
            const int q0 = qt * ROWS;
            __syncthreads();
            for (int i = tid; i < ROWS * HEAD / 8; i += 128) {
                const int row = i >> 3, dc = (i & 7) * 8;
                uint4 x = make_uint4(0, 0, 0, 0), y = make_uint4(0, 0, 0, 0);
                if (q0 + row < t) {
                    x = *reinterpret_cast<const uint4*>(qb + (q0 + row) * q_st + dc);
                    y = *reinterpret_cast<const uint4*>(o_grad + (((long long)b * t + q0 + row) * heads + h) * HEAD + dc);
                }
                *reinterpret_cast<uint4*>(&sq[row * LDS + dc]) = x;
                *reinterpret_cast<uint4*>(&sdo[row * LDS + dc]) = y;
            }
            if (tid < ROWS) {
                const bool in = q0 + tid < t;
                slse[tid] = in ? lb[q0 + tid] : INFINITY;  // rows past t: probability 0
                sdelta[tid] = in ? db[q0 + tid] : 0.f;
            }
            __syncthreads();

            // S^T (this warp's 16 keys x 64 queries) and dP^T, then P^T and dS^T in place
            float st[8][4], dpt[8][4];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int e = 0; e < 4; ++e) st[j][e] = dpt[j][e] = 0.f;
#pragma unroll
                for (int kk = 0; kk < 4; ++kk) {
                    const __nv_bfloat16* pq = &sq[(j * 8 + g) * LDS + kk * 16 + 2 * tq];
                    const __nv_bfloat16* pd = &sdo[(j * 8 + g) * LDS + kk * 16 + 2 * tq];
                    mma16816(st[j], ka[kk], load32(pq), load32(pq + 8));
                    mma16816(dpt[j], va[kk], load32(pd), load32(pd + 8));
                }
            }
            uint32_t pa[4][4], dsa[4][4];
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float p[4], ds[4];
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int col = j * 8 + 2 * tq + (e & 1), qry = q0 + col;
                    const int key = e < 2 ? k0 : k1;
                    const bool seen = key <= qry && key < t;  // rows past t: lse = inf
                    p[e] = seen ? exp2f(st[j][e] * scale_log2 - slse[col]) : 0.f;
                    ds[e] = p[e] * (dpt[j][e] - sdelta[col]);
                }
                pa[j >> 1][(j & 1) * 2] = pack_bf16(p[0], p[1]);
                pa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(p[2], p[3]);
                dsa[j >> 1][(j & 1) * 2] = pack_bf16(ds[0], ds[1]);
                dsa[j >> 1][(j & 1) * 2 + 1] = pack_bf16(ds[2], ds[3]);
                // dS for dq, as [query][key]
                const int col = j * 8 + 2 * tq, kl0 = warp * 16 + g;
                sds[col * LDS + kl0] = __float2bfloat16(ds[0]);
                sds[(col + 1) * LDS + kl0] = __float2bfloat16(ds[1]);
                sds[col * LDS + kl0 + 8] = __float2bfloat16(ds[2]);
                sds[(col + 1) * LDS + kl0 + 8] = __float2bfloat16(ds[3]);
            }
            // dV += P^T dO and dK += dS^T Q (B: [query][d] read down a column, two halves)
#pragma unroll
            for (int j = 0; j < 8; ++j) {
#pragma unroll
                for (int kc = 0; kc < 4; ++kc) {
                    const int qa0 = kc * 16 + 2 * tq, d = j * 8 + g;
                    const uint32_t b0 = pair16(&sdo[qa0 * LDS + d], &sdo[(qa0 + 1) * LDS + d]);
                    const uint32_t b1 = pair16(&sdo[(qa0 + 8) * LDS + d], &sdo[(qa0 + 9) * LDS + d]);
                    mma16816(dva[j], pa[kc], b0, b1);
                    const uint32_t c0 = pair16(&sq[qa0 * LDS + d], &sq[(qa0 + 1) * LDS + d]);
                    const uint32_t c1 = pair16(&sq[(qa0 + 8) * LDS + d], &sq[(qa0 + 9) * LDS + d]);
                    mma16816(dka[j], dsa[kc], c0, c1);
                }
            }
            __syncthreads();
            // dq (this warp's 16 queries x 64 d) += dS (16 x 64 keys) K
            uint32_t sa[4][4];
            const int qr = warp * 16 + g;
#pragma unroll
            for (int kc = 0; kc < 4; ++kc) {
                const int c = kc * 16 + 2 * tq;
                sa[kc][0] = load32(&sds[qr * LDS + c]);
                sa[kc][1] = load32(&sds[(qr + 8) * LDS + c]);
                sa[kc][2] = load32(&sds[qr * LDS + c + 8]);
                sa[kc][3] = load32(&sds[(qr + 8) * LDS + c + 8]);
            }
#pragma unroll
            for (int j = 0; j < 8; ++j) {
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
                for (int kc = 0; kc < 4; ++kc) {
                    const __nv_bfloat16* p = &skt[(j * 8 + g) * LDS + kc * 16 + 2 * tq];
                    mma16816(acc, sa[kc], load32(p), load32(p + 8));
                }
                const int c = j * 8 + 2 * tq;
                if (q0 + qr < t) {
                    atomicAdd(&dqb[(long long)(q0 + qr) * HEAD + c], acc[0]);
                    atomicAdd(&dqb[(long long)(q0 + qr) * HEAD + c + 1], acc[1]);
                }
                if (q0 + qr + 8 < t) {
                    atomicAdd(&dqb[(long long)(q0 + qr + 8) * HEAD + c], acc[2]);
                    atomicAdd(&dqb[(long long)(q0 + qr + 8) * HEAD + c + 1], acc[3]);
                }
            }
        }
    }
    float* dkb = dk + ((long long)b * kv_heads + kh) * t * HEAD;
    float* dvb = dv + ((long long)b * kv_heads + kh) * t * HEAD;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = j * 8 + 2 * tq;
        if (k0 < t) {
            *reinterpret_cast<float2*>(&dkb[(long long)k0 * HEAD + c]) = make_float2(dka[j][0], dka[j][1]);
            *reinterpret_cast<float2*>(&dvb[(long long)k0 * HEAD + c]) = make_float2(dva[j][0], dva[j][1]);
        }
        if (k1 < t) {
            *reinterpret_cast<float2*>(&dkb[(long long)k1 * HEAD + c]) = make_float2(dka[j][2], dka[j][3]);
            *reinterpret_cast<float2*>(&dvb[(long long)k1 * HEAD + c]) = make_float2(dva[j][2], dva[j][3]);
        }
    }
}
