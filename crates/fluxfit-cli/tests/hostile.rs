//! The hostile-input suite: one or more cases per class of defect a hostile user found, each of
//! which once aborted, ran away, replaced or truncated a file, or misled. Every case must end in
//! a clear error (exit 1 or 2, no panic, no abort) or in the documented behaviour.
//!
//! Classes: (1) writers that replace a file, (2) writes that are not atomic, (3) sizes that
//! abort, (4) inputs that run away, (5) bad values accepted silently, (6) messages that
//! mislead, (7) paths that leave their folder.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `fluxfit ARGS` must fail cleanly within `limit`, naming each of `names`.
#[track_caller]
fn refused_within(dir: &Path, args: &[&str], names: &[&str], limit: Duration) -> String {
    let start = Instant::now();
    let err = command_fails(dir, args, names);
    assert!(
        start.elapsed() < limit,
        "fluxfit {args:?} took {:?} to refuse",
        start.elapsed()
    );
    err
}

#[track_caller]
fn refused(dir: &Path, args: &[&str], names: &[&str]) -> String {
    refused_within(dir, args, names, Duration::from_secs(60))
}

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// Names in `dir` other than `keep`: what a failed write left behind.
fn leftovers(dir: &Path, keep: &[&str]) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !keep.contains(&n.as_str()))
        .collect()
}

// ---- 1 and 2: never replace, never leave a partial file ----------------------------------

#[test]
fn a_chart_never_replaces_a_file_and_a_failed_one_leaves_nothing() {
    let dir = tempdir();
    let d = dir.path();
    let keep = d.join("keep.svg");
    std::fs::write(&keep, "mine").unwrap();
    refused(
        d,
        &["plan", "--model", "tiny", "--chart", "keep.svg"],
        &["keep.svg", "never replaces"],
    );
    assert_eq!(sha(&keep), b"mine");
    // A folder that is not there: named, and nothing written.
    refused(
        d,
        &["plan", "--model", "tiny", "--chart", "missing/c.svg"],
        &["missing/c.svg"],
    );
    assert_eq!(leftovers(d, &["keep.svg"]), Vec::<String>::new());
}

#[test]
fn outputs_that_are_not_files_are_refused_before_any_work() {
    let dir = tempdir();
    let d = dir.path();
    std::fs::create_dir(d.join("od")).unwrap();
    let mut base = vec![
        "generate", "--width", "64", "--height", "64", "--steps", "1",
    ];
    for (out, name) in [("-", "--out -"), ("od/", "a folder"), ("od", "a folder")] {
        let mut args = base.clone();
        args.extend(["--out", out]);
        refused_within(d, &args, &[name], Duration::from_secs(10));
    }
    base.clear();
    // quantize: GGUF names only, into folders that exist.
    let f = s(&bfl_flow());
    for (out, names) in [
        ("-", &["*.gguf"][..]),
        ("q.png", &["*.gguf"][..]),
        (
            "missing/dir/x.gguf",
            &["folder missing/dir does not exist"][..],
        ),
    ] {
        refused(
            d,
            &["quantize", "--in", &f, "--out", out, "--type", "q8_0"],
            names,
        );
    }
    assert_eq!(leftovers(d, &["od"]), Vec::<String>::new());
}

#[test]
fn a_dangling_link_is_a_taken_name() {
    let dir = tempdir();
    let d = dir.path();
    std::os::unix::fs::symlink(d.join("nowhere.png"), d.join("out.png")).unwrap();
    let out = succeeds(
        d,
        &[
            "generate", "-q", "--width", "64", "--height", "64", "--steps", "1", "--out", "out.png",
        ],
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("out-1.png"));
    assert!(!d.join("nowhere.png").exists(), "wrote through the link");
}

#[test]
fn a_closed_standard_output_is_an_error_not_a_panic() {
    let dir = tempdir();
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_fluxfit"))
        .current_dir(dir.path())
        .args(["plan", "--model", "tiny", "--json"])
        .stdout(full)
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot write to standard output"), "{err}");
}

// ---- 3 and 4: sizes are bounded before anything is allocated -------------------------------

