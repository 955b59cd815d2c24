//! Every endpoint of `fluxfit serve` on the tiny models, over real HTTP on loopback: the
//! OpenAI shapes, native jobs with their SSE stream, cancellation, the full queue, the
//! gallery across a restart, the API key, and bad requests answered 4xx with the field named.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use fluxfit::image::to_rgb8;
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::{tiny, LoadOptions, Request};
use fluxfit::variant::Variant;
use serde_json::{json, Value};

/// The image the library makes for a request, as `fluxfit generate` does.
fn library_image(prompt: &str, seed: u64, steps: usize, guidance: f32) -> Vec<u8> {
    let model = tiny::load(LoadOptions::default()).unwrap();
    let req = Request {
        prompt: prompt.into(),
        width: 256,
        height: 256,
        steps,
        guidance,
        seed,
        t5_tokens: Variant::Schnell.t5_tokens(),
        noise: NoiseKind::TorchBf16,
    };
    let out = model.text_to_image(&req, &mut |_| {}).unwrap();
    to_rgb8(&out.image).unwrap().data
}

#[test]
fn openai_generation_is_the_library_image_with_metadata() {
    let s = start(Variant::Schnell, |_| {});
    let (code, body) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "a red fox in the snow", "n": 1, "size": "256x256",
                "response_format": "b64_json", "seed": 7, "steps": 3, "guidance": 3.5,
                "model": "anything" }),
    );
    assert_eq!(code, 200, "{body}");
    assert!(body["created"].as_u64().unwrap() > 0);
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["revised_prompt"], "a red fox in the snow");
    let png = unb64(data[0]["b64_json"].as_str().unwrap());
    let (w, h, rgb) = decode_png(&png);
    assert_eq!((w, h), (256, 256));
    assert_eq!(rgb, library_image("a red fox in the snow", 7, 3, 3.5));
    // The gallery lists it with the parameters its PNG records.
    let (code, list) = get(&s.url("/v1/images"));
    assert_eq!(code, 200);
    let images = list["images"].as_array().unwrap();
    assert_eq!(images.len(), 1);
    let p = &images[0]["params"];
    assert_eq!(p["prompt"], "a red fox in the snow");
    assert_eq!(p["seed"], "7");
    assert_eq!(p["steps"], "3");
    assert_eq!(p["guidance"], "3.5");
    assert!(p["plan"].as_str().unwrap().contains("flow=resident"));
    assert!(p["parameters"].as_str().unwrap().contains("Seed: 7"));
    // The file itself, and its parameters alone.
    let name = images[0]["name"].as_str().unwrap();
    let mut r = agent()
        .get(&s.url(&format!("/v1/images/{name}")))
        .call()
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/png");
    assert_eq!(r.body_mut().read_to_vec().unwrap(), png);
    let (code, one) = get(&s.url(&format!("/v1/images/{name}?params")));
    assert_eq!(code, 200);
    assert_eq!(one["params"]["seed"], "7");
}

#[test]
fn openai_n_and_url_format() {
    let s = start(Variant::Schnell, |_| {});
    let (code, body) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "two", "n": 2, "size": "64x64", "response_format": "url",
                "seed": 100, "steps": 1 }),
    );
    assert_eq!(code, 200, "{body}");
    let data = body["data"].as_array().unwrap();
    assert_eq!(data.len(), 2);
    // A Host header that is not a host is not echoed into the URLs.
    let r = agent()
        .post(&s.url("/v1/images/generations"))
        .header("Host", "evil.example\"><script>")
        .send_json(json!({ "prompt": "h", "size": "64x64", "steps": 1, "response_format": "url" }));
    let (code, h) = json_of(r);
    assert_eq!(code, 200, "{h}");
    assert!(
        h["data"][0]["url"]
            .as_str()
            .unwrap()
            .starts_with("http://127.0.0.1/v1/images/"),
        "{h}"
    );
    let mut seeds = Vec::new();
    for d in data {
        let url = d["url"].as_str().unwrap();
        assert!(url.starts_with("http://127.0.0.1:"), "{url}");
        let mut r = agent().get(url).call().unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let png = r.body_mut().read_to_vec().unwrap();
        assert_eq!(decode_png(&png).0, 64);
        let name = url.rsplit('/').next().unwrap();
        let (_, p) = get(&s.url(&format!("/v1/images/{name}?params")));
        seeds.push(p["params"]["seed"].as_str().unwrap().to_string());
    }
    seeds.sort();
    assert_eq!(seeds, ["100", "101"]);
    assert_eq!(s.written().len(), 3);
}

