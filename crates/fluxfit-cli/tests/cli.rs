//! The `fluxfit` binary as users run it: outputs, metadata, the interactive loop, both checkpoint
//! layouts, and bad input (a clear error naming what is at fault, a non-zero exit, no panic).
//!
//! Images are tiny (64×64, 1–2 steps) so the whole file runs in seconds.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;
use fluxfit::image::png_text;

/// Small and fast unless a test overrides a flag (clap refuses repeats, so callers that set
/// one of these build their own list).
const SMALL: &[&str] = &["--width", "64", "--height", "64", "--steps", "2"];

/// Runs `fluxfit generate ARGS` and expects success.
fn generate(dir: &Path, args: &[&str]) -> Output {
    generate_stdin(dir, args, None)
}

fn generate_stdin(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    succeeds_with(dir, &all, stdin)
}

/// Runs `fluxfit generate ARGS`, expects a clean failure and returns stderr, which must name
/// every one of `names`.
#[track_caller]
fn fails(dir: &Path, args: &[&str], names: &[&str]) -> String {
    let mut all = vec!["generate"];
    all.extend_from_slice(args);
    command_fails(dir, &all, names)
}

fn text(path: &Path) -> Vec<(String, String)> {
    png_text(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn chunk(chunks: &[(String, String)], key: &str) -> String {
    chunks
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no `{key}` text chunk in {chunks:?}"))
}

// ---------------------------------------------------------------------------------------------
// Acceptance

#[test]
fn png_records_the_request_and_is_never_overwritten() {
    let dir = tempdir();
    let d = dir.path();
    let args = [
        SMALL,
        &[
            "--model",
            "tiny",
            "--prompt",
            "a red fox in the snow",
            "--seed",
            "42",
            "--guidance",
            "3.5",
            "--out",
            "x.png",
        ],
    ]
    .concat();
    let o = generate(d, &args);
    let x = d.join("x.png");
    assert!(
        x.is_file(),
        "stdout: {}",
        String::from_utf8_lossy(&o.stdout)
    );
    let chunks = text(&x);
    assert_eq!(chunk(&chunks, "prompt"), "a red fox in the snow");
    assert_eq!(chunk(&chunks, "seed"), "42");
    assert_eq!(chunk(&chunks, "steps"), "2");
    assert_eq!(chunk(&chunks, "guidance"), "3.5");
    assert_eq!(chunk(&chunks, "width"), "64");
    assert_eq!(chunk(&chunks, "height"), "64");
    assert!(chunk(&chunks, "model").starts_with("tiny"), "{chunks:?}");
    assert_eq!(chunk(&chunks, "dtype"), "f32");
    assert_eq!(
        chunk(&chunks, "software"),
        format!("fluxfit {}", fluxfit::version())
    );
    let params = chunk(&chunks, "parameters");
    assert!(params.starts_with("a red fox in the snow\n"), "{params}");
    for part in [
        "Steps: 2",
        "Seed: 42",
        "Size: 64x64",
        "Distilled CFG Scale: 3.5",
    ] {
        assert!(params.contains(part), "`{part}` not in {params}");
    }
    let (w, h, first) = pixels(&x);
    assert_eq!((w, h), (64, 64));

    // The same --out again: x-1.png, x.png untouched; the same seed gives the same pixels.
    let before = std::fs::read(&x).unwrap();
    let o = generate(d, &args);
    assert!(stderr(&o).contains("x-1.png"), "{}", stderr(&o));
    assert_eq!(std::fs::read(&x).unwrap(), before, "x.png was rewritten");
    let x1 = d.join("x-1.png");
    assert_eq!(pixels(&x1).2, first, "same seed, different pixels");

    // A different seed: different pixels.
    let mut other = args.clone();
    let i = other.iter().position(|a| *a == "42").unwrap();
    other[i] = "43";
    generate(d, &other);
    let x2 = d.join("x-2.png");
    assert_eq!(chunk(&text(&x2), "seed"), "43");
    assert_ne!(pixels(&x2).2, first, "seeds 42 and 43 gave the same pixels");
}

#[test]
fn jpeg_output() {
    let dir = tempdir();
    generate(
        dir.path(),
        &[SMALL, &["-q", "--seed", "1", "--out", "y.jpg"]].concat(),
    );
    let bytes = std::fs::read(dir.path().join("y.jpg")).expect("y.jpg");
    assert_eq!(&bytes[..3], &[0xFF, 0xD8, 0xFF], "not a JPEG");
}

#[test]
fn sides_are_floored_to_multiples_of_16_and_said_so() {
    let dir = tempdir();
    let o = generate(
        dir.path(),
        &[
            "--width", "72", "--height", "64", "--steps", "1", "--seed", "1", "--out", "f.png",
        ],
    );
    let err = stderr(&o);
    assert!(err.contains("width 72 floored to 64"), "{err}");
    let f = dir.path().join("f.png");
    assert_eq!(chunk(&text(&f), "width"), "64");
    assert_eq!(pixels(&f).0, 64);
}

#[test]
fn interactive_loop_reads_commands_from_stdin() {
    let dir = tempdir();
    generate_stdin(
        dir.path(),
        &["--loop", "--height", "64", "--steps", "1", "--out", "l.png"],
        Some("/w 128\n/s 5\nfirst prompt\n/q\n"),
    );
    let pngs: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "png"))
        .collect();
    assert_eq!(pngs, vec![dir.path().join("l.png")], "one image expected");
    let chunks = text(&pngs[0]);
    assert_eq!(chunk(&chunks, "width"), "128");
    assert_eq!(chunk(&chunks, "seed"), "5");
    assert_eq!(chunk(&chunks, "prompt"), "first prompt");
    assert_eq!(pixels(&pngs[0]).0, 128);
}

