// Kernels of the decoder's inference forward besides attention (bf16, CUDA): each replaces
// launches of a decoding step or a short prefill, where launches and cold instruction fetch, not
// arithmetic, set the time. Rounding follows the ops they replace (candle's add, rms-norm, silu
// and mul on bf16, its argmax's ties); the matrix-vector products sum in their own order.
#include <cuda_bf16.h>

typedef __nv_bfloat16 bf16;

// out[r, j] = silu(gu[r, j]) * gu[r, f + j]: the gate and up halves of one stacked matmul's
// rows [rows, 2f] into [rows, f]; silu rounded to bf16 before the product, as two ops would.
extern "C" __global__ void refrag_silu_mul_bf16(const bf16* __restrict__ gu, bf16* __restrict__ out, int rows,
                                                int f) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * f) return;
    long long r = i / f, j = i - r * f;
    float g = __bfloat162float(gu[r * 2 * f + j]);
    float u = __bfloat162float(gu[r * 2 * f + f + j]);
    float s = __bfloat162float(__float2bfloat16(g / (1.0f + expf(-g))));
    out[i] = __float2bfloat16(s * u);
}

// The residual add and the next norm in one pass over a row of `hidden` values:
// out[0][r] = x[r] + y[r] (rounded to bf16), out[1][r] = out[0][r] / rms(out[0][r]) * w.
// One block per row; blockDim.x a multiple of 32, at most 1024. The sum of squares keeps
// candle's rms-norm kernel's order (thread t adds the columns t, t + blockDim.x, ... in turn,
// then the warp and block reductions), so the norm rounds as candle's does.
//
// The row moves in 16-byte pieces (hidden % 8 == 0, 16-byte aligned rows, at most
// ADD_NORM_PIECES of them per thread): every load of x, y and w is issued at once, the sums are
// written and kept in shared memory (f32, `hidden` of them: dynamic shared memory), where each
// thread then reads its own columns for the sum of squares; elementwise work has no order,
// only that sum needs the strided walk. Small code and one wait on memory matter more than
// arithmetic here: a step runs this on one block per row between other kernels, so its
// instructions are fetched cold each time, and a version with each thread's 32 columns
// unrolled in registers (~31 KB of code) spent most of its ~7 us doing so.
#define ADD_NORM_PIECES 3

// One 16-byte piece of the residual add: x + y rounded to bf16 (returned), kept as f32 at kept[0..8].
__device__ __forceinline__ uint4 add8(const uint4 x, const uint4 y, float* kept) {
    const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
    const __nv_bfloat162* yp = reinterpret_cast<const __nv_bfloat162*>(&y);
    uint4 packed;
    __nv_bfloat162* sp = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 a = __bfloat1622float2(xp[e]), b = __bfloat1622float2(yp[e]);
        sp[e] = __floats2bfloat162_rn(a.x + b.x, a.y + b.y);
        const float2 r = __bfloat1622float2(sp[e]);
        kept[2 * e] = r.x;
        kept[2 * e + 1] = r.y;
    }
    return packed;
}

// One 16-byte piece of the norm: kept[0..8] * inv * g, rounded to bf16.
__device__ __forceinline__ uint4 norm8(const float* kept, float inv, const uint4 g) {
    const __nv_bfloat162* gp = reinterpret_cast<const __nv_bfloat162*>(&g);
    uint4 packed;
    __nv_bfloat162* np = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        const float2 gv = __bfloat1622float2(gp[e]);
        np[e] = __floats2bfloat162_rn(kept[2 * e] * inv * gv.x, kept[2 * e + 1] * inv * gv.y);
    }
    return packed;
}
extern "C" __global__ void refrag_add_rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ y,
                                                    const bf16* __restrict__ w, bf16* __restrict__ out, int rows,
                                                    int hidden, float eps) {
    extern __shared__ float kept[];
    __shared__ float part[32];
    const long long row = blockIdx.x;
    const uint4* xr = reinterpret_cast<const uint4*>(x + row * hidden);
    const uint4* yr = reinterpret_cast<const uint4*>(y + row * hidden);
    uint4* sum = reinterpret_cast<uint4*>(out + row * hidden);
    uint4* norm = reinterpret_cast<uint4*>(out + (long long)rows * hidden + row * hidden);
    const uint4* wr = reinterpret_cast<const uint4*>(w);
    const int t = threadIdx.x, step = blockDim.x, pieces = hidden / 8;
    uint4 xs[ADD_NORM_PIECES], ys[ADD_NORM_PIECES], ws[ADD_NORM_PIECES];
#pragma unroll
    for (int u = 0; u < ADD_NORM_PIECES; ++u) {
        const int c = min(t + u * step, pieces - 1);
        xs[u] = xr[c];
        ys[u] = yr[c];
        ws[u] = wr[c];
    }
#pragma unroll
    for (int u = 0; u < ADD_NORM_PIECES; ++u) {
        const int c = t + u * step;
        if (c >= pieces) break;
        sum[c] = add8(xs[u], ys[u], kept + 8 * c);
    }
    __syncthreads();
    float ss = 0.0f;
#pragma unroll 4
    for (int j = t; j < hidden; j += step) ss += kept[j] * kept[j];
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    const int warp = t / 32, lane = t % 32, warps = step / 32;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < warps ? part[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        if (lane == 0) part[0] = ss;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / hidden + eps);
#pragma unroll
    for (int u = 0; u < ADD_NORM_PIECES; ++u) {
        const int c = t + u * step;
        if (c >= pieces) break;
        norm[c] = norm8(kept + 8 * c, inv, ws[u]);
    }
}

