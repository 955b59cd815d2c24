//! `torch_randn` against torch 2.6.0's own draws (tools/reference/make_noise_golden.py):
//! every element must match bit for bit, or a seed no longer means the same image.

use fluxfit::noise::{torch_randn, NoiseKind};
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/golden/noise.safetensors"
);

/// Parses `bf16_s42_1x16x8x12` into (kind, seed, shape).
fn parse_name(name: &str) -> (NoiseKind, u64, Vec<usize>) {
    let mut parts = name.split('_');
    let kind = match parts.next() {
        Some("bf16") => NoiseKind::TorchBf16,
        Some("f32") => NoiseKind::TorchF32,
        other => panic!("{name}: unknown dtype prefix {other:?}"),
    };
    let seed = parts
        .next()
        .and_then(|s| s.strip_prefix('s'))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{name}: no seed"));
    let shape = parts
        .next()
        .unwrap_or_else(|| panic!("{name}: no shape"))
        .split('x')
        .map(|d| d.parse().expect("shape dimension"))
        .collect();
    (kind, seed, shape)
}

#[test]
fn torch_randn_matches_torch_2_6_0_bit_for_bit() {
    let bytes = std::fs::read(GOLDEN).expect("read noise.safetensors");
    let golden = SafeTensors::deserialize(&bytes).expect("parse noise.safetensors");
    let mut names = golden.names();
    names.sort();
    // 2 dtypes x 5 seeds x 7 shapes.
    assert_eq!(names.len(), 70, "unexpected golden contents: {names:?}");

    let mut failures = Vec::new();
    for name in names {
        let view = golden.tensor(name).expect("tensor");
        assert_eq!(view.dtype(), Dtype::F32, "{name}");
        let (kind, seed, shape) = parse_name(name);
        assert_eq!(view.shape(), shape.as_slice(), "{name}");
        let expected: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let numel = shape.iter().product();
        let got = torch_randn(seed, numel, kind);
        assert_eq!(got.len(), expected.len(), "{name}");
        let mismatches: Vec<usize> = (0..numel)
            .filter(|&i| got[i].to_bits() != expected[i].to_bits())
            .collect();
        if let Some(&i) = mismatches.first() {
            failures.push(format!(
                "{name}: {} of {numel} differ; first at {i}: got {:e} ({:#010x}), torch {:e} ({:#010x})",
                mismatches.len(),
                got[i],
                got[i].to_bits(),
                expected[i],
                expected[i].to_bits()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