#[test]
fn f32_noise_differs_from_the_default() {
    let dir = tempdir();
    let d = dir.path();
    generate(
        d,
        &[SMALL, &["-q", "--seed", "3", "--out", "a.png"]].concat(),
    );
    generate(
        d,
        &[
            SMALL,
            &["-q", "--seed", "3", "--noise", "f32", "--out", "b.png"],
        ]
        .concat(),
    );
    assert_eq!(chunk(&text(&d.join("b.png")), "noise"), "torch-f32");
    assert_ne!(pixels(&d.join("a.png")).2, pixels(&d.join("b.png")).2);
}

#[test]
fn bfl_files_and_diffusers_folder_give_the_same_pixels() {
    let dir = tempdir();
    let d = dir.path();
    let common = [SMALL, &["-q", "--seed", "11", "--prompt", "a tiny test"]].concat();
    let flow = s(&bfl_flow());
    let mut bfl: Vec<&str> = common.clone();
    bfl.extend(["--flow", &flow]);
    let parts = parts();
    bfl.extend(parts.iter().map(String::as_str));
    bfl.extend(["--out", "bfl.png"]);
    generate(d, &bfl);
    let folder = s(&fixtures().join("tiny-diffusers"));
    let mut diffusers = common.clone();
    diffusers.extend(["--model", &folder, "--out", "diffusers.png"]);
    generate(d, &diffusers);
    let (a, b) = (d.join("bfl.png"), d.join("diffusers.png"));
    assert_eq!(chunk(&text(&a), "variant"), "flux-dev");
    assert_eq!(chunk(&text(&b), "variant"), "flux-dev");
    assert_eq!(pixels(&a), pixels(&b), "the two layouts disagree");
}

// ---------------------------------------------------------------------------------------------
// Bad input