#[test]
fn sizes_a_user_can_type_are_refused_before_allocating() {
    let dir = tempdir();
    let d = dir.path();
    let quick = Duration::from_secs(20);
    refused_within(
        d,
        &["bench-cpu", "--sizes", "100000"],
        &["--sizes", "100000", "4096"],
        quick,
    );
    refused_within(
        d,
        &["bench-cpu", "--hidden", "1000000"],
        &["--hidden 1000000", "8192"],
        quick,
    );
    let g = ["generate", "--steps", "1"];
    let with =
        |extra: &[&'static str]| -> Vec<&'static str> { g.iter().chain(extra).copied().collect() };
    refused_within(
        d,
        &with(&["--width", "64", "--height", "64", "--steps", "99999999999"])[2..],
        &[],
        quick,
    );
    refused_within(
        d,
        &["generate", "--steps", "99999999999"],
        &["--steps 99999999999", "1 to 1000"],
        quick,
    );
    refused_within(
        d,
        &with(&[
            "--width",
            "1000000000",
            "--height",
            "1000000000",
            "--allow-large",
        ]),
        &["1000000000", "16384"],
        quick,
    );
    refused_within(
        d,
        &[
            "regions",
            "--width",
            "100000",
            "--height",
            "100000",
            "--allow-large",
        ],
        &["100000", "65536"],
        quick,
    );
    refused_within(
        d,
        &[
            "regions",
            "--width",
            "16384",
            "--height",
            "16384",
            "--tile",
            "64",
            "--overlap",
            "16",
        ],
        &["regions", "at most 4096"],
        quick,
    );
    refused_within(
        d,
        &with(&["--t5-tokens", "1000000"]),
        &["--t5-tokens 1000000"],
        quick,
    );
    refused_within(
        d,
        &["plan", "--model", "tiny", "--t5-tokens", "1000000000"],
        &["t5 tokens"],
        quick,
    );
    refused_within(
        d,
        &[
            "plan", "--model", "tiny", "--width", "1000000", "--height", "1000000",
        ],
        &["1000000", "--allow-large"],
        quick,
    );
    // The loop's /n is bounded too, and the session goes on.
    let out = succeeds_with(
        d,
        &[
            "generate", "--loop", "--width", "64", "--height", "64", "--steps", "1", "-q",
        ],
        Some("/n 99999999999\n\n/q\n"),
    );
    let err = stderr(&out);
    assert!(err.contains("1 to 1000"), "{err}");
}

// ---- 5: bad values are refused, not turned into a wrong image ------------------------------

/// The tiny dev flow with one NaN in `img_in.weight`.
fn nan_checkpoint(dir: &Path) -> PathBuf {
    let src = bfl_flow();
    let file = fluxfit::checkpoint::safetensors::SafetensorsFile::open(&src).unwrap();
    let info = &file.tensors()["img_in.weight"];
    let mut bytes = std::fs::read(&src).unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let at = 8 + header + info.start;
    // bf16 NaN.
    bytes[at..at + 2].copy_from_slice(&0x7fc0u16.to_le_bytes());
    let path = dir.join("flux1-nan-dev.safetensors");
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn non_finite_weights_stop_the_run_naming_the_step() {
    let dir = tempdir();
    let d = dir.path();
    let nan = s(&nan_checkpoint(d));
    let mut args = vec!["generate", "--flow", &nan];
    let p = parts();
    args.extend(p.iter().map(String::as_str));
    args.extend([
        "--width", "64", "--height", "64", "--steps", "2", "--out", "x.png",
    ]);
    refused(d, &args, &["denoising step 1 of 2", "NaN", "checkpoint"]);
    assert!(!d.join("x.png").exists(), "a black image was written");
}

#[test]
fn bad_values_are_refused() {
    let dir = tempdir();
    let d = dir.path();
    let lora = s(&fixtures().join("lora/peft.safetensors"));
    let f = s(&bfl_flow());
    let p = parts();
    let mut args = vec!["generate", "--flow", f.as_str()];
    args.extend(p.iter().map(String::as_str));
    for (extra, names) in [
        (
            vec!["--lora", lora.as_str(), "--lora-scale", "1e39"],
            &["1e39", "±100"][..],
        ),
        (
            vec!["--lora", lora.as_str(), "--lora-scale", "NaN"],
            &["NaN"][..],
        ),
        (vec!["--guidance", "inf"], &["guidance"][..]),
    ] {
        let mut a = args.clone();
        a.extend(extra);
        a.extend(["--width", "64", "--height", "64", "--steps", "1"]);
        refused(d, &a, names);
    }
}

#[test]
fn a_truncated_jpeg_is_refused_and_exif_orientation_is_applied() {
    let dir = tempdir();
    let d = dir.path();
    // A 96×64 JPEG, then cut in half.
    let img = image_rgb(96, 64);
    let mut jpeg = Vec::new();
    let enc = png_free_jpeg(&img, 96, 64);
    jpeg.extend_from_slice(&enc);
    std::fs::write(d.join("whole.jpg"), &jpeg).unwrap();
    std::fs::write(d.join("cut.jpg"), &jpeg[..jpeg.len() / 2]).unwrap();
    let run = |init: &str| {
        let mut a = vec!["generate", "-q", "--steps", "1", "--strength", "0.5"];
        a.extend(["--init-image", init, "--out", "o.png"]);
        a.iter().map(|x| x.to_string()).collect::<Vec<_>>()
    };
    let cut = run("cut.jpg");
    refused(
        d,
        &cut.iter().map(String::as_str).collect::<Vec<_>>(),
        &["cut.jpg", "truncated"],
    );
    // EXIF orientation 6 (rotate 90° clockwise): the 96×64 file is a 64×96 photo.
    std::fs::write(d.join("rotated.jpg"), with_exif_orientation(&jpeg, 6)).unwrap();
    let rotated = run("rotated.jpg");
    succeeds(d, &rotated.iter().map(String::as_str).collect::<Vec<_>>());
    let (w, h, _) = pixels(&d.join("o.png"));
    assert_eq!((w, h), (64, 96), "EXIF orientation ignored");
}

/// An RGB test pattern.
fn image_rgb(w: usize, h: usize) -> Vec<u8> {
    (0..w * h)
        .flat_map(|i| {
            let (x, y) = (i % w, i / w);
            [
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x ^ y) & 255) as u8,
            ]
        })
        .collect()
}