// A decoding step's rotary embedding and KV write in one pass, from the stacked Q/K/V matmul's
// output qkv [b, (nq + 2 nk) * 64] at the position pos[0] (read on the device, so that a captured
// graph replays at every position): the queries rotated with the scaled query tables into
// q [b, nq, 64], the keys rotated with the key tables into k_cache and the values copied into
// v_cache ([b, nk, cap, 64] each) at that position. Tables [positions, 32], interleaved pairs
// (candle's rope_i, whose bf16 arithmetic this repeats). One block of 32 threads per head and
// sequence, one pair of dimensions per thread.
extern "C" __global__ void refrag_decode_qkv_bf16(const bf16* __restrict__ qkv, const unsigned* __restrict__ pos,
                                                  const bf16* __restrict__ cos_q, const bf16* __restrict__ sin_q,
                                                  const bf16* __restrict__ cos_k, const bf16* __restrict__ sin_k,
                                                  bf16* __restrict__ q, bf16* __restrict__ k_cache,
                                                  bf16* __restrict__ v_cache, int nq, int nk, int cap) {
    const int heads = nq + 2 * nk;
    const int h = blockIdx.x, b = blockIdx.y, i = threadIdx.x;
    const long long p = pos[0];
    const bf16* src = qkv + ((long long)b * heads + h) * 64;
    const bf16 x0 = src[2 * i], x1 = src[2 * i + 1];
    if (h < nq) {
        const bf16 c = cos_q[p * 32 + i], s = sin_q[p * 32 + i];
        bf16* dst = q + ((long long)b * nq + h) * 64;
        dst[2 * i] = x0 * c - x1 * s;
        dst[2 * i + 1] = x0 * s + x1 * c;
    } else if (h < nq + nk) {
        const bf16 c = cos_k[p * 32 + i], s = sin_k[p * 32 + i];
        bf16* dst = k_cache + (((long long)b * nk + (h - nq)) * cap + p) * 64;
        dst[2 * i] = x0 * c - x1 * s;
        dst[2 * i + 1] = x0 * s + x1 * c;
    } else {
        bf16* dst = v_cache + (((long long)b * nk + (h - nq - nk)) * cap + p) * 64;
        dst[2 * i] = x0;
        dst[2 * i + 1] = x1;
    }
}

// Greedy decoding's argmax over each row of logits [rows, n] (f32, n % 4 == 0, 16-byte aligned
// rows), in two launches: candle's one-block-per-row kernel walks 49,152 values with one
// block (~38 us a token on an H200). First each block takes the best of ARGMAX_SPAN values of
// a row (grid (parts, rows), 256 threads, 16-byte loads), then one warp per row the best of
// the parts. Ties go where candle's kernel (1024 threads for rows of 1024 values or more)
// sends them: its thread t takes the columns t, t + 1024, ... and keeps the first of equal
// values, then a tree reduction pairs thread t with t + 512, t + 256, ..., t + 1, keeping the
// lower one's on ties, so of equal maxima the one whose thread has the smallest bit-reversed
// number wins, then the lowest column. They matter: logits come from a bf16 matmul, so the top
// two are often equal, and greedy answers forked at a third of the questions under another rule.
#define ARGMAX_SPAN 4096

// lower wins among equal values: the bit-reversed thread (top 10 bits), then the column's round
__device__ __forceinline__ unsigned tie_rank(unsigned i) { return __brev(i & 1023u) | (i >> 10); }