/// `--flow FLOW --vae … --t5 … --clip …` plus small sizes.
fn with_flow(flow: &Path, extra: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = vec!["--flow".into(), s(flow)];
    v.extend(parts());
    v.extend(SMALL.iter().map(|a| a.to_string()));
    v.extend(extra.iter().map(|a| a.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Rewrites the header of a safetensors file (data section kept as is).
fn edit_header(
    src: &Path,
    dst: &Path,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) {
    let bytes = std::fs::read(src).expect("fixture");
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("fixture header");
    edit(&mut header);
    let mut head = serde_json::to_vec(&header).unwrap();
    head.resize(head.len().div_ceil(8) * 8, b' ');
    let mut out = (head.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&head);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(dst, out).expect("write edited copy");
}

#[test]
fn missing_checkpoint_file() {
    let dir = tempdir();
    let missing = dir.path().join("flux1-missing.safetensors");
    fails(
        dir.path(),
        &strs(&with_flow(&missing, &[])),
        &[&s(&missing)],
    );
}

#[test]
fn truncated_checkpoint() {
    let dir = tempdir();
    let bytes = std::fs::read(bfl_flow()).unwrap();
    let cut = dir.path().join("flux1-cut-dev.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    fails(
        dir.path(),
        &strs(&with_flow(&cut, &[])),
        &[&s(&cut), "truncated"],
    );
}

#[test]
fn corrupt_header() {
    let dir = tempdir();
    let bad = dir.path().join("flux1-garbage-dev.safetensors");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&bad, garbage).unwrap();
    fails(
        dir.path(),
        &strs(&with_flow(&bad, &[])),
        &[&s(&bad), "corrupt"],
    );
    // A plausible length but a header that is not JSON.
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"this is not json and some data");
    let bad = dir.path().join("flux1-notjson-dev.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    fails(
        dir.path(),
        &strs(&with_flow(&bad, &[])),
        &[&s(&bad), "JSON"],
    );
}

#[test]
fn checkpoint_missing_a_key() {
    let dir = tempdir();
    let key = "double_blocks.0.img_attn.proj.weight";
    let copy = dir.path().join("flux1-nokey-dev.safetensors");
    edit_header(&bfl_flow(), &copy, |h| {
        h.remove(key).expect("fixture has the key");
    });
    fails(dir.path(), &strs(&with_flow(&copy, &[])), &[key, &s(&copy)]);
}

#[test]
fn checkpoint_with_a_wrong_shape() {
    let dir = tempdir();
    let key = "double_blocks.0.img_attn.proj.weight";
    let copy = dir.path().join("flux1-shape-dev.safetensors");
    edit_header(&bfl_flow(), &copy, |h| {
        assert_eq!(h[key]["shape"], serde_json::json!([64, 64]));
        h[key]["shape"] = serde_json::json!([32, 128]);
    });
    fails(
        dir.path(),
        &strs(&with_flow(&copy, &[])),
        &[key, "[32, 128]", "[64, 64]"],
    );
    // A tensor of the wrong rank among those the configuration is read from.
    let key = "txt_in.weight";
    let copy = dir.path().join("flux1-rank-dev.safetensors");
    edit_header(&bfl_flow(), &copy, |h| {
        h[key]["shape"] = serde_json::json!([2048]);
    });
    fails(
        dir.path(),
        &strs(&with_flow(&copy, &[])),
        &[key, "[2048]", "2-D"],
    );
}

#[test]
fn variant_that_does_not_fit_the_checkpoint() {
    let dir = tempdir();
    fails(
        dir.path(),
        &strs(&with_flow(&bfl_flow(), &["--variant", "flux-dev-fill"])),
        &["flux-dev-fill", "fits flux-dev"],
    );
    fails(
        dir.path(),
        &strs(&with_flow(&bfl_flow(), &["--variant", "flux-pro"])),
        &["flux-pro", "flux-schnell"],
    );
}

#[test]
fn folder_of_neither_layout() {
    let dir = tempdir();
    let empty = dir.path().join("not-a-model");
    std::fs::create_dir(&empty).unwrap();
    std::fs::write(empty.join("readme.txt"), "hello").unwrap();
    fails(
        dir.path(),
        &["--model", &s(&empty)],
        &[
            &s(&empty),
            "model_index.json",
            "transformer/",
            "flux1-*.safetensors",
            "ae.safetensors",
        ],
    );
}

#[test]
fn sizes_out_of_range() {
    let dir = tempdir();
    let d = dir.path();
    fails(d, &["--width", "32", "--height", "64"], &["width 32", "64"]);
    fails(
        d,
        &["--width", "64", "--height", "5000"],
        &["height 5000", "4096", "--allow-large"],
    );
    // --allow-large lets 5000 through validation: the request then fails on the next check
    // (T5 tokens), before any compute, which keeps this test fast.
    let err = fails(
        d,
        &[
            "--width",
            "64",
            "--height",
            "5000",
            "--allow-large",
            "--t5-tokens",
            "0",
        ],
        &["--t5-tokens 0"],
    );
    assert!(!err.contains("height"), "{err}");
    fails(
        d,
        &["--width", "64", "--height", "64", "--steps", "0"],
        &["steps"],
    );
}

#[test]
fn unwritable_output() {
    let dir = tempdir();
    let d = dir.path();
    let nowhere = d.join("no-such-folder/x.png");
    fails(
        d,
        &[SMALL, &["--out", &s(&nowhere)]].concat(),
        &[&s(&nowhere), "does not exist"],
    );
    // A regular file standing where the folder should be (chmod does not stop root).
    let file = d.join("a-file");
    std::fs::write(&file, "x").unwrap();
    let under_file = file.join("x.png");
    fails(
        d,
        &[SMALL, &["--out", &s(&under_file)]].concat(),
        &[&s(&under_file), "not a folder"],
    );
    fails(
        d,
        &[SMALL, &["--out", "x.gif"]].concat(),
        &["x.gif", ".gif"],
    );
    assert!(
        std::fs::read_dir(d).unwrap().count() == 1,
        "something was written"
    );
}

#[test]
fn unknown_device() {
    let dir = tempdir();
    fails(
        dir.path(),
        &[SMALL, &["--device", "tpu"]].concat(),
        &["tpu"],
    );
    fails(
        dir.path(),
        &[SMALL, &["--device", "cuda:x"]].concat(),
        &["cuda:x"],
    );
}

/// Asking for a GPU where there is none (or in a build without CUDA) is a clear error that
/// names the device and the way out, never a crash.
#[test]
fn no_cuda_device() {
    if std::process::Command::new("nvidia-smi").output().is_ok() {
        return; // a GPU machine: the device opens
    }
    let dir = tempdir();
    fails(
        dir.path(),
        &[SMALL, &["--device", "cuda:0"]].concat(),
        &["--device cuda:0", "--device cpu"],
    );
}

#[test]
fn unknown_model() {
    let dir = tempdir();
    fails(
        dir.path(),
        &["--model", "not-a-model"],
        &["not-a-model", "flux-dev"],
    );
    fails(
        dir.path(),
        &["--model", "./missing-folder"],
        &["./missing-folder"],
    );
    let flow = s(&bfl_flow());
    fails(dir.path(), &["--model", &flow], &[&flow, "--flow"]);
}

#[test]
fn img2img_and_tiled_decode_are_recorded() {
    let dir = tempdir();
    let d = dir.path();
    let init = fixtures().join("img2img_init.png");
    let init = s(&init);
    // No size: the 96x64 init image (already multiples of 16) sets it.
    generate(
        d,
        &[
            "--model",
            "tiny",
            "-q",
            "--steps",
            "2",
            "--seed",
            "5",
            "--init-image",
            &init,
            "--strength",
            "0.6",
            "--vae-tile",
            "64",
            "--out",
            "i.png",
        ],
    );
    let f = d.join("i.png");
    let chunks = text(&f);
    assert_eq!(chunk(&chunks, "init_image"), "img2img_init.png");
    assert_eq!(chunk(&chunks, "strength"), "0.6");
    assert!(
        chunk(&chunks, "plan").ends_with(",vae-tile=64"),
        "{chunks:?}"
    );
    assert_eq!((pixels(&f).0, pixels(&f).1), (96, 64));
    // With a size: resized to it.
    generate(
        d,
        &[
            SMALL,
            &[
                "--model",
                "tiny",
                "-q",
                "--init-image",
                &init,
                "--out",
                "j.png",
            ],
        ]
        .concat(),
    );
    let j = d.join("j.png");
    assert_eq!((pixels(&j).0, pixels(&j).1), (64, 64));
    assert_eq!(chunk(&text(&j), "strength"), "0.8");
    // A strength outside [0, 1] is refused.
    fails(
        d,
        &[SMALL, &["--init-image", &init, "--strength", "1.5"]].concat(),
        &["1.5"],
    );
}

#[test]
fn fill_inpaints_and_outpaints_with_a_tiny_fill_model() {
    let dir = tempdir();
    let d = dir.path();
    let image = s(&fixtures().join("fill_image.png"));
    let mask = s(&fixtures().join("fill_mask.png"));
    let base = [
        "fill",
        "--model",
        "tiny",
        "--variant",
        "dev-fill",
        "-q",
        "--steps",
        "1",
        "--seed",
        "3",
        "--image",
        &image,
        "--keep-size",
    ];
    let run = |extra: &[&str]| {
        let args = [&base[..], extra].concat();
        let o = fluxfit(d, &args, None);
        assert!(o.status.success(), "fluxfit {args:?}:\n{}", stderr(&o));
    };
    run(&["--mask", &mask, "--out", "in.png"]);
    let f = d.join("in.png");
    let chunks = text(&f);
    assert_eq!(chunk(&chunks, "fill_image"), "fill_image.png");
    assert_eq!(chunk(&chunks, "fill_mask"), "fill_mask.png");
    assert_eq!(chunk(&chunks, "guidance"), "30");
    assert_eq!(chunk(&chunks, "t5_tokens"), "128");
    assert_eq!((pixels(&f).0, pixels(&f).1), (96, 64));

    // Outpainting 96x64 by a quarter on the left and right: 144 → 128 (4.5 rounds to even).
    run(&["--outpaint", "left=0.25,right=0.25", "--out", "out.png"]);
    let f = d.join("out.png");
    assert_eq!((pixels(&f).0, pixels(&f).1), (128, 64));
    let m = chunk(&text(&f), "fill_mask");
    assert!(m.starts_with("outpaint left=0.25,right=0.25"), "{m}");
    assert!(m.contains("canvas 128x64, image at 16,0"), "{m}");

    // No mask and no alpha channel: refused, naming the fix.
    let o = fluxfit(d, &[&base[..], &["--out", "x.png"]].concat(), None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no alpha channel"), "{}", stderr(&o));
}

// ---------------------------------------------------------------------------------------------
// Editing (Kontext), structural control (Canny / Depth) and control LoRAs

fn size(path: &Path) -> (u32, u32) {
    let (w, h, _) = pixels(path);
    (w, h)
}

fn pngs_in(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "png")
        })
        .count()
}

