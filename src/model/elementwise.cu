// Fused elementwise kernels of the decoder's inference forward (bf16, CUDA): each replaces two
// launches of a decoding step or a short prefill, where launches, not arithmetic, set the time.
// Rounding follows the ops they replace (candle's add, rms-norm, silu and mul on bf16).
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
// One block per row; blockDim.x a multiple of 32, at most 1024. A thread's sums stay in
// registers (up to PER_THREAD of them; rows longer than blockDim.x * PER_THREAD read them back)
// and all its loads are issued before the arithmetic: a one-warp block otherwise waits on one
// load after another (~12 us a call at 576 columns on an H200, against ~2 us). The order of
// the sum of squares is unchanged.
#define PER_THREAD 32
extern "C" __global__ void refrag_add_rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ y,
                                                    const bf16* __restrict__ w, bf16* __restrict__ out, int rows,
                                                    int hidden, float eps) {
    __shared__ float part[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * hidden;
    const bf16* yr = y + row * hidden;
    bf16* sum = out + row * hidden;
    bf16* norm = out + (long long)rows * hidden + row * hidden;
    const bool held = hidden <= (int)blockDim.x * PER_THREAD;
    float kept[PER_THREAD];
    float ss = 0.0f;
    if (held) {
        float xs[PER_THREAD], ys[PER_THREAD];
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            xs[i] = j < hidden ? __bfloat162float(xr[j]) : 0.0f;
            ys[i] = j < hidden ? __bfloat162float(yr[j]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < hidden) {
                const bf16 s = __float2bfloat16(xs[i] + ys[i]);
                sum[j] = s;
                kept[i] = __bfloat162float(s);
                ss += kept[i] * kept[i];
            }
        }
    } else {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            bf16 s = __float2bfloat16(__bfloat162float(xr[j]) + __bfloat162float(yr[j]));
            sum[j] = s;
            float v = __bfloat162float(s);
            ss += v * v;
        }
    }
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        ss = lane < warps ? part[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        if (lane == 0) part[0] = ss;
    }
    __syncthreads();
    const float inv = rsqrtf(part[0] / hidden + eps);
    if (held) {
#pragma unroll
        for (int i = 0; i < PER_THREAD; ++i) {
            const int j = threadIdx.x + i * blockDim.x;
            if (j < hidden) norm[j] = __float2bfloat16(kept[i] * inv * __bfloat162float(w[j]));
        }
    } else {
        for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
            norm[j] = __float2bfloat16(__bfloat162float(sum[j]) * inv * __bfloat162float(w[j]));
        }
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
