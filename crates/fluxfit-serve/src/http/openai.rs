//! OpenAI's images API (`POST /v1/images/generations`, `POST /v1/images/edits`), so clients
//! written for it work by changing the base URL. The request waits for its images; a client
//! that disconnects cancels them. fluxfit's own optional fields: `seed`, `steps`, `guidance`,
//! and for edits `keep_size`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Multipart, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::Json;
use base64::Engine as _;
use serde::Deserialize;

use super::{finished, prepare_and_submit, App, AppState, CancelOnDrop};
use crate::error::{parse_json, ApiError};
use crate::job::{JobSpec, Mode};
use crate::jobs::{Job, Status};

/// Images one request may ask for.
const MAX_N: usize = 10;

#[derive(Deserialize)]
struct Generations {
    prompt: String,
    #[serde(default = "one")]
    n: usize,
    size: Option<String>,
    response_format: Option<String>,
    seed: Option<u64>,
    steps: Option<usize>,
    guidance: Option<f32>,
    // Accepted for compatibility; fluxfit runs the model it was started with.
    #[serde(default, rename = "model")]
    _model: Option<String>,
    #[serde(default, rename = "quality")]
    _quality: Option<String>,
    #[serde(default, rename = "style")]
    _style: Option<String>,
    #[serde(default, rename = "user")]
    _user: Option<String>,
}

fn one() -> usize {
    1
}

/// `WxH`, or `auto` (the model's default).
fn parse_size(size: Option<&str>) -> Result<(Option<usize>, Option<usize>), ApiError> {
    match size {
        None | Some("auto") => Ok((None, None)),
        Some(s) => {
            let bad = || {
                ApiError::invalid(
                    "size",
                    format!("`{s}`: expected WxH (e.g. 1024x1024) or auto"),
                )
            };
            let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
            Ok((
                Some(w.trim().parse().map_err(|_| bad())?),
                Some(h.trim().parse().map_err(|_| bad())?),
            ))
        }
    }
}

fn check_n(n: usize, queue: usize) -> Result<(), ApiError> {
    let max = MAX_N.min(queue);
    if n == 0 || n > max {
        return Err(ApiError::invalid(
            "n",
            format!("{n}: expected 1 to {max} (this server queues {queue} jobs)"),
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq)]
enum Format {
    B64,
    Url,
}

fn parse_format(f: Option<&str>) -> Result<Format, ApiError> {
    match f {
        None | Some("b64_json") => Ok(Format::B64),
        Some("url") => Ok(Format::Url),
        Some(other) => Err(ApiError::invalid(
            "response_format",
            format!("`{other}`: expected b64_json or url"),
        )),
    }
}

/// `n` copies of `spec`, seeds counting up from the given one (or each random).
fn copies(spec: JobSpec, n: usize) -> Vec<JobSpec> {
    (0..n)
        .map(|i| JobSpec {
            seed: spec.seed.map(|s| s.wrapping_add(i as u64)),
            ..spec.clone()
        })
        .collect()
}

pub async fn generations(
    State(app): AppState,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let g: Generations = parse_json(&body)?;
    check_n(g.n, app.jobs.capacity())?;
    let format = parse_format(g.response_format.as_deref())?;
    let (width, height) = parse_size(g.size.as_deref())?;
    let spec = JobSpec {
        mode: Mode::Generate,
        prompt: g.prompt.clone(),
        width,
        height,
        steps: g.steps,
        guidance: g.guidance,
        seed: g.seed,
        ..JobSpec::default()
    };
    let specs = copies(spec, g.n)
        .into_iter()
        .map(|s| (s, None, None))
        .collect();
    respond(&app, &headers, specs, format, &g.prompt).await
}

pub async fn edits(
    State(app): AppState,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (mut image, mut mask) = (None, None);
    let mut text = std::collections::HashMap::new();
    while let Some(field) = form
        .next_field()
        .await
        .map_err(|e| ApiError::invalid("body", format!("not a valid multipart form: {e}")))?
    {
        let name = field.name().unwrap_or("").to_string();
        let bytes = field.bytes().await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    e.status(),
                    "the request body is larger than this server accepts (--max-upload-mib)",
                )
            } else {
                ApiError::invalid(&name, format!("cannot read the field: {e}"))
            }
        })?;
        match name.as_str() {
            "image" | "image[]" => image = Some(bytes.to_vec()),
            "mask" => mask = Some(bytes.to_vec()),
            "prompt" | "n" | "size" | "response_format" | "seed" | "steps" | "guidance"
            | "keep_size" | "model" | "user" | "quality" | "background" | "output_format" => {
                let v = String::from_utf8(bytes.to_vec())
                    .map_err(|_| ApiError::invalid(&name, "not UTF-8 text"))?;
                text.insert(name, v);
            }
            other => {
                return Err(ApiError::invalid(
                    other,
                    "unknown field (expected image, mask, prompt, n, size, response_format, seed, steps, guidance)",
                ))
            }
        }
    }
    let image = image.ok_or_else(|| ApiError::invalid("image", "the image to edit is missing"))?;
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        text.get(k)
            .map(|v| {
                v.trim()
                    .parse::<f64>()
                    .map_err(|_| ApiError::invalid(k, format!("`{v}` is not a number")))
            })
            .transpose()
    };
    let whole = |k: &str| -> Result<Option<u64>, ApiError> {
        text.get(k)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| ApiError::invalid(k, format!("`{v}` is not a whole number")))
            })
            .transpose()
    };
    let n = whole("n")?.unwrap_or(1) as usize;
    check_n(n, app.jobs.capacity())?;
    let format = parse_format(text.get("response_format").map(String::as_str))?;
    let prompt = text.get("prompt").cloned().unwrap_or_default();
    // With a mask, or on a Fill model, it is inpainting; otherwise Kontext editing.
    // Behind a broker, Kontext workers take it when there are any.
    let variants = app.variants();
    let mode = if mask.is_some()
        || (variants.contains(&fluxfit::variant::Variant::DevFill)
            && !variants.contains(&fluxfit::variant::Variant::DevKontext))
    {
        Mode::Fill
    } else {
        Mode::Edit
    };
    let (width, height) = if mode == Mode::Edit {
        parse_size(text.get("size").map(String::as_str))?
    } else {
        (None, None)
    };
    let spec = JobSpec {
        mode,
        prompt: prompt.clone(),
        width,
        height,
        steps: whole("steps")?.map(|s| s as usize),
        guidance: num("guidance")?.map(|g| g as f32),
        seed: whole("seed")?,
        // fluxfit's own: the image's size instead of the reference's size rule.
        keep_size: matches!(
            text.get("keep_size").map(String::as_str),
            Some("true" | "1")
        ),
        ..JobSpec::default()
    };
    let specs = copies(spec, n)
        .into_iter()
        .map(|s| (s, Some(image.clone()), mask.clone()))
        .collect();
    respond(&app, &headers, specs, format, &prompt).await
}