/// A baseline JPEG of `rgb` (the library's own encoder).
fn png_free_jpeg(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    let img = fluxfit::image::Rgb8 {
        width: w,
        height: h,
        data: rgb.to_vec(),
    };
    fluxfit::image::encode(&img, fluxfit::image::Format::Jpeg, &[]).unwrap()
}

/// `jpeg` with an APP1 EXIF segment holding one Orientation tag, right after SOI.
fn with_exif_orientation(jpeg: &[u8], orientation: u16) -> Vec<u8> {
    let mut tiff = Vec::new();
    tiff.extend_from_slice(b"II*\0");
    tiff.extend_from_slice(&8u32.to_le_bytes()); // IFD0 offset
    tiff.extend_from_slice(&1u16.to_le_bytes()); // one entry
    tiff.extend_from_slice(&0x0112u16.to_le_bytes()); // Orientation
    tiff.extend_from_slice(&3u16.to_le_bytes()); // SHORT
    tiff.extend_from_slice(&1u32.to_le_bytes()); // count
    tiff.extend_from_slice(&orientation.to_le_bytes());
    tiff.extend_from_slice(&[0, 0]);
    tiff.extend_from_slice(&0u32.to_le_bytes()); // no next IFD
    let mut app1 = b"Exif\0\0".to_vec();
    app1.extend_from_slice(&tiff);
    let mut out = jpeg[..2].to_vec();
    out.extend_from_slice(&[0xFF, 0xE1]);
    out.extend_from_slice(&((app1.len() + 2) as u16).to_be_bytes());
    out.extend_from_slice(&app1);
    out.extend_from_slice(&jpeg[2..]);
    out
}