#[test]
fn sse_streams_every_step_then_the_result() {
    let s = start(Variant::Schnell, |c| c.preview_every = 2);
    let (code, job) = post(
        &s.url("/v1/jobs"),
        json!({ "prompt": "steps", "width": 128, "height": 128, "steps": 5, "seed": 1 }),
    );
    assert_eq!(code, 202, "{job}");
    let id = job["id"].as_str().unwrap();
    let events = events(&s.url(&format!("/v1/jobs/{id}/events")));
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    let steps: Vec<u64> = events
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| d["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4, 5], "{names:?}");
    for (n, d) in &events {
        if n == "step" {
            assert_eq!(d["total"], 5);
            assert!(d["rate"].as_f64().unwrap() > 0.0);
            assert!(d["eta_s"].as_f64().unwrap() >= 0.0);
        }
    }
    assert_eq!(names.first(), Some(&"queued"));
    assert!(names.contains(&"phase"));
    assert_eq!(names.last(), Some(&"done"), "{names:?}");
    let done = &events.last().unwrap().1;
    assert_eq!(done["image"]["width"], 128);
    // A Last-Event-ID past every event: nothing more to send, no overflow.
    let r = agent()
        .get(&s.url(&format!("/v1/jobs/{id}/events")))
        .header("Last-Event-ID", "18446744073709551615")
        .call()
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // A late subscriber gets the log: the newest preview (the last step's) and the result.
    let again = common::events(&s.url(&format!("/v1/jobs/{id}/events")));
    let previews: Vec<&Value> = again
        .iter()
        .filter(|(n, _)| n == "preview")
        .map(|(_, d)| d)
        .collect();
    assert_eq!(previews.len(), 1);
    assert_eq!(previews[0]["step"], 5);
    assert_eq!(
        previews[0]["width"], 16,
        "a preview is at latent resolution"
    );
    assert!(previews[0]["png"]
        .as_str()
        .unwrap()
        .starts_with("data:image/png;base64,"));
    let (code, view) = get(&s.url(&format!("/v1/jobs/{id}")));
    assert_eq!(code, 200);
    assert_eq!(view["status"], "done");
    assert_eq!(view["step"], 5);
    assert!(view["peak_bytes"].as_u64().unwrap() > 0);
    let (code, list) = get(&s.url("/v1/jobs"));
    assert_eq!(code, 200);
    assert_eq!(list["jobs"][0]["id"], id);
    assert_eq!(view["image"]["name"], done["image"]["name"]);
}

/// A job long enough to cancel while it runs.
fn long_job(s: &Running) -> String {
    let (code, job) = post(
        &s.url("/v1/jobs"),
        json!({ "prompt": "long", "width": 128, "height": 128, "steps": 1000, "seed": 3 }),
    );
    assert_eq!(code, 202, "{job}");
    job["id"].as_str().unwrap().to_string()
}

#[test]
fn delete_stops_a_running_job_within_one_step() {
    let s = start(Variant::Schnell, |c| c.preview_every = 0);
    let id = long_job(&s);
    let url = s.url(&format!("/v1/jobs/{id}/events"));
    // Wait for the third step, then cancel from another thread while reading on.
    let mut cancelled_at = None;
    let events = events_until(&url, |name, d| {
        if name == "step" && d["step"] == 3 && cancelled_at.is_none() {
            let (code, _) = delete(&s.url(&format!("/v1/jobs/{id}")));
            assert!(code == 202 || code == 200, "{code}");
            cancelled_at = Some(3);
        }
        name == "cancelled" || name == "done" || name == "failed"
    });
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "cancelled", "{data}");
    let step = data["step"].as_u64().unwrap();
    // The step in progress when DELETE arrived finishes; no further one starts.
    assert!((3..=5).contains(&step), "stopped after step {step}");
    let steps = events.iter().filter(|(n, _)| n == "step").count() as u64;
    assert_eq!(steps, step);
    assert!(s.written().is_empty());
    let (_, view) = get(&s.url(&format!("/v1/jobs/{id}")));
    assert_eq!(view["status"], "cancelled");
    // Cancelling again: it has finished.
    assert_eq!(delete(&s.url(&format!("/v1/jobs/{id}"))).0, 409);
    // The runner goes on with the next job.
    let (code, body) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "after", "size": "64x64", "steps": 1 }),
    );
    assert_eq!(code, 200, "{body}");
}