#[test]
fn edit_with_a_tiny_kontext_model_records_the_image() {
    let dir = tempdir();
    let d = dir.path();
    let image = s(&fixtures().join("kontext_image.png"));
    let base = [
        "edit",
        "--model",
        "tiny",
        "--variant",
        "kontext",
        "--image",
        &image,
        "--prompt",
        "make the square blue",
        "--keep-size",
        "--steps",
        "2",
        "--seed",
        "7",
    ];
    // The 64x80 image is encoded as it is (--keep-size) and sets the output size.
    let o = succeeds(d, &[&base[..], &["--out", "e.png"]].concat());
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("e.png (64x80, seed 7)"), "{stdout}");
    let e = d.join("e.png");
    assert_eq!(size(&e), (64, 80));
    let chunks = text(&e);
    assert_eq!(chunk(&chunks, "edit_image"), "kontext_image.png");
    assert_eq!(chunk(&chunks, "edit_image_size"), "64x80");
    assert_eq!(chunk(&chunks, "variant"), "flux-dev-kontext");
    assert_eq!(chunk(&chunks, "prompt"), "make the square blue");
    assert_eq!(chunk(&chunks, "steps"), "2");
    // Kontext's defaults: guidance 2.5, 512 T5 tokens.
    assert_eq!(chunk(&chunks, "guidance"), "2.5");
    assert_eq!(chunk(&chunks, "t5_tokens"), "512");
    // Another target size: the conditioning image stays at 64x80.
    succeeds(
        d,
        &[
            &base[..],
            &["--width", "96", "--height", "64", "--out", "f.png"],
        ]
        .concat(),
    );
    let f = d.join("f.png");
    assert_eq!(size(&f), (96, 64));
    assert_eq!(chunk(&text(&f), "edit_image_size"), "64x80");
}

