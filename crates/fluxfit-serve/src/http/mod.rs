//! The HTTP surface: routes, the API key check, body limits, and JSON errors for every
//! rejection (unknown route, wrong method, oversized body).

mod info;
mod native;
mod openai;
mod ui;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::error::ApiError;
use crate::job::{ImageLimits, JobSpec, ModelInfo, Work};
use crate::jobs::Jobs;
use crate::metrics::Metrics;
use crate::runner::Planning;

/// What every handler may read.
pub struct App {
    pub jobs: Arc<Jobs>,
    pub metrics: Arc<Metrics>,
    pub backend: Backend,
    pub output_dir: std::path::PathBuf,
    pub api_key: Option<String>,
    pub limits: ImageLimits,
    /// Jobs being checked and decoded at once.
    pub preparing: tokio::sync::Semaphore,
}

/// Who runs the jobs.
pub enum Backend {
    /// This server's own model, on its runner thread.
    Local(Box<LocalModel>),
    /// Workers behind a broker (`--broker`).
    Broker(Arc<crate::remote::Remote>),
}

pub struct LocalModel {
    pub info: ModelInfo,
    pub planning: Planning,
    /// The model's plan at start, the one kept when there is no budget.
    pub plan_spec: String,
}

impl App {
    /// The model jobs are checked against: this server's, or the first live worker's.
    pub fn model_info(&self) -> Option<ModelInfo> {
        match &self.backend {
            Backend::Local(m) => Some(m.info.clone()),
            Backend::Broker(r) => r.live().into_iter().next().map(|a| a.model),
        }
    }

    /// The model variants that can run jobs now.
    pub fn variants(&self) -> Vec<fluxfit::variant::Variant> {
        match &self.backend {
            Backend::Local(m) => vec![m.info.variant],
            Backend::Broker(r) => r.live().into_iter().map(|a| a.model.variant).collect(),
        }
    }
}

pub type AppState = State<Arc<App>>;

pub fn router(app: Arc<App>, max_body: usize, body_timeout: std::time::Duration) -> Router {
    let api = Router::new()
        .route("/v1/jobs", get(native::list).post(native::submit))
        .route("/v1/jobs/{id}", get(native::status).delete(native::cancel))
        .route("/v1/jobs/{id}/events", get(native::events))
        .route(
            "/v1/images/generations",
            axum::routing::post(openai::generations),
        )
        .route("/v1/images/edits", axum::routing::post(openai::edits))
        .route("/v1/images", get(info::images))
        .route("/v1/images/{name}", get(info::image))
        .route("/v1/plan", get(info::plan))
        .route("/v1/info", get(info::info))
        .route("/v1/models", get(info::models))
        .route("/metrics", get(info::metrics))
        .layer(middleware::from_fn_with_state(app.clone(), require_key));
    Router::new()
        .route("/healthz", get(info::healthz))
        .merge(ui::routes())
        .merge(api)
        .fallback(|| async { ApiError::not_found("no such endpoint") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "this endpoint does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            too_large(req, next, max_body)
        }))
        .layer(middleware::from_fn(json_rejections))
        .layer(middleware::from_fn(move |req: Request, next: Next| {
            crate::conn::body_deadline(req, next, body_timeout)
        }))
        .with_state(app)
}

/// A body whose declared length is over the limit is refused at once, before it is sent or
/// read (the body limit itself catches bodies without a length, as they are read).
async fn too_large(req: Request, next: Next, max_body: usize) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max_body as u64) {
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "the request body is larger than this server accepts (--max-upload-mib)",
        )
        .into_response();
        r.headers_mut().insert(
            header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        return r;
    }
    next.run(req).await
}

/// With `--api-key`, the API wants `Authorization: Bearer KEY` (compared in constant time).
async fn require_key(State(app): AppState, req: Request, next: Next) -> Response {
    let Some(key) = &app.api_key else {
        return next.run(req).await;
    };
    // The scheme is case-insensitive (RFC 7235).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, key)| key.trim());
    if constant_time_eq(given.as_bytes(), key.as_bytes()) {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "this server wants an API key: send `Authorization: Bearer KEY`",
        )
        .into_response()
    }
}

/// Equal bytes, in a time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let n = a.len().max(b.len());
    let mut diff = (a.len() ^ b.len()) as u8 | u8::from(a.len() != b.len());
    for i in 0..n {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0);
    }
    diff == 0
}