#[test]
fn a_full_queue_answers_429_and_queued_jobs_cancel_at_once() {
    let s = start(Variant::Schnell, |c| {
        c.queue = 2;
        c.preview_every = 0
    });
    let running = long_job(&s);
    // Wait until it runs, so the queue is empty.
    let t = Instant::now();
    while get(&s.url(&format!("/v1/jobs/{running}"))).1["status"] != "running" {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    let a = long_job(&s);
    let b = long_job(&s);
    let (_, view) = get(&s.url(&format!("/v1/jobs/{b}")));
    assert_eq!(view["position"], 2);
    let r = agent()
        .post(&s.url("/v1/jobs"))
        .send_json(json!({ "prompt": "one too many", "steps": 1 }))
        .unwrap();
    assert_eq!(r.status().as_u16(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let (_, body) = json_of(Ok(r));
    assert_eq!(body["error"]["type"], "rate_limit_error");
    // Cancelling a queued job: at once, and the one behind it moves up.
    let (code, view) = delete(&s.url(&format!("/v1/jobs/{a}")));
    assert_eq!(code, 200);
    assert_eq!(view["status"], "cancelled");
    let (_, view) = get(&s.url(&format!("/v1/jobs/{b}")));
    assert_eq!(view["position"], 1);
    let metrics = text(&s.url("/metrics"));
    assert!(metrics.contains("fluxfit_queue_depth 1"), "{metrics}");
    assert!(metrics.contains("fluxfit_rejected_total 1"), "{metrics}");
    assert!(
        metrics.contains("fluxfit_jobs_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
    for id in [&b, &running] {
        delete(&s.url(&format!("/v1/jobs/{id}")));
    }
}

#[test]
fn bad_requests_are_4xx_json_naming_the_field() {
    let s = start(Variant::Schnell, |c| c.max_upload = 1 << 20);
    let cases: Vec<(Value, &str)> = vec![
        (json!({ "prompt": "x", "widht": 256 }), "widht"),
        (json!({ "prompt": "x", "width": 10 }), "width"),
        (json!({ "prompt": "x", "width": 100000 }), "width"),
        (json!({ "prompt": "x", "steps": 0 }), "steps"),
        (json!({ "prompt": "x", "steps": "many" }), "steps"),
        (json!({ "prompt": "x", "guidance": -1 }), "guidance"),
        (json!({ "prompt": "x", "mode": "fill" }), "mode"),
        (json!({ "prompt": "x", "mode": "paint" }), "mode"),
        (json!({ "prompt": "x", "mode": "img2img" }), "image"),
        (
            json!({ "prompt": "x", "mode": "img2img", "image": "%%%" }),
            "image",
        ),
        (
            json!({ "prompt": "x", "mode": "img2img", "image": b64(b"not an image") }),
            "image",
        ),
        (
            json!({ "prompt": "x", "mode": "img2img", "image": b64(&png_rgba(64, 64, |_, _| [0; 4])), "strength": 2 }),
            "strength",
        ),
        (json!({ "prompt": "x", "strength": 0.5 }), "strength"),
        (json!({ "prompt": "x", "seed": -5 }), "seed"),
        (json!({ "prompt": "x", "image": b64(b"x") }), "image"),
        (
            json!({ "prompt": "x", "aspect_ratio": "16:9" }),
            "aspect_ratio",
        ),
        (json!({ "prompt": "x", "tile": 256 }), "tile"),
    ];
    for (body, field) in cases {
        let (code, e) = post(&s.url("/v1/jobs"), body.clone());
        assert_eq!(code, 400, "{body} → {e}");
        assert_eq!(e["error"]["param"], field, "{body} → {e}");
        assert!(
            e["error"]["message"].as_str().unwrap().contains(field),
            "{e}"
        );
    }
    // A decompression bomb: a tiny PNG that claims 100000 × 100000 pixels.
    let mut bomb = png_rgba(1, 1, |_, _| [0; 4]);
    claim_size(&mut bomb, 100_000, 100_000);
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "img2img", "prompt": "x", "image": b64(&bomb) }),
    );
    assert_eq!(code, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than accepted here"),
        "{e}"
    );
    assert_eq!(e["error"]["param"], "image");
    // Not JSON; too large; unknown route; wrong method; a name outside the folder.
    let (code, e) = json_of(
        agent()
            .post(&s.url("/v1/jobs"))
            .send(r#"{"prompt": "x"} trailing"#),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("body")),
        "{e}"
    );
    let r = agent().post(&s.url("/v1/jobs")).send("{not json");
    let (code, e) = json_of(r);
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("body")),
        "{e}"
    );
    // A body over the limit is refused from its Content-Length, before it is read: the
    // request is sent without its body (writing 2 MiB to a server that has already answered
    // could fail with a broken pipe, on the client's side).
    let (code, e) = raw_request(&s, "POST /v1/jobs", 2 << 20);
    assert_eq!(code, 413, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("larger"),
        "{e}"
    );
    assert_eq!(get(&s.url("/v1/nothing")).0, 404);
    let (code, e) = json_of(agent().put(&s.url("/v1/jobs")).send("x"));
    assert_eq!(code, 405, "{e}");
    for name in ["..%2Fsecret.png", "%2Eenv.png", "x.svg"] {
        let (code, e) = get(&s.url(&format!("/v1/images/{name}")));
        assert_eq!(code, 400, "{name}: {e}");
    }
    assert_eq!(get(&s.url("/v1/images/20200101-000000-0001.png")).0, 404);
    assert_eq!(get(&s.url("/v1/jobs/nope")).0, 404);
    let (code, e) = get(&s.url("/v1/plan?width=abc"));
    assert_eq!(code, 400, "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("width"),
        "{e}"
    );
    let (code, e) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "x", "n": 99 }),
    );
    assert_eq!((code, e["error"]["param"].as_str()), (400, Some("n")));
    let (code, e) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "x", "size": "big" }),
    );
    assert_eq!((code, e["error"]["param"].as_str()), (400, Some("size")));
    let (code, e) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "x", "response_format": "gif" }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("response_format"))
    );
    // Too many regions; more images than the queue holds.
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "regions", "prompt": "x", "width": 16384, "height": 16384, "tile": 64, "overlap": 32 }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("tile")),
        "{e}"
    );
    let (code, e) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "x", "n": 9 }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("n")),
        "{e}"
    );
    // Edits on a text-to-image model: Kontext is needed.
    let (ct, body) = multipart(
        &[("prompt", "x")],
        &[("image", &png_rgba(64, 64, |_, _| [9, 9, 9, 255]))],
    );
    let (code, e) = json_of(
        agent()
            .post(&s.url("/v1/images/edits"))
            .header("Content-Type", &ct)
            .send(&body[..]),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("mode")),
        "{e}"
    );
    assert!(s.written().is_empty());
}

