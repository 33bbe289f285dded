//! Products of a few activation rows with a Q4_1 matrix on x86-64 CPUs with AVX2: what a CPU
//! decoding step spends most of its time on. candle 0.11 computes the Q4_1 x Q8_1 dot product
//! with scalar code only (its AVX2 kernels cover other block types); this one takes the same
//! integer sums sixteen bytes at a time and keeps candle's float arithmetic and order, so its
//! outputs are the same bits as `QMatMul::forward`'s. Rows are split over rayon's threads.

use half::f16;

/// Weights per block and bytes per block of GGUF's Q4_1 (f16 scale, f16 minimum, 16 bytes of
/// nibbles: weight j < 16 is the low nibble of byte j, weight j >= 16 the high nibble of byte
/// j - 16).
const BLOCK: usize = 32;
const Q4_BYTES: usize = 20;

/// One block of an activation row quantized as candle's `BlockQ8_1::from_float` does.
#[derive(Clone, Copy)]
struct Q8 {
    d: f32,
    s: f32,
    qs: [i8; BLOCK],
}

/// A Q4_1 matrix [rows, cols] in GGUF's block layout.
pub struct Q41 {
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

impl Q41 {
    /// The matrix of `qt` when it is a 2-D Q4_1 tensor and this CPU has AVX2; None otherwise.
    pub fn new(qt: &candle_core::quantized::QTensor) -> Option<Self> {
        if qt.dtype() != candle_core::quantized::GgmlDType::Q4_1 || !available() {
            return None;
        }
        let (rows, cols) = qt.shape().dims2().ok()?;
        let data = qt.data().ok()?.into_owned();
        (cols.is_multiple_of(BLOCK) && data.len() == rows * cols / BLOCK * Q4_BYTES).then_some(Self {
            rows,
            cols,
            data,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// `x w^T` for `m` rows `x` [m, cols]: [m, rows] (f32), as candle's quantized matmul gives it.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        use rayon::prelude::*;
        let blocks = self.cols / BLOCK;
        let q8: Vec<Q8> = x.chunks(self.cols).flat_map(|row| row.chunks(BLOCK).map(quantize)).collect();
        // [rows, m], 64 rows of w a task; transposed after when m > 1
        let mut by_row = vec![0f32; self.rows * m];
        by_row.par_chunks_mut(64 * m).enumerate().for_each(|(c, part)| {
            for (j, dots) in part.chunks_mut(m).enumerate() {
                let r = c * 64 + j;
                let w = &self.data[r * blocks * Q4_BYTES..(r + 1) * blocks * Q4_BYTES];
                for (i, dot) in dots.iter_mut().enumerate() {
                    // SAFETY: `available()` said AVX2 is there (checked in `new`).
                    *dot = unsafe { dot_avx2(w, &q8[i * blocks..(i + 1) * blocks]) };
                }
            }
        });
        if m == 1 {
            return by_row;
        }
        (0..m).flat_map(|i| by_row.iter().skip(i).step_by(m).copied()).collect()
    }
}

/// Whether this CPU runs the AVX2 kernel (read once).
fn available() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::is_x86_feature_detected!("avx2") && !matches!(std::env::var("REFRAG_Q4_AVX2").as_deref(), Ok("0"))
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// candle's `quantize_row_q8_1` for one block of 32 values.
fn quantize(x: &[f32]) -> Q8 {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / ((1 << 7) - 1) as f32;
    let id = if d != 0f32 { 1. / d } else { 0. };
    let d16 = f16::from_f32(d);
    let mut qs = [0i8; BLOCK];
    let mut sum = 0i32;
    for j in 0..BLOCK / 2 {
        qs[j] = f32::round(x[j] * id) as i8;
        qs[j + BLOCK / 2] = f32::round(x[j + BLOCK / 2] * id) as i8;
        sum += qs[j] as i32 + qs[j + BLOCK / 2] as i32;
    }
    let s16 = f16::from_f32(sum as f32) * d16;
    Q8 { d: d16.to_f32(), s: s16.to_f32(), qs }
}

/// candle's `vec_dot_q4_1_q8_1`: per block the exact integer sum of nibble x int8 products, then
/// `sumi * d4 * d8 + m4 * s8` added to the total in block order.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn dot_avx2(w: &[u8], q: &[Q8]) -> f32 {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    let mut sumf = 0f32;
    for (b, y) in q.iter().enumerate() {
        let block = &w[b * Q4_BYTES..(b + 1) * Q4_BYTES];
        let d4 = f16::from_bits(u16::from_le_bytes([block[0], block[1]])).to_f32();
        let m4 = f16::from_bits(u16::from_le_bytes([block[2], block[3]])).to_f32();
        // SAFETY: 16 bytes at block[4..20] and 32 at y.qs (unaligned loads).
        let nibbles = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(nibbles, low);
        let hi = _mm_and_si128(_mm_srli_epi16(nibbles, 4), low);
        let w8 = _mm256_set_m128i(hi, lo);
        let y8 = _mm256_loadu_si256(y.qs.as_ptr() as *const __m256i);
        // u8 x i8 pairs into i16 (|15 x 128 x 2| fits), then pairs into i32
        let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(w8, y8), ones);
        let s = _mm_add_epi32(_mm256_castsi256_si128(p32), _mm256_extracti128_si256(p32, 1));
        let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
        let sumi = _mm_cvtsi128_si32(s);
        sumf += sumi as f32 * d4 * y.d + m4 * y.s;
    }
    sumf
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_avx2(_: &[u8], _: &[Q8]) -> f32 {
    unreachable!("the AVX2 kernel is only chosen on x86-64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
    use candle_core::{Device, Module, Tensor};

    /// The same bits as candle's quantized matmul, for one row and for three.
    #[test]
    fn matches_candles_q4_1_matmul() {
        if !available() {
            return;
        }
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (200, 576), &dev).unwrap();
        let qt = QTensor::quantize(&w, GgmlDType::Q4_1).unwrap();
        let fast = Q41::new(&qt).expect("a Q4_1 matrix");
        let slow = QMatMul::from_qtensor(qt).unwrap();
        for m in [1usize, 3] {
            let x = Tensor::randn(0f32, 1.0, (m, 576), &dev).unwrap();
            let want: Vec<f32> = slow.forward(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let got = fast.matmul(&x.flatten_all().unwrap().to_vec1().unwrap(), m);
            assert_eq!(got.len(), want.len());
            let same = got.iter().zip(&want).filter(|(a, b)| a.to_bits() == b.to_bits()).count();
            assert_eq!(same, want.len(), "{m} rows: {} of {} outputs differ", want.len() - same, want.len());
        }
    }
}
