//! `fluxfit quantize` then `fluxfit generate` on the result, end to end on the tiny fixtures:
//! the quantized flow model (and T5 encoder) give an image close to the unquantized one.
//!
//! Image bound: mean |Δ| over the RGB bytes (0–255) of a 64×64, 2-step image. Measured (this
//! CPU): q8_0 flow 0.42, q8_0 T5 0.40, q4_k flow (most of its 64-wide rows in the Q5_0
//! fallback) 2.37; the bounds are about 1.7× that. For scale, the same prompt with another seed
//! differs by far more (asserted: over 10× the loosest bound).

mod common;

use std::path::Path;

use common::*;

/// RGB bytes of a PNG.
fn rgb(path: &Path) -> Vec<u8> {
    pixels(path).2
}

/// `fluxfit quantize --in INPUT --out OUT --type T`, which must succeed; its stderr.
fn quantize(dir: &Path, input: &Path, out: &Path, t: &str) -> String {
    let o = succeeds(
        dir,
        &["quantize", "--in", &s(input), "--out", &s(out), "--type", t],
    );
    stderr(&o)
}

fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs())
        .sum::<f64>()
        / a.len() as f64
}

/// `generate` on the tiny dev parts with `flow` and `t5`, 64×64, 2 steps, seed 1 → RGB bytes.
fn image(dir: &Path, flow: &Path, t5: &Path, out: &str) -> Vec<u8> {
    image_seed(dir, flow, t5, out, "1")
}

fn image_seed(dir: &Path, flow: &Path, t5: &Path, out: &str, seed: &str) -> Vec<u8> {
    let f = fixtures();
    succeeds(
        dir,
        &[
            "generate",
            "--flow",
            &s(flow),
            "--ae",
            &s(&f.join("tiny-bfl/ae.safetensors")),
            "--t5",
            &s(t5),
            "--clip",
            &s(&f.join("tiny-diffusers/text_encoder")),
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "2",
            "--seed",
            seed,
            "--quiet",
            "--out",
            out,
        ],
    );
    rgb(&dir.join(out))
}

#[test]
fn quantize_then_generate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let f = fixtures();
    let flow = f.join("tiny-bfl/flux1-tiny-dev.safetensors");
    let t5 = f.join("tiny-diffusers/text_encoder_2");
    let reference = image(d, &flow, &t5, "ref.png");
    let other = mean_abs_diff(&image_seed(d, &flow, &t5, "seed2.png", "2"), &reference);
    println!("another seed: mean |Δ| {other:.3}");
    assert!(other > 40.0, "another seed differs by only {other}");

    // Flow model, Q8_0.
    let q8 = d.join("flux1-tiny-dev-Q8_0.gguf");
    let err = quantize(d, &flow, &q8, "q8_0");
    assert!(
        err.contains("flux architecture") && err.contains("wrote"),
        "{err}"
    );
    let diff = mean_abs_diff(&image(d, &q8, &t5, "q8.png"), &reference);
    println!("q8_0 flow: mean |Δ| {diff:.3}");
    assert!(diff < 0.7, "q8_0 image differs by {diff} on average");

    // Q4_K: the 64-wide rows fall back (said so), the image stays close.
    let q4 = d.join("flux1-tiny-dev-Q4_K.gguf");
    let err = quantize(d, &flow, &q4, "q4_k");
    assert!(
        err.contains("q4_k → q5_0") && err.contains("not a multiple of 256"),
        "{err}"
    );
    let diff = mean_abs_diff(&image(d, &q4, &t5, "q4.png"), &reference);
    println!("q4_k flow: mean |Δ| {diff:.3}");
    assert!(diff < 4.0, "q4_k image differs by {diff} on average");

    // T5 encoder, Q8_0, next to its tokenizer (looked up as ../tokenizer_2 of the file).
    let t5dir = d.join("t5");
    std::fs::create_dir(&t5dir).unwrap();
    copy_dir(
        &f.join("tiny-diffusers/tokenizer_2"),
        &d.join("tokenizer_2"),
    );
    let t5q = d.join("t5-encoder-Q8_0.gguf");
    let err = quantize(d, &t5, &t5q, "q8_0");
    assert!(err.contains("t5encoder"), "{err}");
    let diff = mean_abs_diff(&image(d, &flow, &t5q, "t5q.png"), &reference);
    println!("q8_0 T5: mean |Δ| {diff:.3}");
    assert!(diff < 0.7, "q8_0 T5 image differs by {diff} on average");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn quantize_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let flow = fixtures().join("tiny-bfl/flux1-tiny-dev.safetensors");
    let out = d.join("out.gguf");
    std::fs::write(&out, b"precious").unwrap();
    command_fails(
        d,
        &["quantize", "--in", &s(&flow), "--out", &s(&out)],
        &["out.gguf", "exists"],
    );
    assert_eq!(std::fs::read(&out).unwrap(), b"precious");

    let fresh = s(&d.join("fresh.gguf"));
    command_fails(
        d,
        &[
            "quantize",
            "--in",
            &s(&flow),
            "--out",
            &fresh,
            "--type",
            "q9_k",
        ],
        &["--type", "q9_k", "q4_k"],
    );
    command_fails(
        d,
        &[
            "quantize",
            "--in",
            &s(&flow),
            "--out",
            &fresh,
            "--keep",
            "double_blocks.*",
        ],
        &["--keep", "PATTERN=TYPE"],
    );
    let ae = fixtures().join("tiny-bfl/ae.safetensors");
    command_fails(
        d,
        &["quantize", "--in", &s(&ae), "--out", &fresh],
        &[
            "ae.safetensors",
            "neither a FLUX flow model",
            "nor a T5 encoder",
        ],
    );
    assert!(!d.join("fresh.gguf").exists());
    let left: Vec<_> = std::fs::read_dir(d).unwrap().collect();
    assert_eq!(left.len(), 1, "no partial files left behind");
}
