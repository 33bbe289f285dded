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
// One block per row; blockDim.x a multiple of 32, at most 1024.
extern "C" __global__ void refrag_add_rms_norm_bf16(const bf16* __restrict__ x, const bf16* __restrict__ y,
                                                    const bf16* __restrict__ w, bf16* __restrict__ out, int rows,
                                                    int hidden, float eps) {
    __shared__ float part[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * hidden;
    const bf16* yr = y + row * hidden;
    bf16* sum = out + row * hidden;
    bf16* norm = out + (long long)rows * hidden + row * hidden;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        bf16 s = __float2bfloat16(__bfloat162float(xr[j]) + __bfloat162float(yr[j]));
        sum[j] = s;
        float v = __bfloat162float(s);
        ss += v * v;
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
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        norm[j] = __float2bfloat16(__bfloat162float(sum[j]) * inv * __bfloat162float(w[j]));
    }
}