__device__ __forceinline__ void better(float& v, unsigned& i, float ov, unsigned oi) {
    // 0xffffffff: no value yet (a part past the row's end)
    if (oi != 0xffffffffu &&
        (i == 0xffffffffu || ov > v || (ov == v && tie_rank(oi) < tie_rank(i)) || v != v)) {
        v = ov;
        i = oi;
    }
}

__device__ __forceinline__ void warp_best(float& v, unsigned& i) {
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_down_sync(0xffffffffu, v, o);
        const unsigned oi = __shfl_down_sync(0xffffffffu, i, o);
        better(v, i, ov, oi);
    }
}

extern "C" __global__ void __launch_bounds__(256) refrag_argmax_part_f32(const float* __restrict__ x, float* __restrict__ part_v,
                                                                       unsigned* __restrict__ part_i, int n, int parts) {
    __shared__ float sv[8];
    __shared__ unsigned si[8];
    const int p = blockIdx.x, row = blockIdx.y, t = threadIdx.x;
    const float4* xr = reinterpret_cast<const float4*>(x + (long long)row * n);
    const int begin = p * (ARGMAX_SPAN / 4), end = min(begin + ARGMAX_SPAN / 4, n / 4);
    float v = -INFINITY;
    unsigned i = 0xffffffffu;
    float4 q[ARGMAX_SPAN / 4 / 256];
#pragma unroll
    for (int u = 0; u < ARGMAX_SPAN / 4 / 256; ++u) {
        const int at = begin + u * 256 + t;
        q[u] = at < end ? xr[at] : make_float4(-INFINITY, -INFINITY, -INFINITY, -INFINITY);
    }
#pragma unroll
    for (int u = 0; u < ARGMAX_SPAN / 4 / 256; ++u) {
        if (begin + u * 256 + t >= end) break;
        const unsigned at = 4u * (begin + u * 256 + t);
        better(v, i, q[u].x, at);
        better(v, i, q[u].y, at + 1);
        better(v, i, q[u].z, at + 2);
        better(v, i, q[u].w, at + 3);
    }
    warp_best(v, i);
    if ((t & 31) == 0) {
        sv[t >> 5] = v;
        si[t >> 5] = i;
    }
    __syncthreads();
    if (t < 32) {
        v = t < 8 ? sv[t] : -INFINITY;
        i = t < 8 ? si[t] : 0xffffffffu;
        warp_best(v, i);
        if (t == 0) {
            part_v[(long long)row * parts + p] = v;
            part_i[(long long)row * parts + p] = i;
        }
    }
}

// The best of each row's parts: grid (rows), 32 threads; out [rows] (u32). A row of only NaN
// gives index 0.
extern "C" __global__ void refrag_argmax_rows(const float* __restrict__ part_v, const unsigned* __restrict__ part_i,
                                              unsigned* __restrict__ out, int parts) {
    const int row = blockIdx.x, t = threadIdx.x;
    float v = -INFINITY;
    unsigned i = 0xffffffffu;
#pragma unroll 1
    for (int p = t; p < parts; p += 32) better(v, i, part_v[(long long)row * parts + p], part_i[(long long)row * parts + p]);
    warp_best(v, i);
    if (t == 0) out[row] = i == 0xffffffffu ? 0u : i;
}

// A decoding step's matrix-vector products at batch 1: y [n] = w [n, k] x [k] (bf16, f32
// sums, k % 8 == 0, rows 16-byte aligned). One warp per output row, 8 rows per block: each
// lane multiplies 16-byte pieces of the row (four in flight), the warp sums. cuBLAS's kernels
// for these shapes took ~4.6 us each on an H200 whatever the size (576 x 576 to 3072 x 576):
// latency, not bandwidth. The sum's order is not cuBLAS's (outputs differ by bf16 rounding).
// With SILU, x is silu(g) * u from the stacked gate/up output gu [2k], computed per piece as
// refrag_silu_mul_bf16 does (the same roundings) by each block into shared memory (2k bytes
// of dynamic shared memory), so the MLP's down projection needs no launch of its own for the
// activation.
__device__ __forceinline__ uint4 silu_mul8(const uint4 g, const uint4 u) {
    const bf16* gp = reinterpret_cast<const bf16*>(&g);
    const bf16* up = reinterpret_cast<const bf16*>(&u);
    uint4 out;
    bf16* op = reinterpret_cast<bf16*>(&out);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const float gv = __bfloat162float(gp[e]);
        const float sv = __bfloat162float(__float2bfloat16(gv / (1.0f + expf(-gv))));
        op[e] = __float2bfloat16(sv * __bfloat162float(up[e]));
    }
    return out;
}