/// axum answers some rejections (a body over the limit, a bad multipart stream) in plain
/// text; clients get the same JSON error shape as everywhere else.
async fn json_rejections(req: Request, next: Next) -> Response {
    let r = next.run(req).await;
    let is_json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let status = r.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json {
        let bytes = axum::body::to_bytes(r.into_body(), 64 * 1024)
            .await
            .unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes);
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "the request body is larger than this server accepts (--max-upload-mib)".to_string()
        } else if text.is_empty() {
            status.to_string()
        } else {
            text.into_owned()
        };
        return ApiError::new(status, message).into_response();
    }
    r
}

/// A job as submitted: its spec, and its image and mask when they came as files.
pub type Submitted = (JobSpec, Option<Vec<u8>>, Option<Vec<u8>>);

/// Checks a job and decodes its images off the async threads, then queues it; a full queue is
/// counted.
pub async fn prepare_and_submit(
    app: &Arc<App>,
    specs: Vec<Submitted>,
) -> Result<Vec<Arc<crate::jobs::Job>>, ApiError> {
    // Decoding uploads can take a lot of memory (up to the decoder limit each): two at a time.
    let _permit =
        app.preparing.acquire().await.map_err(|_| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the server is stopping")
        })?;
    if let Backend::Broker(remote) = &app.backend {
        let (a, remote) = (app.clone(), remote.clone());
        return tokio::task::spawn_blocking(move || {
            remote.submit(&a.jobs, specs, a.limits).inspect_err(|e| {
                if e.status == StatusCode::TOO_MANY_REQUESTS {
                    a.metrics.rejected();
                }
            })
        })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "submitting the job failed",
            )
        })?;
    }
    let a = app.clone();
    let works = tokio::task::spawn_blocking(move || {
        let Backend::Local(m) = &a.backend else {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "no local model to run the job",
            ));
        };
        specs
            .into_iter()
            .map(|(spec, image, mask)| {
                let work: Work =
                    spec.prepare(&m.info, image, mask, a.limits, crate::random_seed())?;
                // Under a budget, a job no plan fits is refused now, not failed later.
                m.planning.choose(&work).map_err(|e| {
                    ApiError::invalid(
                        "width",
                        format!(
                            "{}x{} fits no plan within this server's budget: {e}",
                            work.req.width, work.req.height
                        ),
                    )
                })?;
                let mut params = serde_json::to_value(&spec).unwrap_or_default();
                if let Some(p) = params.as_object_mut() {
                    p.insert("width".into(), work.req.width.into());
                    p.insert("height".into(), work.req.height.into());
                    p.insert("steps".into(), work.req.steps.into());
                    p.insert("guidance".into(), work.req.guidance.into());
                    p.insert("seed".into(), work.req.seed.into());
                }
                Ok((spec.mode, params, work))
            })
            .collect::<Result<Vec<_>, ApiError>>()
    })
    .await
    .map_err(|_| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "preparing the job failed",
        )
    })??;
    app.jobs.submit(works).inspect_err(|e| {
        if e.status == StatusCode::TOO_MANY_REQUESTS {
            app.metrics.rejected();
        }
    })
}

/// Waits until `job` has finished.
pub async fn finished(job: &crate::jobs::Job) {
    let mut rx = job.subscribe();
    loop {
        if job.state().status.is_final() {
            return;
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Cancels its jobs when dropped before they finish: a client that disconnects while it
/// waits does not leave work (and memory) behind.
pub struct CancelOnDrop(pub Arc<Jobs>, pub Vec<Arc<crate::jobs::Job>>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        for j in &self.1 {
            if !j.state().status.is_final() {
                self.0.cancel(j, "the client disconnected");
            }
        }
    }
}

pub fn png_response(bytes: Vec<u8>) -> Response {
    Response::builder()
        .header(header::CONTENT_TYPE, "image/png")
        .header(
            header::CACHE_CONTROL,
            "private, max-age=31536000, immutable",
        )
        .body(Body::from(bytes))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    #[test]
    fn constant_time_eq_is_equality() {
        use super::constant_time_eq as eq;
        assert!(eq(b"secret", b"secret"));
        assert!(!eq(b"secret", b"secreT"));
        assert!(!eq(b"secret", b"secret2"));
        assert!(!eq(b"", b"x"));
        assert!(eq(b"", b""));
    }
}