#[test]
fn openai_edit_with_a_mask_is_fill() {
    let s = start(Variant::DevFill, |_| {});
    let image = png_rgba(256, 256, |x, y| {
        [(x % 256) as u8, (y % 256) as u8, 128, 255]
    });
    // OpenAI's mask: transparent where to paint.
    let mask = png_rgba(256, 256, |x, _| [0, 0, 0, if x < 128 { 0 } else { 255 }]);
    let (ct, body) = multipart(
        &[
            ("prompt", "a cat"),
            ("steps", "2"),
            ("seed", "5"),
            ("response_format", "b64_json"),
            ("keep_size", "true"),
        ],
        &[("image", &image), ("mask", &mask)],
    );
    let (code, out) = json_of(
        agent()
            .post(&s.url("/v1/images/edits"))
            .header("Content-Type", &ct)
            .send(&body[..]),
    );
    assert_eq!(code, 200, "{out}");
    let png = unb64(out["data"][0]["b64_json"].as_str().unwrap());
    assert_eq!(decode_png(&png).0, 256, "keep_size keeps the image's size");
    let (_, list) = get(&s.url("/v1/images"));
    let p = &list["images"][0]["params"];
    assert_eq!(p["fill_mask"], "mask");
    assert_eq!(p["variant"], "flux-dev-fill");
    // A Fill model always encodes an image: its plan is predicted with one.
    let (code, plan) = get(&s.url("/v1/plan?width=256&height=256"));
    assert_eq!(code, 200, "{plan}");
    assert!(plan["plan"]["peak"].as_u64().unwrap() > 0);
    // Nothing to paint, and a size fill takes from the image: refused, naming the field.
    let opaque = png_rgba(64, 64, |_, _| [1, 2, 3, 255]);
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "fill", "prompt": "x", "image": b64(&opaque) }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("image")),
        "{e}"
    );
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "fill", "prompt": "x", "image": b64(&image), "width": 512 }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("width")),
        "{e}"
    );
    // Native outpainting on the same model.
    let (code, job) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "outpaint", "prompt": "more", "steps": 1, "seed": 2,
                "image": b64(&png_rgba(128, 128, |_, _| [50, 60, 70, 255])), "keep_size": true,
                "outpaint": { "right": 0.5 } }),
    );
    assert_eq!(code, 202, "{job}");
    let ev = events(&s.url(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap())));
    let done = &ev.last().unwrap().1;
    assert_eq!(ev.last().unwrap().0, "done", "{done}");
    assert!(done["image"]["width"].as_u64().unwrap() > done["image"]["height"].as_u64().unwrap());
}