// The products of one row xr (k values, global or shared memory) with the block's 8 rows of w.
__device__ __forceinline__ void gemv_rows(const uint4* xr, const bf16* __restrict__ w, bf16* __restrict__ y, int n,
                                          int k) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + warp;
    const int pieces = k / 8;
    if (row >= n) return;
    const uint4* wr = reinterpret_cast<const uint4*>(w + (long long)row * k);
    float acc = 0.f;
#pragma unroll 1
    for (int c0 = lane; c0 < pieces; c0 += 4 * 32) {
        uint4 wv[4], xv[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const int c = c0 + u * 32;
            wv[u] = c < pieces ? wr[c] : make_uint4(0, 0, 0, 0);
            xv[u] = c < pieces ? xr[c] : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&wv[u]);
            const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&xv[u]);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float2 a = __bfloat1622float2(wp[e]), b = __bfloat1622float2(xp[e]);
                acc += a.x * b.x;
                acc += a.y * b.y;
            }
        }
    }
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[row] = __float2bfloat16(acc);
}

extern "C" __global__ void __launch_bounds__(256) refrag_gemv_bf16(const bf16* __restrict__ x, const bf16* __restrict__ w,
                                                                 bf16* __restrict__ y, int n, int k) {
    gemv_rows(reinterpret_cast<const uint4*>(x), w, y, n, k);
}

// x: the stacked gate/up output [2k].
extern "C" __global__ void __launch_bounds__(256) refrag_gemv_silu_bf16(const bf16* __restrict__ gu,
                                                                      const bf16* __restrict__ w, bf16* __restrict__ y,
                                                                      int n, int k) {
    extern __shared__ uint4 act[];  // the block's k activations
    const uint4* xr = reinterpret_cast<const uint4*>(gu);
    const int pieces = k / 8;
#pragma unroll 1
    for (int c = threadIdx.x; c < pieces; c += blockDim.x) act[c] = silu_mul8(xr[c], xr[pieces + c]);
    __syncthreads();
    gemv_rows(act, w, y, n, k);
}

// The residual add and the next norm before a matrix-vector product, in the product's kernel:
// sum = x + y (bf16; written by block 0), h = sum / rms(sum) * g, out = w h. Every block
// computes h for itself into shared memory (k f32 sums, then k bf16 of h: 6k bytes of dynamic
// shared memory), as refrag_add_rms_norm_bf16 with one warp does it (k < 1024: candle's order of
// the sum of squares, one warp walking the columns lane, lane + 32, ...), so h is the same bits;
// it saves that kernel's launch, two a layer of a decoding step.
extern "C" __global__ void __launch_bounds__(256) refrag_gemv_norm_bf16(const bf16* __restrict__ x,
                                                                      const bf16* __restrict__ y,
                                                                      const bf16* __restrict__ g, float eps,
                                                                      const bf16* __restrict__ w, bf16* __restrict__ out,
                                                                      bf16* __restrict__ sum, int n, int k) {
    extern __shared__ float kept[];  // k sums (f32), then the k values of h (bf16)
    __shared__ float total;
    uint4* h = reinterpret_cast<uint4*>(kept + k);
    const uint4* xr = reinterpret_cast<const uint4*>(x);
    const uint4* yr = reinterpret_cast<const uint4*>(y);
    const uint4* gr = reinterpret_cast<const uint4*>(g);
    const int t = threadIdx.x, pieces = k / 8;
#pragma unroll 1
    for (int c = t; c < pieces; c += blockDim.x) {
        const uint4 packed = add8(xr[c], yr[c], kept + 8 * c);
        if (blockIdx.x == 0) reinterpret_cast<uint4*>(sum)[c] = packed;
    }
    __syncthreads();
    if (t < 32) {
        float ss = 0.0f;
#pragma unroll 4
        for (int j = t; j < k; j += 32) ss += kept[j] * kept[j];
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        if (t == 0) total = ss;
    }
    __syncthreads();
    const float inv = rsqrtf(total / k + eps);
#pragma unroll 1
    for (int c = t; c < pieces; c += blockDim.x) h[c] = norm8(kept + 8 * c, inv, gr[c]);
    __syncthreads();
    gemv_rows(h, w, out, n, k);
}
