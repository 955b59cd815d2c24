//! `fluxfit serve` as users run it: it starts in seconds, an OpenAI-style request gives the
//! PNG `fluxfit generate` writes for the same settings, and SIGTERM finishes (or, past the
//! grace period, cancels) the running job and exits cleanly without a partial file.

mod common;

use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use fluxfit::image::png_text;
use serde_json::json;

#[test]
fn openai_generation_equals_fluxfit_generate() {
    let dir = tempdir();
    let t = Instant::now();
    let (_s, base) = serve(dir.path(), &["--model", "tiny", "--output-dir", "out"]);
    let seconds = t.elapsed().as_secs_f64();
    eprintln!("fluxfit serve --model tiny listened after {seconds:.2} s");
    assert!(seconds < 30.0, "{seconds} s to start");
    let prompt = "a red fox in the snow";
    let (code, body) = post(
        &format!("{base}/v1/images/generations"),
        &json!({ "prompt": prompt, "size": "256x256", "steps": 4, "guidance": 3.5,
                "seed": 42, "response_format": "b64_json" }),
    );
    assert_eq!(code, 200, "{body}");
    let png = base64::engine::general_purpose::STANDARD
        .decode(body["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    let served = dir.path().join("served.png");
    std::fs::write(&served, &png).unwrap();
    succeeds_with(
        dir.path(),
        &[
            "generate",
            "--model",
            "tiny",
            "--prompt",
            prompt,
            "--width",
            "256",
            "--height",
            "256",
            "--steps",
            "4",
            "--guidance",
            "3.5",
            "--seed",
            "42",
            "--out",
            "cli.png",
        ],
        None,
    );
    let cli = dir.path().join("cli.png");
    assert_eq!(pixels(&served), pixels(&cli), "the same image");
    // The same metadata, plus the job's id.
    let served_text = png_text(&served).unwrap();
    for (k, v) in png_text(&cli).unwrap() {
        let got = served_text.iter().find(|(sk, _)| *sk == k).map(|(_, v)| v);
        assert_eq!(got, Some(&v), "metadata `{k}`");
    }
    assert!(served_text.iter().any(|(k, _)| k == "job"));
}

/// Waits until the server runs a job.
fn until_running(base: &str, id: &str) {
    let t = Instant::now();
    while get(&format!("{base}/v1/jobs/{id}"))["status"] != "running" {
        assert!(t.elapsed() < Duration::from_secs(30), "the job never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_finishes_the_running_job_and_cancels_the_queue() {
    let dir = tempdir();
    let (mut s, base) = serve(dir.path(), &["--model", "tiny", "--output-dir", "out"]);
    let job = |steps: usize| {
        let (code, v) = post(
            &format!("{base}/v1/jobs"),
            &json!({ "prompt": "x", "width": 64, "height": 64, "steps": steps }),
        );
        assert_eq!(code, 202, "{v}");
        v["id"].as_str().unwrap().to_string()
    };
    let running = job(60);
    let _queued = job(1);
    until_running(&base, &running);
    s.signal("-TERM");
    let status = s.wait_exit(Duration::from_secs(60));
    assert!(status.success(), "{status}");
    let files: Vec<_> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        files,
        [format!("{running}.png")],
        "the running job's image only"
    );
    let (w, _, _) = pixels(&dir.path().join("out").join(&files[0]));
    assert_eq!(w, 64);
}

#[test]
fn sigterm_past_the_grace_period_cancels_and_leaves_no_file() {
    let dir = tempdir();
    let (mut s, base) = serve(
        dir.path(),
        &["--model", "tiny", "--output-dir", "out", "--grace", "1"],
    );
    let (code, v) = post(
        &format!("{base}/v1/jobs"),
        &json!({ "prompt": "x", "width": 128, "height": 128, "steps": 1000 }),
    );
    assert_eq!(code, 202, "{v}");
    until_running(&base, v["id"].as_str().unwrap());
    s.signal("-TERM");
    let status = s.wait_exit(Duration::from_secs(30));
    assert!(status.success(), "{status}");
    let left: Vec<_> = std::fs::read_dir(dir.path().join("out")).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn serve_refuses_an_exposed_address_without_a_key() {
    let dir = tempdir();
    let e = command_fails(
        dir.path(),
        &["serve", "--model", "tiny", "--listen", "0.0.0.0:0"],
        &["--api-key", "--insecure"],
    );
    assert!(e.contains("0.0.0.0"), "{e}");
}