#[test]
fn the_loop_reads_seeds_exactly_and_survives_bad_lines() {
    let dir = tempdir();
    let d = dir.path();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fluxfit"))
        .current_dir(d)
        .args([
            "generate", "--loop", "--width", "64", "--height", "64", "--steps", "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"/s -5\n\xff\xfe not text\n/s 12345678901234567\na fox\n/q\n")
            .unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let (out, err) = (String::from_utf8_lossy(&o.stdout), stderr(&o));
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("whole number") && err.contains("`-5`"),
        "{err}"
    );
    assert!(err.contains("not valid UTF-8"), "{err}");
    assert!(out.contains("seed 12345678901234567"), "{out}");
}

// ---- 6: messages name what is wrong --------------------------------------------------------

#[test]
fn special_files_and_wrong_formats_are_named_as_such() {
    let dir = tempdir();
    let d = dir.path();
    let fifo = d.join("pipe");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let p = parts();
    let with_flow = |flow: &str| {
        let mut a = vec!["generate".to_string(), "--flow".into(), flow.into()];
        a.extend(p.iter().cloned());
        a.extend(["--width", "64", "--height", "64", "--steps", "1"].map(String::from));
        a
    };
    let strs = |v: &[String]| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{1}")
    };
    for special in [s(&fifo), "/dev/zero".to_string()] {
        let a = with_flow(&special);
        let joined = strs(&a);
        refused_within(
            d,
            &joined.split('\u{1}').collect::<Vec<_>>(),
            &["not a regular file"],
            Duration::from_secs(20),
        );
    }
    // A FIFO as an image input does not hang.
    refused_within(
        d,
        &["generate", "--init-image", &s(&fifo), "--steps", "1"],
        &["not a regular file"],
        Duration::from_secs(20),
    );
    // A .gguf with a bad magic is a bad GGUF, not a bad safetensors.
    std::fs::write(d.join("bad.gguf"), b"XXXX\x03\0\0\0rest of a file").unwrap();
    let a = with_flow(&s(&d.join("bad.gguf")));
    let joined = strs(&a);
    let err = refused(d, &joined.split('\u{1}').collect::<Vec<_>>(), &["bad.gguf"]);
    assert!(!err.contains("safetensors"), "{err}");
    // A header whose byte count overflows 64 bits names the tensor and says so.
    let header =
        br#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,16],"data_offsets":[0,16]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0; 16]);
    std::fs::write(d.join("huge.safetensors"), file).unwrap();
    let a = with_flow(&s(&d.join("huge.safetensors")));
    let joined = strs(&a);
    refused(
        d,
        &joined.split('\u{1}').collect::<Vec<_>>(),
        &["`w`", "2^64"],
    );
}

#[test]
fn sizes_are_refused_as_typed_and_images_are_named() {
    let dir = tempdir();
    let d = dir.path();
    refused(
        d,
        &[
            "generate", "--width", "63", "--height", "64", "--steps", "1",
        ],
        &["width 63", "64"],
    );
    // A 1×1 control image names the image.
    let one = fluxfit::image::Rgb8 {
        width: 1,
        height: 1,
        data: vec![0, 0, 0],
    };
    fluxfit::image::save(&one, &d.join("one.png"), &[]).unwrap();
    let canny = s(&fixtures().join("tiny-variants/flux1-tiny-canny-dev.safetensors"));
    let p = parts();
    let mut a = vec![
        "generate",
        "--flow",
        &canny,
        "--control-image",
        "one.png",
        "--steps",
        "1",
    ];
    a.extend(p.iter().map(String::as_str));
    refused(d, &a, &["--control-image one.png", "1x1"]);
}

// ---- 7: paths read from model files stay in the model's folder ------------------------------

#[test]
fn a_shard_index_cannot_leave_its_folder() {
    let dir = tempdir();
    let d = dir.path();
    let t5 = d.join("t5");
    std::fs::create_dir(&t5).unwrap();
    // Its tokenizer beside it, as in a diffusers snapshot.
    let tok = d.join("tokenizer_2");
    std::fs::create_dir(&tok).unwrap();
    for e in std::fs::read_dir(fixtures().join("tiny-diffusers/tokenizer_2")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tok.join(e.file_name())).unwrap();
    }
    for target in ["../../../../etc/passwd", "/etc/passwd"] {
        std::fs::write(
            t5.join("model.safetensors.index.json"),
            format!(r#"{{"weight_map": {{"shared.weight": "{target}"}}}}"#),
        )
        .unwrap();
        let p = [
            "--vae",
            &s(&fixtures().join("tiny-bfl/ae.safetensors")),
            "--clip",
            &s(&fixtures().join("tiny-diffusers/text_encoder")),
        ]
        .map(String::from);
        let f = s(&bfl_flow());
        let t = s(&t5);
        let mut a = vec!["generate", "--flow", &f, "--t5", &t, "--steps", "1"];
        a.extend(p.iter().map(String::as_str));
        let err = refused(d, &a, &[target, "leaves the folder"]);
        assert!(!err.contains("root:"), "{err}");
    }
}
