//! Seed-exact initial noise: PyTorch 2.6.0's CPU `torch.randn`, bit for bit.
//!
//! The reference draws FLUX noise with `torch.randn(..., dtype=bf16,
//! generator=torch.Generator("cpu").manual_seed(seed))`; a seed only means the same
//! picture if every bit of that draw is reproduced. Torch's CPU generator is an
//! mt19937 and `normal_` has three code paths, all reproduced here:
//!
//! * fewer than 16 elements: a double-precision Box–Muller per element that caches
//!   the sine half for the next element, cast to the output dtype;
//! * bf16 with at least 16 elements (`normal_fill<BFloat16>`): 8-bit uniforms and a
//!   Box–Muller whose every intermediate is rounded to bf16;
//! * f32 with at least 16 elements (`normal_fill_AVX2`, which torch also uses on
//!   AVX-512 machines): 24-bit uniforms and the Cephes-style `log256_ps` /
//!   `sincos256_ps` approximations, with the FMA contractions GCC made in the wheel.
//!
//! For the two fill paths, when the element count is not a multiple of 16 the last
//! 16 elements are redrawn from 16 fresh uniforms and transformed again.

use std::f64::consts::PI;

/// A seed for a run that gave none: 32 bits, since torch seeds its CPU generator with the low
/// 32 bits only (a larger seed would not mean another picture in the reference).
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() & 0xFFFF_FFFF
}

/// Which torch CPU `randn` draw to reproduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoiseKind {
    /// `torch.randn(..., dtype=torch.bfloat16)` as torch 2.6.0 draws it.
    TorchBf16,
    /// `torch.randn(..., dtype=torch.float32)`.
    TorchF32,
}

/// `numel` normal samples as torch's CPU generator seeded with `seed` draws them, in row-major order;
/// TorchBf16 values are exactly bf16-representable, widened to f32.
pub fn torch_randn(seed: u64, numel: usize, kind: NoiseKind) -> Vec<f32> {
    // `manual_seed` keeps the full 64-bit seed, but mt19937 is initialised from its low 32 bits.
    let mut mt = Mt19937::new(seed as u32);
    if numel < 16 {
        return scalar_path(&mut mt, numel, kind);
    }
    match kind {
        NoiseKind::TorchBf16 => fill_bf16(&mut mt, numel),
        NoiseKind::TorchF32 => fill_f32(&mut mt, numel),
    }
}

/// The 32-bit Mersenne Twister exactly as torch's `at::mt19937` (the standard MT19937).
#[derive(Clone)]
pub struct Mt19937 {
    state: [u32; MT_N],
    index: usize,
}

const MT_N: usize = 624;
const MT_M: usize = 397;

impl Mt19937 {
    /// Standard initialisation (Knuth's multiplier 1812433253).
    pub fn new(seed: u32) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        Self { state, index: MT_N }
    }

    /// The next tempered 32-bit output (torch's `CPUGeneratorImpl::random()`).
    #[inline]
    pub fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Torch's `random64()`: the first 32-bit output is the high half.
    #[inline]
    pub fn next_u64(&mut self) -> u64 {
        let hi = self.next_u32() as u64;
        let lo = self.next_u32() as u64;
        (hi << 32) | lo
    }

    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }
}

/// Round an f32 to the nearest bf16 (ties to even) and widen it back, as c10's
/// `BFloat16(float)` constructor does.
#[inline]
fn round_bf16(x: f32) -> f32 {
    if x.is_nan() {
        return f32::from_bits(0x7fc0_0000);
    }
    let bits = x.to_bits();
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    f32::from_bits(rounded & 0xffff_0000)
}

/// Below 16 elements torch samples `normal_distribution<double>` one element at a
/// time. Each Box–Muller pair costs four 32-bit outputs (two 53-bit uniforms); the
/// sine half is cached in the generator and returned for the next element.
fn scalar_path(mt: &mut Mt19937, numel: usize, kind: NoiseKind) -> Vec<f32> {
    const MASK53: u64 = (1 << 53) - 1;
    let uniform = |mt: &mut Mt19937| (mt.next_u64() & MASK53) as f64 * (1.0 / (1u64 << 53) as f64);
    let mut cached: Option<f64> = None;
    let mut out = Vec::with_capacity(numel);
    for _ in 0..numel {
        let value = match cached.take() {
            Some(v) => v,
            None => {
                let u1 = uniform(mt);
                let u2 = uniform(mt);
                let r = (-2.0 * (-u2).ln_1p()).sqrt();
                let theta = 2.0 * PI * u1;
                cached = Some(r * theta.sin());
                r * theta.cos()
            }
        };
        // `val * std + mean` with std = 1, mean = 0: only turns -0 into +0.
        let value = (value * 1.0 + 0.0) as f32;
        out.push(match kind {
            // c10 converts double to BFloat16 through float.
            NoiseKind::TorchBf16 => round_bf16(value),
            NoiseKind::TorchF32 => value,
        });
    }
    out
}