#[test]
fn edit_refuses_other_models_and_bad_aspect_ratios() {
    let dir = tempdir();
    let d = dir.path();
    let image = s(&fixtures().join("kontext_image.png"));
    let edit = ["edit", "--image", &image, "--prompt", "x", "--steps", "1"];
    // Without --keep-size the 64x80 image is snapped to the Kontext size of closest aspect
    // ratio; the default tiny model (schnell) is then refused before any compute.
    let err = command_fails(d, &edit, &["flux-dev-kontext", "flux-schnell"]);
    assert!(err.contains("resized to 944x1104"), "{err}");
    // --aspect-ratio sets the target at about 1 MP (the line is printed before the refusal).
    let err = command_fails(
        d,
        &[&edit[..], &["--keep-size", "--aspect-ratio", "16:9"]].concat(),
        &["flux-dev-kontext"],
    );
    assert!(err.contains("1360x768 from a 64x80 image"), "{err}");
    // A ratio that is not W:H.
    command_fails(
        d,
        &[
            &edit[..],
            &[
                "--model",
                "tiny",
                "--variant",
                "kontext",
                "--aspect-ratio",
                "16x9",
            ],
        ]
        .concat(),
        &["--aspect-ratio 16x9", "W:H"],
    );
    assert_eq!(pngs_in(d), 0, "a refused edit wrote an image");
}

#[test]
fn control_image_with_a_canny_model_and_with_a_canny_lora() {
    let dir = tempdir();
    let d = dir.path();
    let control = s(&fixtures().join("control_image.png"));
    let canny_flow = fixtures().join("tiny-variants/flux1-tiny-canny-dev.safetensors");
    let lora = s(&fixtures().join("tiny-bfl/flux1-tiny-canny-dev-lora.safetensors"));
    let run = |flow: &Path, extra: &[&str], out: &str| -> PathBuf {
        let mut args: Vec<String> = vec!["generate".into(), "--flow".into(), s(flow)];
        args.extend(parts());
        let fixed = [
            "-q",
            "--steps",
            "2",
            "--seed",
            "9",
            "--control-image",
            &control,
        ];
        args.extend(fixed.iter().chain(extra).map(|a| a.to_string()));
        args.extend(["--out".to_string(), out.to_string()]);
        succeeds(d, &strs(&args));
        d.join(out)
    };

    // The Canny model: no size given, so the 96x64 control image sets it.
    let c = run(&canny_flow, &[], "canny.png");
    assert_eq!(size(&c), (96, 64));
    let chunks = text(&c);
    assert_eq!(chunk(&chunks, "variant"), "flux-dev-canny");
    assert_eq!(chunk(&chunks, "control_image"), "control_image.png");
    assert_eq!(chunk(&chunks, "control"), "canny 50/200");
    assert_eq!(chunk(&chunks, "guidance"), "30");
    assert!(!chunks.iter().any(|(k, _)| k == "lora"), "{chunks:?}");
    // --control-raw: the image itself is the control, so the pixels change.
    let raw = run(&canny_flow, &["--control-raw"], "raw.png");
    assert_eq!(chunk(&text(&raw), "control"), "as given");
    assert_ne!(
        pixels(&raw).2,
        pixels(&c).2,
        "--control-raw changed nothing"
    );
    // A size resizes the control image to it.
    let small = run(
        &canny_flow,
        &["--width", "64", "--height", "64"],
        "small.png",
    );
    assert_eq!(size(&small), (64, 64));

    // dev + the Canny LoRA is a Canny model; the LoRA and its scale are recorded.
    let l = run(&bfl_flow(), &["--lora", &lora], "lora.png");
    assert_eq!(size(&l), (96, 64));
    let chunks = text(&l);
    assert_eq!(chunk(&chunks, "variant"), "flux-dev-canny");
    assert_eq!(chunk(&chunks, "control"), "canny 50/200");
    assert_eq!(
        chunk(&chunks, "lora"),
        "flux1-tiny-canny-dev-lora.safetensors"
    );
    assert_eq!(chunk(&chunks, "lora_scale"), "0.85");
    let half = run(
        &bfl_flow(),
        &["--lora", &lora, "--lora-scale", "0.5"],
        "half.png",
    );
    assert_eq!(chunk(&text(&half), "lora_scale"), "0.5");
    assert_ne!(
        pixels(&half).2,
        pixels(&l).2,
        "--lora-scale changed nothing"
    );
    // Unmerged LoRA tensors are staged with their block: streaming gives the same pixels.
    let streamed = run(
        &bfl_flow(),
        &["--lora", &lora, "--plan", "stream:1:2"],
        "streamed.png",
    );
    assert!(
        chunk(&text(&streamed), "plan").contains("flow=stream:1:2"),
        "{:?}",
        text(&streamed)
    );
    assert_eq!(
        pixels(&streamed).2,
        pixels(&l).2,
        "a streamed LoRA run differs from the resident one"
    );
}

