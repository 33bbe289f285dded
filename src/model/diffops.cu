// Training kernels with a written-out gradient (bf16 activations, f32 arithmetic, CUDA): the
// cross-entropy of bf16 logits and the rms-norm's backward, each one pass where candle's ops
// took ~10 launches over f32 copies of the largest tensors of a step (src/model/diffops.rs).
#include <cuda_bf16.h>
#include <float.h>

typedef __nv_bfloat16 bf16;

// Block-wide sum of `v` (blockDim.x a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v, float* part) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < warps ? part[lane] : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

// Per row r of logits x [rows, v]: out[r] = lse = log(sum(exp(x[r]))), out[rows + r] = lse - x[r, t[r]].
// One block per row; an online max-and-sum per thread, then one block reduction of both.
extern "C" __global__ void refrag_ce_fwd_bf16(const bf16* __restrict__ x, const unsigned int* __restrict__ t,
                                              float* __restrict__ out, int rows, int v) {
    __shared__ float pm[32], ps[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * v;
    float m = -FLT_MAX, s = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float a = __bfloat162float(xr[j]);
        if (a > m) {
            s = s * expf(m - a) + 1.0f;
            m = a;
        } else {
            s += expf(a - m);
        }
    }
    // combine (m, s) pairs: first the warp, then the warps' results
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
        float mm = fmaxf(m, m2);
        s = s * expf(m - mm) + s2 * expf(m2 - mm);
        m = mm;
    }
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    if (lane == 0) {
        pm[warp] = m;
        ps[warp] = s;
    }
    __syncthreads();
    if (warp == 0) {
        m = lane < warps ? pm[lane] : -FLT_MAX;
        s = lane < warps ? ps[lane] : 0.0f;
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
            float mm = fmaxf(m, m2);
            s = (s == 0.0f ? 0.0f : s * expf(m - mm)) + (s2 == 0.0f ? 0.0f : s2 * expf(m2 - mm));
            m = mm;
        }
        if (lane == 0) {
            float l = m + logf(s);
            out[row] = l;
            out[rows + row] = l - __bfloat162float(xr[t[row]]);
        }
    }
}

// dx[r, j] = g[r] * (exp(x[r, j] - lse[r]) - (j == t[r])), in bf16. Grid (rows, column blocks).
extern "C" __global__ void refrag_ce_bwd_bf16(const bf16* __restrict__ x, const unsigned int* __restrict__ t,
                                              const float* __restrict__ lse, const float* __restrict__ g,
                                              bf16* __restrict__ dx, int rows, int v) {
    const long long row = blockIdx.x;
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= v) return;
    const long long i = row * v + j;
    float p = expf(__bfloat162float(x[i]) - lse[row]);
    if (j == (int)t[row]) p -= 1.0f;
    dx[i] = __float2bfloat16(g[row] * p);
}

// The rms-norm's gradient to its input, y = x w r with r = 1/sqrt(mean(x^2) + eps):
// dx = r (g w) - x r^3 mean(g w x). One block per row.
template <bool ADD>
__device__ void rms_norm_bwd(const bf16* __restrict__ x, const bf16* __restrict__ g, const bf16* __restrict__ w,
                             const bf16* __restrict__ res, bf16* __restrict__ dx, int hidden, float eps) {
    __shared__ float part[32];
    const long long row = blockIdx.x;
    const bf16* xr = x + row * hidden;
    const bf16* gr = g + row * hidden;
    float ss = 0.0f, sgx = 0.0f;
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float a = __bfloat162float(xr[j]);
        ss += a * a;
        sgx += __bfloat162float(gr[j]) * __bfloat162float(w[j]) * a;
    }
    ss = block_sum(ss, part);
    sgx = block_sum(sgx, part);
    const float r = rsqrtf(ss / hidden + eps);
    const float c = r * r * r * (sgx / hidden);
    for (int j = threadIdx.x; j < hidden; j += blockDim.x) {
        float a = __bfloat162float(xr[j]);
        float d = r * __bfloat162float(gr[j]) * __bfloat162float(w[j]) - a * c;
        if (ADD) d += __bfloat162float(res[row * hidden + j]);
        dx[row * hidden + j] = __float2bfloat16(d);
    }
}

extern "C" __global__ void refrag_rms_norm_bwd_bf16(const bf16* __restrict__ x, const bf16* __restrict__ g,
                                                    const bf16* __restrict__ w, bf16* __restrict__ dx, int rows,
                                                    int hidden, float eps) {
    rms_norm_bwd<false>(x, g, w, nullptr, dx, hidden, eps);
}

// The same plus a residual gradient `res` (added in f32 before rounding): a layer's input
// gradient is the residual path's plus the norm's.
extern "C" __global__ void refrag_rms_norm_bwd_add_bf16(const bf16* __restrict__ x, const bf16* __restrict__ g,
                                                        const bf16* __restrict__ w, const bf16* __restrict__ res,
                                                        bf16* __restrict__ dx, int rows, int hidden, float eps) {
    rms_norm_bwd<true>(x, g, w, res, dx, hidden, eps);
}

// The gradients of a = silu(g) * u from da, all [n] bf16: out[0..n) = dg, out[n..2n) = du.
// silu'(g) = s + silu (1 - s), s = sigmoid(g); f32 arithmetic, one rounding per output.
extern "C" __global__ void refrag_silu_mul_bwd_bf16(const bf16* __restrict__ g, const bf16* __restrict__ u,
                                                    const bf16* __restrict__ da, bf16* __restrict__ out,
                                                    long long n) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        const float gv = __bfloat162float(g[i]), uv = __bfloat162float(u[i]), d = __bfloat162float(da[i]);
        const float s = 1.0f / (1.0f + __expf(-gv));
        const float silu = gv * s;
        out[i] = __float2bfloat16(d * uv * (s + silu * (1.0f - s)));
        out[n + i] = __float2bfloat16(d * silu);
    }
}