/// Draw all uniforms, transform full 16-blocks, then redo the last 16 elements
/// from fresh uniforms if `numel` is not a multiple of 16 (torch's `normal_fill`).
fn fill_blocks<U: Copy + Default>(
    mt: &mut Mt19937,
    numel: usize,
    draw: impl Fn(u32) -> U,
    block: impl Fn(&[U; 16], &mut [f32]),
) -> Vec<f32> {
    let uniforms: Vec<U> = (0..numel).map(|_| draw(mt.next_u32())).collect();
    let mut out = vec![0f32; numel];
    for (u, o) in uniforms.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
        block(u.try_into().expect("16 uniforms"), o);
    }
    // Not `is_multiple_of`: that needs Rust 1.87 and the workspace targets 1.85.
    let partial = numel % 16;
    if partial != 0 {
        let mut tail = [U::default(); 16];
        for t in &mut tail {
            *t = draw(mt.next_u32());
        }
        block(&tail, &mut out[numel - 16..]);
    }
    out
}

/// `normal_fill<BFloat16>`: uniforms are `(r & 0xFF) / 256`, and c10's BFloat16
/// math (`std::log`, `std::sqrt`, `std::cos`, `std::sin` overloads and mixed
/// operators) rounds after every operation. Since a uniform takes only 256 values,
/// radius, cos and sin are tabulated once per call; the per-element work is the
/// final rounded product.
fn fill_bf16(mt: &mut Mt19937, numel: usize) -> Vec<f32> {
    let mut radius = [0f32; 256];
    let mut cos = [0f32; 256];
    let mut sin = [0f32; 256];
    for k in 0..256 {
        let u = k as f32 / 256.0;
        // 1 - u is exact in bf16 for an 8-bit u, but round anyway to mirror torch.
        let u1 = round_bf16(1.0 - u);
        let log = round_bf16(u1.ln());
        let m2 = round_bf16(-2.0 * log);
        radius[k] = round_bf16(m2.sqrt());
        // `2.0f * pi<double> * u2` is a double; BFloat16(double) goes through float.
        let theta = round_bf16((2.0 * PI * u as f64) as f32);
        cos[k] = round_bf16(theta.cos());
        sin[k] = round_bf16(theta.sin());
    }
    fill_blocks(
        mt,
        numel,
        |r| (r & 0xff) as u8,
        |u, out| {
            for j in 0..8 {
                let (a, b) = (u[j] as usize, u[j + 8] as usize);
                // `* std + mean` (1 and 0 in bf16) only turns -0 into +0.
                out[j] = round_bf16(radius[a] * cos[b]) + 0.0;
                out[j + 8] = round_bf16(radius[a] * sin[b]) + 0.0;
            }
        },
    )
}

/// `normal_fill_AVX2`: 24-bit uniforms through `log256_ps` and `sincos256_ps`.
fn fill_f32(mt: &mut Mt19937, numel: usize) -> Vec<f32> {
    let draw = |r: u32| (r & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32);
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports FMA, checked just above.
            return fill_blocks(mt, numel, draw, |u, o| unsafe { box_muller16_fma(u, o) });
        }
    }
    fill_blocks(mt, numel, draw, box_muller16)
}

/// The same arithmetic compiled with hardware FMA, so `mul_add` is one instruction
/// instead of a libm call; the results are identical either way.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "fma")]
unsafe fn box_muller16_fma(u: &[f32; 16], out: &mut [f32]) {
    box_muller16(u, out)
}

/// `normal_fill_16_AVX2`: lanes j and j + 8 form a Box–Muller pair.
///
/// The wheel's GCC (`-O2`, default `-ffp-contract=fast`) fused every multiply whose
/// only use is an add into an FMA, taking the earlier multiply when an add has two;
/// each `mul_add` below marks one such fusion. Checked on 3M samples against torch:
/// dropping the polynomial, `e * Q1` or `-z / 2` fusions breaks parity for 0.1–1% of
/// elements (the range-reduction ones made no difference there).
#[inline(always)]
fn box_muller16(u: &[f32; 16], out: &mut [f32]) {
    const TWO_PI: f32 = (2.0 * PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - u[j];
        let radius = (-2.0 * log_ps(u1)).sqrt();
        let theta = TWO_PI * u[j + 8];
        let (s, c) = sincos_ps(theta);
        // `_mm256_fmadd_ps(n, std, mean)` with std = 1, mean = 0.
        out[j] = (radius * c).mul_add(1.0, 0.0);
        out[j + 8] = (radius * s).mul_add(1.0, 0.0);
    }
}

/// One lane of `log256_ps` (Cephes `logf`), for the (0, 1] inputs it gets here.
// The constants keep avx_mathfun.h's digits so they can be checked against it.
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn log_ps(x: f32) -> f32 {
    const P: [f32; 9] = [
        7.037_683_629_2E-2,
        -1.151_461_031_0E-1,
        1.167_699_874_0E-1,
        -1.242_014_084_6E-1,
        1.424_932_278_7E-1,
        -1.666_805_766_5E-1,
        2.000_071_476_5E-1,
        -2.499_999_399_3E-1,
        3.333_333_117_4E-1,
    ];
    const Q1: f32 = -2.121_944_40e-4;
    const Q2: f32 = 0.693_359_375;
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    // The mantissa with the exponent of 0.5: x in [0.5, 1).
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < std::f32::consts::FRAC_1_SQRT_2;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    e -= if below { 1.0 } else { 0.0 };
    x += tmp;
    let z = x * x;
    let mut y = P[0];
    for &p in &P[1..] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * Q1);
    // z * 0.5 and e * Q2 are exact, so whether they were fused does not matter.
    y -= z * 0.5;
    x += y;
    x + e * Q2
}