/// Queues the jobs, waits for them, and answers in OpenAI's shape.
async fn respond(
    app: &Arc<App>,
    headers: &HeaderMap,
    specs: Vec<super::Submitted>,
    format: Format,
    prompt: &str,
) -> Result<Json<serde_json::Value>, ApiError> {
    let jobs = prepare_and_submit(app, specs).await?;
    let guard = CancelOnDrop(app.jobs.clone(), jobs.clone());
    for j in &jobs {
        finished(j).await;
    }
    drop(guard);
    // The Host header goes into the URLs: only a plausible host[:port] is used.
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= 255
                && h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        })
        .unwrap_or("127.0.0.1");
    let mut data = Vec::new();
    for j in &jobs {
        data.push(result(app, j, format, host, prompt).await?);
    }
    let created = jobs.first().map_or(0, |j| j.created);
    Ok(Json(
        serde_json::json!({ "created": created, "data": data }),
    ))
}

async fn result(
    app: &App,
    job: &Job,
    format: Format,
    host: &str,
    prompt: &str,
) -> Result<serde_json::Value, ApiError> {
    let (status, image, error) = {
        let s = job.state();
        (s.status, s.image.clone(), s.error.clone())
    };
    let image = match (status, image) {
        (Status::Done, Some(image)) => image,
        (Status::Cancelled, _) => {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("job {} was cancelled", job.id),
            ))
        }
        _ => {
            let message = error.unwrap_or_else(|| "the job failed".into());
            // The model's own refusal of a request is the client's; anything else is ours.
            let code = if message.starts_with("invalid request") {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return Err(ApiError::new(code, message));
        }
    };
    Ok(match format {
        Format::Url => serde_json::json!({
            "url": format!("http://{host}{}", image.url),
            "revised_prompt": prompt,
        }),
        Format::B64 => {
            let path = app.output_dir.join(&image.name);
            let bytes = tokio::fs::read(&path).await.map_err(|e| {
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("reading {}: {e}", image.name),
                )
            })?;
            serde_json::json!({
                "b64_json": base64::engine::general_purpose::STANDARD.encode(bytes),
                "revised_prompt": prompt,
            })
        }
    })
}