#[test]
fn info_plan_models_health_and_metrics() {
    let s = start(Variant::Schnell, |_| {});
    let (code, h) = get(&s.url("/healthz"));
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")));
    let (_, info) = get(&s.url("/v1/info"));
    assert_eq!(info["variant"], "flux-schnell");
    assert_eq!(info["defaults"]["width"], 256);
    assert_eq!(info["modes"], json!(["generate", "img2img", "regions"]));
    let (_, models) = get(&s.url("/v1/models"));
    assert_eq!(models["data"][0]["object"], "model");
    let (code, plan) = get(&s.url("/v1/plan?width=512&height=256&vram=1GiB"));
    assert_eq!(code, 200, "{plan}");
    assert_eq!(plan["width"], 512);
    assert!(plan["rows"].as_array().unwrap().len() > 3);
    assert!(plan["plan"]["peak"].as_u64().unwrap() > 0);
    assert!(plan["text"].as_str().unwrap().contains("resident"));
    assert!(plan["svg"].as_str().unwrap().starts_with("<svg"));
    // A bigger image is predicted to need more.
    let (_, big) = get(&s.url("/v1/plan?width=1024&height=1024"));
    assert!(big["plan"]["peak"].as_u64() > plan["rows"][0]["peak"].as_u64());
    let r = agent()
        .get(&s.url("/v1/plan?width=256&height=256&format=svg"))
        .call()
        .unwrap();
    assert_eq!(r.headers()["content-type"], "image/svg+xml");
    let (code, e) = get(&s.url("/v1/plan?vram=lots"));
    assert_eq!((code, e["error"]["param"].as_str()), (400, Some("vram")));
    post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "m", "size": "64x64", "steps": 2 }),
    );
    let mut r = agent().get(&s.url("/metrics")).call().unwrap();
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let m = r.body_mut().read_to_string().unwrap();
    for want in [
        "fluxfit_queue_depth 0",
        "fluxfit_jobs_total{outcome=\"done\"} 1",
        "fluxfit_steps_total 2",
        "# TYPE fluxfit_step_rate gauge",
        "fluxfit_device_memory_peak_bytes ",
    ] {
        assert!(m.contains(want), "{want} in\n{m}");
    }
    let page = text(&s.url("/"));
    assert!(
        page.contains("<html") || page.contains("<!doctype html"),
        "{page}"
    );
}