/// One lane of `sincos256_ps` (Cephes `sinf`/`cosf`), for the [0, 2π) inputs it gets here.
#[allow(clippy::excessive_precision)]
#[inline(always)]
fn sincos_ps(x: f32) -> (f32, f32) {
    const FOPI: f32 = 1.273_239_544_735_16;
    const DP1: f32 = -0.785_156_25;
    const DP2: f32 = -2.418_756_484_985_351_562_5e-4;
    const DP3: f32 = -3.774_894_977_445_941_08e-8;
    const SIN_P: [f32; 3] = [-1.951_529_589_1E-4, 8.332_160_873_6E-3, -1.666_665_461_1E-1];
    const COS_P: [f32; 3] = [
        2.443_315_711_809_948E-5,
        -1.388_731_625_493_765E-3,
        4.166_664_568_298_827E-2,
    ];
    let sign_in = x.to_bits() & 0x8000_0000;
    let x = x.abs();
    // Octant j, rounded up to even (truncating conversion, as `cvttps`).
    let j = (((x * FOPI) as i32) + 1) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let poly_mask = (j & 2) == 0;
    // Extended-precision range reduction x - y * pi/4.
    let x = y.mul_add(DP3, y.mul_add(DP2, y.mul_add(DP1, x)));
    let z = x * x;
    let mut yc = COS_P[0].mul_add(z, COS_P[1]);
    yc = yc.mul_add(z, COS_P[2]);
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;
    let mut ys = SIN_P[0].mul_add(z, SIN_P[1]);
    ys = ys.mul_add(z, SIN_P[2]);
    ys *= z;
    ys = ys.mul_add(x, x);
    // torch selects with masks and an add of zero, which turns a picked -0 into +0.
    let (s, c) = if poly_mask { (ys, yc) } else { (yc, ys) };
    let (s, c) = (s + 0.0, c + 0.0);
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_reference_outputs() {
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..3).map(|_| mt.next_u32()).collect();
        assert_eq!(first, [3_499_211_612, 581_869_302, 3_890_346_734]);
        // The C++ standard pins std::mt19937's 10000th output for the default seed.
        let mut mt = Mt19937::new(5489);
        assert_eq!(
            (0..10_000).map(|_| mt.next_u32()).last(),
            Some(4_123_659_995)
        );
    }

    #[test]
    fn bf16_fill_matches_torch() {
        // torch 2.6.0: torch.randn(16, dtype=torch.bfloat16, generator=...manual_seed(42)),
        // as bf16 bit patterns.
        let torch: [u16; 16] = [
            0xbf4f, 0xbfc4, 0x3ed0, 0x3e30, 0xbe7d, 0x3e51, 0xbf61, 0xbec6, 0x3f1a, 0x3e89, 0xbf5a,
            0xbe94, 0x3f80, 0xbf48, 0x3fb0, 0x3df3,
        ];
        let ours: Vec<u16> = torch_randn(42, 16, NoiseKind::TorchBf16)
            .iter()
            .map(|v| (v.to_bits() >> 16) as u16)
            .collect();
        assert_eq!(ours, torch);
    }

    #[test]
    fn scalar_path_matches_torch() {
        // torch 2.6.0, seed 42, 3 elements: bf16 then float32.
        let bf16 = torch_randn(42, 3, NoiseKind::TorchBf16);
        assert_eq!(bf16, [0.335_937_5, 0.128_906_25, 0.234_375]);
        let f32s = torch_randn(42, 3, NoiseKind::TorchF32);
        assert_eq!(f32s, [0.336_690_37, 0.128_809_4, 0.234_462_37]);
    }

    #[test]
    fn seed_high_bits_are_ignored() {
        for kind in [NoiseKind::TorchBf16, NoiseKind::TorchF32] {
            for numel in [5, 64, 70] {
                assert_eq!(
                    torch_randn((1 << 32) + 5, numel, kind),
                    torch_randn(5, numel, kind)
                );
            }
        }
    }

    #[test]
    fn bf16_values_are_bf16() {
        for v in torch_randn(7, 4096 + 5, NoiseKind::TorchBf16) {
            assert_eq!(v.to_bits() & 0xffff, 0, "{v}");
        }
    }

    #[test]
    fn portable_f32_path_equals_fma_path() {
        let numel = 16 * 4096 + 3;
        let draw = |r: u32| (r & 0x00ff_ffff) as f32 * (1.0 / (1u32 << 24) as f32);
        let portable = fill_blocks(&mut Mt19937::new(9), numel, draw, box_muller16);
        let dispatched = fill_f32(&mut Mt19937::new(9), numel);
        assert!(portable
            .iter()
            .zip(&dispatched)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
}