#[test]
fn depth_control_takes_the_image_as_the_depth_map() {
    let dir = tempdir();
    let d = dir.path();
    let control = s(&fixtures().join("control_image.png"));
    succeeds(
        d,
        &[
            "generate",
            "--model",
            "tiny",
            "--variant",
            "depth",
            "-q",
            "--steps",
            "1",
            "--seed",
            "2",
            "--control-image",
            &control,
            "--out",
            "depth.png",
        ],
    );
    let f = d.join("depth.png");
    assert_eq!(size(&f), (96, 64));
    let chunks = text(&f);
    assert_eq!(chunk(&chunks, "variant"), "flux-dev-depth");
    assert_eq!(chunk(&chunks, "control"), "depth map as given");
    assert_eq!(chunk(&chunks, "guidance"), "10");
}

#[test]
fn control_image_needs_a_control_model_and_a_fitting_lora() {
    let dir = tempdir();
    let d = dir.path();
    let control = fixtures().join("control_image.png");
    let control = s(&control);
    // Plain dev (fixture files) and schnell (built in): refused, pointing at --lora.
    fails(
        d,
        &strs(&with_flow(&bfl_flow(), &["--control-image", &control])),
        &["--lora", "in_channels 64"],
    );
    fails(
        d,
        &[
            "--model",
            "tiny",
            "--steps",
            "1",
            "--control-image",
            &control,
        ],
        &["--lora", "Canny or Depth"],
    );
    // The Canny LoRA on the Fill model: img_in is 384 wide there, the LoRA's 128.
    let lora = s(&fixtures().join("tiny-bfl/flux1-tiny-canny-dev-lora.safetensors"));
    let fill = fixtures().join("tiny-variants/flux1-tiny-fill-dev.safetensors");
    fails(
        d,
        &strs(&with_flow(
            &fill,
            &["--lora", &lora, "--control-image", &control],
        )),
        &[&lora, "img_in.lora_A.weight", "[64, 384]"],
    );
    // --control-raw and --lora-scale only make sense with what they modify.
    let o = fluxfit(d, &["generate", "--control-raw"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--control-image"), "{}", stderr(&o));
    let o = fluxfit(d, &["generate", "--lora-scale", "0.5"], None);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--lora"), "{}", stderr(&o));
    assert_eq!(pngs_in(d), 0, "a refused run wrote an image");
}

/// A control model asked for a plain text-to-image run should be refused before any compute,
/// naming `--control-image`.
#[test]
fn a_control_model_without_a_control_image_is_refused_by_name() {
    let dir = tempdir();
    let canny_flow = fixtures().join("tiny-variants/flux1-tiny-canny-dev.safetensors");
    fails(
        dir.path(),
        &strs(&with_flow(&canny_flow, &[])),
        &["--control-image"],
    );
}

#[test]
fn regions_make_a_canvas_and_refine_an_enlarged_image() {
    let dir = tempdir();
    let d = dir.path();
    let args = [
        "regions",
        "--width",
        "256",
        "--height",
        "128",
        "--tile",
        "128",
        "--overlap",
        "32",
        "--steps",
        "1",
        "--seed",
        "5",
        "--prompt",
        "a long coast",
        "--out",
        "r.png",
        "--report-memory",
    ];
    let o = succeeds(d, &args);
    let out = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(out.contains("3 regions"), "{out}");
    assert!(out.contains("largest region peak"), "{out}");
    let png = d.join("r.png");
    assert_eq!(size(&png), (256, 128));
    let meta = text(&png);
    let regions = chunk(&meta, "regions");
    for want in ["3 regions of 128x128", "overlap 32", "seeds 5..7", "Hold"] {
        assert!(regions.contains(want), "`{want}` not in {regions}");
    }
    // Refining: the source enlarged ×2, its name and the strength recorded.
    let init = fixtures().join("img2img_init.png");
    let o = succeeds(
        d,
        &[
            "regions",
            "--from",
            &s(&init),
            "--scale",
            "2",
            "--strength",
            "0.5",
            "--tile",
            "128",
            "--overlap",
            "32",
            "--steps",
            "2",
            "--out",
            "up.png",
        ],
    );
    assert!(o.status.success());
    let png = d.join("up.png");
    assert_eq!(size(&png), (192, 128));
    let meta = text(&png);
    assert_eq!(chunk(&meta, "regions_from"), "img2img_init.png");
    assert_eq!(chunk(&meta, "strength"), "0.5");
    assert!(chunk(&meta, "regions").contains("Refine"));
    // Bad layouts are refused by name.
    command_fails(
        d,
        &[
            "regions",
            "--width",
            "256",
            "--height",
            "128",
            "--tile",
            "128",
            "--overlap",
            "100",
        ],
        &["overlap 100"],
    );
    command_fails(d, &["regions", "--prompt", "x"], &["--width"]);
}

#[test]
fn loops_take_the_next_input_image() {
    let dir = tempdir();
    let d = dir.path();
    let control = fixtures().join("control_image.png");
    let other = fixtures().join("img2img_init.png");
    // Control: the second image comes from `/i`, the size stays the first one's.
    let stdin = format!(
        "a gold robot\n/i {}\n/s 3\na silver robot\n/i /nope.png\n/q\n",
        s(&other)
    );
    let o = succeeds_with(
        d,
        &[
            "generate",
            "--model",
            "tiny",
            "--variant",
            "canny",
            "--control-image",
            &s(&control),
            "--steps",
            "1",
            "--loop",
            "--out",
            "c.png",
        ],
        Some(&stdin),
    );
    assert!(
        stderr(&o).contains("/i /nope.png: no such file"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        chunk(&text(&d.join("c.png")), "control_image"),
        "control_image.png"
    );
    let second = text(&d.join("c-1.png"));
    assert_eq!(chunk(&second, "control_image"), "img2img_init.png");
    assert_eq!(chunk(&second, "seed"), "3");
    assert_eq!(size(&d.join("c-1.png")), (96, 64));
    // Edit: `/i`, `/ar` (checked when given) and `/w auto`.
    let kontext = fixtures().join("kontext_image.png");
    let stdin = format!(
        "make it blue\n/i {}\n/ar 1000:1\nmake it red\n/q\n",
        s(&other)
    );
    let o = succeeds_with(
        d,
        &[
            "edit",
            "--model",
            "tiny",
            "--variant",
            "kontext",
            "--keep-size",
            "--image",
            &s(&kontext),
            "--steps",
            "1",
            "--loop",
            "--out",
            "e.png",
        ],
        Some(&stdin),
    );
    assert!(stderr(&o).contains("too extreme"), "{}", stderr(&o));
    assert_eq!(size(&d.join("e.png")), (64, 80));
    assert_eq!(size(&d.join("e-1.png")), (96, 64));
    assert_eq!(
        chunk(&text(&d.join("e-1.png")), "edit_image"),
        "img2img_init.png"
    );
    assert_eq!(chunk(&text(&d.join("e-1.png")), "prompt"), "make it red");
}

#[test]
fn fill_loop_takes_the_next_mask() {
    let dir = tempdir();
    let d = dir.path();
    let image = fixtures().join("fill_image.png");
    let mask = fixtures().join("fill_mask.png");
    let stdin = format!("a cup\n/m {}\n/s 4\na plate\n/i /nope.png\n/q\n", s(&mask));
    let o = succeeds_with(
        d,
        &[
            "fill",
            "--model",
            "tiny",
            "--variant",
            "fill",
            "--image",
            &s(&image),
            "--outpaint",
            "right=0.5",
            "--keep-size",
            "--steps",
            "1",
            "--loop",
            "--out",
            "f.png",
        ],
        Some(&stdin),
    );
    assert!(stderr(&o).contains("/nope.png"), "{}", stderr(&o));
    // The first outpaints (96 + 48 rounded to 32: 128 wide), the second inpaints with the mask
    // given by `/m`.
    assert_eq!(size(&d.join("f.png")), (128, 64));
    assert!(chunk(&text(&d.join("f.png")), "fill_mask").starts_with("outpaint"));
    let second = text(&d.join("f-1.png"));
    assert_eq!(size(&d.join("f-1.png")), (96, 64));
    assert_eq!(chunk(&second, "fill_mask"), "fill_mask.png");
    assert_eq!(chunk(&second, "prompt"), "a plate");
    assert_eq!(chunk(&second, "seed"), "4");
}

#[test]
fn plan_compares_storage_types_and_plans_quantized_files() {
    let dir = tempdir();
    let d = dir.path();
    let plan = |extra: &[&str]| -> String {
        let mut args = vec![
            "plan", "--model", "flux-dev", "--width", "1024", "--height", "1024", "--vram", "8GB",
        ];
        args.extend_from_slice(extra);
        String::from_utf8_lossy(&succeeds(d, &args).stdout).to_string()
    };
    let auto = plan(&[]);
    assert!(
        auto.contains("storage of the flow and T5 weights"),
        "{auto}"
    );
    for row in [
        "as stored (bf16)",
        "q8_0",
        "q4_k",
        "flow+t5 packed",
        "9.8e-2",
    ] {
        assert!(auto.contains(row), "`{row}` not in:\n{auto}");
    }
    let auto = plan(&["--quant", "auto"]);
    assert!(auto.contains("--quant auto takes"), "{auto}");
    let none = plan(&["--quant", "none"]);
    assert!(
        !none.contains("storage of the flow") && !none.contains("packed"),
        "{none}"
    );
    // As if stored as q4_k: the flow model's bytes shrink and packed plans appear.
    let q4 = plan(&["--quant", "q4_k"]);
    assert!(q4.contains("flow 6.4 GiB"), "{q4}");
    assert!(q4.contains("flow+t5 packed"), "{q4}");
    let json = plan(&["--json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["storage"].as_array().unwrap().len(), 6);
    command_fails(
        d,
        &["plan", "--quant", "q9_x"],
        &["q9_x", "stored, auto, none"],
    );
    // generate --quant TYPE on dense files: quantized on load and kept packed.
    succeeds(
        d,
        &[
            "generate", "--quant", "q8_0", "--steps", "1", "--out", "q.png",
        ],
    );
    let plan = chunk(&text(&d.join("q.png")), "plan");
    assert!(plan.contains("flow=resident+packed"), "{plan}");
}

#[test]
fn stacked_loras_with_their_scales_are_recorded_with_their_hashes() {
    let dir = tempdir();
    let d = dir.path();
    let kohya = s(&fixtures().join("lora/kohya.safetensors"));
    let peft = s(&fixtures().join("lora/peft.safetensors"));
    let run = |extra: &[&str], out: &str| -> PathBuf {
        let mut args: Vec<String> = vec!["generate".into(), "--flow".into(), s(&bfl_flow())];
        args.extend(parts());
        let fixed = ["-q", "--steps", "2", "--width", "64", "--height", "64"];
        args.extend(fixed.iter().chain(extra).map(|a| a.to_string()));
        args.extend(["--out".to_string(), out.to_string()]);
        succeeds(d, &strs(&args));
        d.join(out)
    };
    let two = run(
        &["--lora", &format!("{kohya}:0.7"), "--lora", &peft],
        "two.png",
    );
    let chunks = text(&two);
    assert_eq!(
        chunk(&chunks, "lora"),
        "kohya.safetensors, peft.safetensors"
    );
    assert_eq!(chunk(&chunks, "lora_scale"), "0.7, 1");
    let hashes = chunk(&chunks, "lora_hashes");
    assert!(
        hashes.starts_with("kohya.safetensors: ") && hashes.contains(", peft.safetensors: "),
        "{hashes}"
    );
    assert!(
        chunk(&chunks, "parameters").contains(&format!("Lora hashes: \"{hashes}\"")),
        "A1111's parameters line carries the hashes"
    );
    // `--lora-scale` sets the scale of those given without one.
    let scaled = run(
        &[
            "--lora",
            &format!("{kohya}:0.7"),
            "--lora",
            &peft,
            "--lora-scale",
            "0.5",
        ],
        "scaled.png",
    );
    assert_eq!(chunk(&text(&scaled), "lora_scale"), "0.7, 0.5");
    assert_ne!(pixels(&scaled).2, pixels(&two).2);
    // A scale that is not a number is refused by the flag parser, naming it.
    let mut args: Vec<String> = vec!["--flow".into(), s(&bfl_flow())];
    args.extend(parts());
    args.extend([
        "--lora".into(),
        format!("{kohya}:abc"),
        "--out".into(),
        "x.png".into(),
    ]);
    fails(d, &strs(&args), &["`abc` is not a LoRA scale"]);
    assert_eq!(pngs_in(d), 2);
}

#[test]
fn redux_images_prompt_the_model_and_are_recorded() {
    let dir = tempdir();
    let d = dir.path();
    let redux = s(&fixtures().join("redux"));
    let a = s(&fixtures().join("redux_a.png"));
    let b = s(&fixtures().join("redux_b.png"));
    let args = |extra: &[&str], out: &str| -> Vec<String> {
        let mut args: Vec<String> = vec!["generate".into(), "--flow".into(), s(&bfl_flow())];
        args.extend(parts());
        let fixed = ["-q", "--steps", "2", "--width", "64", "--height", "64"];
        let fixed = fixed.iter().chain(&["--seed", "7", "--prompt", ""]);
        args.extend(fixed.chain(extra).map(|a| a.to_string()));
        args.extend(["--out".to_string(), out.to_string()]);
        args
    };
    let plain = args(&[], "plain.png");
    succeeds(d, &strs(&plain));
    let mixed = args(
        &[
            "--redux",
            &redux,
            "--redux-image",
            &a,
            "--redux-image",
            &format!("{b}:0.5"),
        ],
        "mixed.png",
    );
    succeeds(d, &strs(&mixed));
    assert_eq!(
        chunk(&text(&d.join("mixed.png")), "redux_images"),
        "redux_a.png:1, redux_b.png:0.5"
    );
    let bytes = |n: &str| std::fs::read(d.join(n)).unwrap();
    assert_ne!(
        bytes("plain.png"),
        bytes("mixed.png"),
        "the images changed nothing"
    );
    // Bad input: a strength that is not a number, an image that is not there, no encoder.
    let bad = args(
        &["--redux", &redux, "--redux-image", &format!("{a}:lots")],
        "x.png",
    );
    command_fails(d, &strs(&bad), &["lots", "Redux strength"]);
    let missing = args(&["--redux", &redux, "--redux-image", "nope.png"], "x.png");
    command_fails(d, &strs(&missing), &["--redux-image nope.png"]);
    let none = args(&["--redux-image", &a], "x.png");
    command_fails(d, &strs(&none), &["--redux"]);
}

/// `bench-cpu` times a (here very small) flow model at each size and prints the profile with
/// every class of operation.
#[test]
fn bench_cpu_prints_its_tables() {
    let dir = tempdir();
    let out = succeeds(
        dir.path(),
        &[
            "bench-cpu",
            "--hidden",
            "128",
            "--heads",
            "2",
            "--depth",
            "1",
            "--depth-single",
            "1",
            "--sizes",
            "32,64",
            "--txt-tokens",
            "8",
            "--rounds",
            "1",
            "--profile",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| 32² | 12 |"), "{text}");
    assert!(text.contains("| 64² | 24 |"), "{text}");
    for class in [
        "matmul",
        "attention",
        "norms",
        "RoPE",
        "element-wise",
        "copies",
    ] {
        assert!(text.contains(class), "{class} missing: {text}");
    }
}