#[test]
fn api_key_and_exposed_addresses() {
    let s = start(Variant::Schnell, |c| c.api_key = Some("s3cret".into()));
    let (code, e) = get(&s.url("/v1/info"));
    assert_eq!(
        (code, e["error"]["type"].as_str()),
        (401, Some("authentication_error"))
    );
    // The scheme is case-insensitive.
    let r = agent()
        .get(&s.url("/v1/info"))
        .header("Authorization", "bearer s3cret")
        .call();
    assert_eq!(json_of(r).0, 200);
    let r = agent()
        .get(&s.url("/v1/info"))
        .header("Authorization", "Bearer wrong")
        .call();
    assert_eq!(json_of(r).0, 401);
    let r = agent()
        .get(&s.url("/v1/info"))
        .header("Authorization", "Bearer s3cret")
        .call();
    assert_eq!(json_of(r).0, 200);
    assert_eq!(get(&s.url("/healthz")).0, 200);
    assert_eq!(
        agent()
            .get(&s.url("/metrics"))
            .call()
            .unwrap()
            .status()
            .as_u16(),
        401
    );
    // Beyond loopback without a key: refused before binding.
    let model = tiny::load(LoadOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let err = fluxfit_serve::Server::start(
        model,
        fluxfit_serve::Config {
            listen: "0.0.0.0:0".parse().unwrap(),
            output_dir: dir.path().into(),
            ..Default::default()
        },
    )
    .err()
    .expect("refused");
    assert!(err.to_string().contains("--api-key"), "{err}");
}

#[test]
fn a_restarted_server_lists_what_is_there_and_never_overwrites() {
    let s = start(Variant::Schnell, |_| {});
    let (code, _) = post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "before", "size": "64x64", "steps": 1, "seed": 9 }),
    );
    assert_eq!(code, 200);
    let first = s.written();
    assert_eq!(first.len(), 1);
    let before = std::fs::read(s.dir.path().join(&first[0])).unwrap();
    // Stop, keep the folder, start again on it.
    let mut s = s;
    let dir = std::mem::replace(&mut s.dir, tempfile::tempdir().unwrap());
    s.stop();
    let s = start_in(Variant::Schnell, dir, |_| {});
    let (_, list) = get(&s.url("/v1/images"));
    assert_eq!(list["images"][0]["name"], first[0].as_str());
    assert_eq!(list["images"][0]["params"]["prompt"], "before");
    post(
        &s.url("/v1/images/generations"),
        json!({ "prompt": "after", "size": "64x64", "steps": 1, "seed": 9 }),
    );
    let now = s.written();
    assert_eq!(now.len(), 2);
    assert_eq!(std::fs::read(s.dir.path().join(&first[0])).unwrap(), before);
    // No temporary file is left behind.
    let stray: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.ends_with(".png"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

#[test]
fn a_client_that_disconnects_cancels_its_job() {
    let s = start(Variant::Schnell, |c| c.preview_every = 0);
    let addr = s.base.trim_start_matches("http://").to_string();
    let body = json!({ "prompt": "gone", "size": "128x128", "steps": 1000 }).to_string();
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        c,
        "POST /v1/images/generations HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // Wait until it runs, then hang up.
    let metrics = || text(&s.url("/metrics"));
    let t = Instant::now();
    while !metrics().contains("fluxfit_job_running 1") {
        assert!(t.elapsed() < Duration::from_secs(30));
        std::thread::sleep(Duration::from_millis(20));
    }
    c.shutdown(std::net::Shutdown::Both).unwrap();
    drop(c);
    let t = Instant::now();
    loop {
        let m = metrics();
        if m.contains("fluxfit_jobs_total{outcome=\"cancelled\"} 1")
            && m.contains("fluxfit_job_running 0")
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{m}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn img2img_and_regions_jobs() {
    let s = start(Variant::Schnell, |c| c.preview_every = 0);
    let run = |body: Value| {
        let (code, job) = post(&s.url("/v1/jobs"), body);
        assert_eq!(code, 202, "{job}");
        events(&s.url(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap())))
    };
    let photo = png_rgba(128, 96, |x, y| [x as u8, y as u8, 80, 255]);
    let ev = run(
        json!({ "mode": "img2img", "prompt": "paint it", "steps": 4, "strength": 0.5,
                         "image": format!("data:image/png;base64,{}", b64(&photo)) }),
    );
    let (last, done) = ev.last().unwrap();
    assert_eq!(last, "done", "{done}");
    assert_eq!(
        (
            done["image"]["width"].as_u64(),
            done["image"]["height"].as_u64()
        ),
        (Some(128), Some(96))
    );
    // strength 0.5 of 4 steps: the last 2 run.
    assert_eq!(ev.iter().filter(|(n, _)| n == "step").count(), 2);
    // A canvas of 384 × 256 in regions of 256 with an overlap of 128: 2 regions, 2 steps each.
    let ev = run(
        json!({ "mode": "regions", "prompt": "a wide hall", "width": 384, "height": 256,
                         "tile": 256, "overlap": 128, "steps": 2 }),
    );
    let (last, done) = ev.last().unwrap();
    assert_eq!(last, "done", "{done}");
    assert_eq!(done["image"]["width"], 384);
    let steps: Vec<(u64, u64)> = ev
        .iter()
        .filter(|(n, _)| n == "step")
        .map(|(_, d)| (d["step"].as_u64().unwrap(), d["total"].as_u64().unwrap()))
        .collect();
    assert_eq!(steps, [(1, 4), (2, 4), (3, 4), (4, 4)]);
    let (_, list) = get(&s.url("/v1/images"));
    assert!(list["images"][0]["params"]["regions"]
        .as_str()
        .unwrap()
        .starts_with("2 regions of 256x256"));
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "mode": "regions", "prompt": "x" }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("width")),
        "{e}"
    );
}

