//! Servers on the tiny models and a small blocking client, for the API and load tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::time::Duration;

use fluxfit::pipeline::{tiny, LoadOptions};
use fluxfit::variant::Variant;
use fluxfit_serve::{Config, Server};
use serde_json::Value;

#[path = "../http_client/mod.rs"]
mod http_client;
#[allow(unused_imports)]
pub use http_client::{agent, text};

/// A server on the tiny model of `variant`, writing into a fresh temporary folder.
pub struct Running {
    pub server: Option<Server>,
    pub base: String,
    pub dir: tempfile::TempDir,
}

impl Running {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn stop(mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }

    /// PNG files in the output folder.
    pub fn written(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".png"))
            .collect();
        v.sort();
        v
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.shutdown();
        }
    }
}

pub fn start(variant: Variant, tweak: impl FnOnce(&mut Config)) -> Running {
    let dir = tempfile::tempdir().unwrap();
    start_in(variant, dir, tweak)
}

pub fn start_in(
    variant: Variant,
    dir: tempfile::TempDir,
    tweak: impl FnOnce(&mut Config),
) -> Running {
    let model = tiny::load(LoadOptions {
        variant: Some(variant),
        ..LoadOptions::default()
    })
    .unwrap();
    let mut config = Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        output_dir: dir.path().to_path_buf(),
        grace: Duration::from_secs(5),
        ..Config::default()
    };
    tweak(&mut config);
    let server = Server::start(model, config).unwrap();
    Running {
        base: format!("http://{}", server.addr()),
        server: Some(server),
        dir,
    }
}

/// Status and JSON body (Null when the body is not JSON).
pub fn json_of(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
    let mut r = r.expect("the server answers");
    let status = r.status().as_u16();
    let text = r.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

pub fn get(url: &str) -> (u16, Value) {
    json_of(agent().get(url).call())
}

pub fn post(url: &str, body: Value) -> (u16, Value) {
    json_of(agent().post(url).send_json(body))
}

pub fn delete(url: &str) -> (u16, Value) {
    json_of(agent().delete(url).call())
}

/// Reads a job's SSE stream to its end: (event name, data) in order.
pub fn events(url: &str) -> Vec<(String, Value)> {
    events_until(url, |_, _| false)
}

/// Reads an SSE stream until it ends or `stop(name, data)` says so (that event included).
pub fn events_until(url: &str, mut stop: impl FnMut(&str, &Value) -> bool) -> Vec<(String, Value)> {
    let r = agent().get(url).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let reader = BufReader::new(r.into_body().into_reader());
    let mut out = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    for line in reader.lines() {
        let line = line.unwrap();
        if let Some(v) = line.strip_prefix("event: ") {
            name = v.to_string();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data.push_str(v);
        } else if line.is_empty() && !name.is_empty() {
            let value: Value = serde_json::from_str(&data).unwrap();
            let done = stop(&name, &value);
            out.push((std::mem::take(&mut name), value));
            data.clear();
            if done {
                break;
            }
        }
    }
    out
}

/// A PNG's RGB pixels and size.
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Vec<u8>) {
    let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let mut buf = vec![0; r.output_buffer_size().unwrap()];
    let info = r.next_frame(&mut buf).unwrap();
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// A PNG of `w` × `h` RGBA pixels from `f(x, y)`.
pub fn png_rgba(w: u32, h: u32, f: impl Fn(u32, u32) -> [u8; 4]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = png::Encoder::new(&mut out, w, h);
    e.set_color(png::ColorType::Rgba);
    e.set_depth(png::BitDepth::Eight);
    let mut w_ = e.write_header().unwrap();
    let f = &f;
    let data: Vec<u8> = (0..h)
        .flat_map(|y| (0..w).flat_map(move |x| f(x, y)))
        .collect();
    w_.write_image_data(&data).unwrap();
    w_.finish().unwrap();
    out
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

pub fn unb64(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap()
}

/// A multipart/form-data body of text fields and files.
pub fn multipart(fields: &[(&str, &str)], files: &[(&str, &[u8])]) -> (String, Vec<u8>) {
    let boundary = "fluxfit-test-boundary-7MA4YWxkTrZu0gW";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    for (k, bytes) in files {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"; filename=\"{k}.png\"\r\nContent-Type: image/png\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(bytes);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

/// Makes a PNG's header claim `w` × `h` pixels, with a valid checksum: a "decompression bomb"
/// as an attacker would send it.
pub fn claim_size(png: &mut [u8], w: u32, h: u32) {
    png[16..20].copy_from_slice(&w.to_be_bytes());
    png[20..24].copy_from_slice(&h.to_be_bytes());
    let mut c = 0xFFFF_FFFFu32;
    for &b in &png[12..29] {
        c ^= b as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
    }
    png[29..33].copy_from_slice(&(!c).to_be_bytes());
}