#[test]
fn under_a_budget_each_job_gets_its_own_plan() {
    let budget = fluxfit::planner::Budget { bytes: 60 << 20 };
    let s = start(Variant::Schnell, |c| {
        c.budget = Some(budget);
        c.preview_every = 0;
    });
    let plan_of = |side: usize| {
        let (code, job) = post(
            &s.url("/v1/jobs"),
            json!({ "prompt": "p", "width": side, "height": side, "steps": 1 }),
        );
        assert_eq!(code, 202, "{job}");
        let ev = events(&s.url(&format!("/v1/jobs/{}/events", job["id"].as_str().unwrap())));
        assert_eq!(ev.last().unwrap().0, "done");
        let started = ev.iter().find(|(n, _)| n == "started").unwrap();
        started.1["plan"].as_str().unwrap().to_string()
    };
    // What the planner says for each size under 60 MiB, and what the jobs ran with.
    let predicted = |side: usize| {
        let (_, p) = get(&s.url(&format!("/v1/plan?width={side}&height={side}")));
        p["plan"]["spec"].as_str().unwrap().to_string()
    };
    let (small, large) = (plan_of(128), plan_of(512));
    assert_eq!(small, predicted(128));
    assert_eq!(large, predicted(512));
    assert_ne!(
        small, large,
        "a larger image needs another plan under this budget"
    );
    // A size no plan fits within the budget is refused at submission.
    let (code, e) = post(
        &s.url("/v1/jobs"),
        json!({ "prompt": "p", "width": 2048, "height": 2048 }),
    );
    assert_eq!(
        (code, e["error"]["param"].as_str()),
        (400, Some("width")),
        "{e}"
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("budget"),
        "{e}"
    );
}

/// Sends `request_line` with a `Content-Length` of `length` and no body; the status and JSON
/// body of the answer.
fn raw_request(s: &Running, request_line: &str, length: usize) -> (u16, Value) {
    use std::io::Read;
    let addr = s.base.trim_start_matches("http://");
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        c,
        "{request_line} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {length}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = c.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    (code, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Reads until the server closes the connection (or `limit` passes): what it sent.
fn read_until_closed(stream: &mut std::net::TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    use std::io::Read;
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

#[test]
fn slow_clients_are_dropped_at_their_deadlines() {
    let s = start(Variant::Schnell, |c| {
        c.header_timeout = Duration::from_secs(1);
        c.body_timeout = Duration::from_secs(1);
    });
    let addr = s.base.trim_start_matches("http://").to_string();
    // Headers that never end (slowloris): the connection is closed after the header deadline.
    let mut slow = std::net::TcpStream::connect(&addr).unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let start = Instant::now();
    let (_, closed) = read_until_closed(&mut slow, Duration::from_secs(10));
    assert!(
        closed,
        "a half-sent request head held the connection for 10 s"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    // A body that stops short of its length: refused after the body deadline, not waited on.
    let mut short = std::net::TcpStream::connect(&addr).unwrap();
    short
        .write_all(
            b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\":",
        )
        .unwrap();
    let start = Instant::now();
    let (answer, _) = read_until_closed(&mut short, Duration::from_secs(10));
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(answer.starts_with("HTTP/1.1 4"), "{answer}");
    // The server still answers.
    assert_eq!(get(&format!("{}/healthz", s.base)).0, 200);
}
