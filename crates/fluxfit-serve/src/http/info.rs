//! What the server tells about itself: health, metrics, the model, the planner's table for a
//! request, and the gallery of written images.

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fluxfit::planner::choice::{plan_candidates, Asked, Quant};
use fluxfit::planner::report::PlanView;
use fluxfit::planner::{candidates, Budget, Row, Workload};
use serde::Deserialize;

use super::{png_response, AppState, Backend, LocalModel};
use crate::error::ApiError;
use crate::gallery;
use crate::names::is_image_name;

pub async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": fluxfit::version() }))
}

pub async fn metrics(State(app): AppState) -> Response {
    let text = match &app.backend {
        Backend::Local(_) => {
            let (queued, running) = app.jobs.depth();
            app.metrics.render(queued, running, app.jobs.capacity())
        }
        Backend::Broker(r) => {
            let (queued, running) = app.jobs.remote_depth();
            app.metrics.render(queued, running > 0, app.jobs.capacity()) + &r.render_metrics()
        }
    };
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

pub async fn info(State(app): AppState) -> Result<Json<serde_json::Value>, ApiError> {
    let m = match &app.backend {
        Backend::Local(m) => m,
        Backend::Broker(r) => return broker_info(&app, r).map(Json),
    };
    let (queued, running) = app.jobs.depth();
    let i = &m.info;
    Ok(Json(serde_json::json!({
        "model": i.name,
        "variant": i.variant.name(),
        "modes": modes(i.variant),
        "loras": loras(i),
        "defaults": defaults(i),
        "max_side": i.max_side,
        "device": m.planning.device.name,
        "budget": m.planning.budget.map(|b| b.bytes),
        "queue": { "waiting": queued, "running": running, "capacity": app.jobs.capacity() },
        "version": fluxfit::version(),
    })))
}

/// `/v1/info` behind a broker: the first live worker's model as the one model of a single
/// server (what the web UI reads), the modes of every live pool, and the workers. With no
/// live worker there is no model to describe: 503, saying what to start.
fn broker_info(app: &super::App, r: &crate::remote::Remote) -> Result<serde_json::Value, ApiError> {
    let live = r.live();
    let Some(first) = live.first() else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no worker is serving this server's broker yet: start `fluxfit worker --broker URL` with a model",
        ));
    };
    let (queued, running) = app.jobs.remote_depth();
    let mut all_modes: Vec<&str> = Vec::new();
    for a in &live {
        for m in modes(a.model.variant) {
            if !all_modes.contains(&m) {
                all_modes.push(m);
            }
        }
    }
    let workers: Vec<_> = live
        .iter()
        .map(|a| {
            serde_json::json!({
                "name": a.name, "pool": a.pool, "model": a.model.name,
                "variant": a.model.variant.name(), "device": a.device, "budget": a.budget,
                "fits": a.fits, "busy": a.busy, "done": a.done,
            })
        })
        .collect();
    let m = &first.model;
    Ok(serde_json::json!({
        "model": m.name,
        "variant": m.variant.name(),
        "modes": all_modes,
        "loras": loras(m),
        "defaults": defaults(m),
        "max_side": m.max_side,
        "device": format!("{} worker{}", live.len(), if live.len() == 1 { "" } else { "s" }),
        "budget": null,
        "broker": true,
        "workers": workers,
        "queue": { "waiting": queued, "running": running, "capacity": app.jobs.capacity() },
        "version": fluxfit::version(),
    }))
}

/// The model's LoRAs as `/v1/info` lists them.
fn loras(i: &crate::job::ModelInfo) -> Vec<serde_json::Value> {
    i.loras
        .iter()
        .map(
            |(name, scale, hash)| serde_json::json!({ "file": name, "scale": scale, "hash": hash }),
        )
        .collect()
}

/// What a job that gives no size, steps or guidance gets.
fn defaults(i: &crate::job::ModelInfo) -> serde_json::Value {
    serde_json::json!({
        "width": i.default_size.0, "height": i.default_size.1,
        "steps": i.default_steps, "guidance": i.default_guidance,
    })
}

/// The modes this model runs.
fn modes(v: fluxfit::variant::Variant) -> Vec<&'static str> {
    use fluxfit::variant::Variant::*;
    match v {
        DevFill => vec!["fill", "outpaint", "regions"],
        DevKontext => vec!["edit"],
        DevCanny | DevDepth => vec!["control"],
        _ => vec!["generate", "img2img", "regions"],
    }
}

/// OpenAI's model list: the one model this server runs, or the live workers' models.
pub async fn models(State(app): AppState) -> Json<serde_json::Value> {
    let mut names: Vec<String> = match &app.backend {
        Backend::Local(m) => vec![m.info.name.clone()],
        Backend::Broker(r) => r.live().into_iter().map(|a| a.model.name).collect(),
    };
    names.dedup();
    let data: Vec<_> = names
        .iter()
        .map(|n| serde_json::json!({ "id": n, "object": "model", "owned_by": "fluxfit" }))
        .collect();
    Json(serde_json::json!({ "object": "list", "data": data }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanQuery {
    width: Option<usize>,
    height: Option<usize>,
    steps: Option<usize>,
    /// A job with an input image (img2img, fill, …).
    #[serde(default)]
    image_input: bool,
    /// A budget other than the server's, e.g. `8GiB`.
    vram: Option<String>,
    /// `svg`: the chart alone, as an image.
    format: Option<String>,
}

fn row_json(r: &Row, budget: Option<Budget>, m: &LocalModel) -> serde_json::Value {
    serde_json::json!({
        "label": r.prediction.label,
        "spec": r.prediction.spec,
        "peak": r.prediction.peak,
        "time_s": r.prediction.time_s,
        "warm_time_s": r.prediction.warm_time_s,
        "relative": r.relative,
        "needs": r.needs,
        "fits": budget.map(|b| b.fits(&r.prediction, &m.planning.device)),
    })
}

/// The planner's table for a request: every plan's predicted peak and time, the one picked
/// for the budget, and the plan the server would run it with.
pub async fn plan(State(app): AppState, Query(q): Query<PlanQuery>) -> Result<Response, ApiError> {
    let Backend::Local(m) = &app.backend else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "this server runs no model (--broker): each worker plans its own jobs; `fluxfit plan` with a worker's model flags and --vram shows its table",
        ));
    };
    let p = &m.planning;
    let max = m.info.max_side;
    for (name, v) in [("width", q.width), ("height", q.height)] {
        if let Some(v) = v {
            if !(64..=max).contains(&v) {
                return Err(ApiError::invalid(
                    name,
                    format!("{v}: expected 64 to {max}"),
                ));
            }
        }
    }
    if let Some(s) = q.steps {
        if s == 0 || s > 1000 {
            return Err(ApiError::invalid(
                "steps",
                format!("{s}: expected 1 to 1000"),
            ));
        }
    }
    let budget = match &q.vram {
        Some(v) => Budget::resolve(Some(v), &p.device, 0)
            .map_err(|e| ApiError::invalid("vram", e.to_string()))?,
        None => p.budget,
    };
    let request = Workload::asked(
        &p.spec,
        Asked {
            width: q.width.map(|w| w / 16 * 16),
            height: q.height.map(|h| h / 16 * 16),
            steps: q.steps,
            t5_tokens: None,
            image_input: q.image_input,
            cond_size: None,
            redux_images: 0,
        },
    );
    // Planning runs the networks over meta tensors: about a second for a large model, off the
    // HTTP threads.
    let p = p.clone();
    let view = tokio::task::spawn_blocking(move || {
        let cands = plan_candidates(
            &p.spec,
            &candidates(&p.device, p.dtype, p.attn_chunk),
            Quant::Stored,
        );
        PlanView::new(
            p.spec.clone(),
            request,
            p.device.clone(),
            (p.dtype, p.attn_chunk),
            cands,
            budget,
        )
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "planning failed"))?;
    if q.format.as_deref() == Some("svg") {
        return Ok(([(header::CONTENT_TYPE, "image/svg+xml")], view.chart()).into_response());
    }
    let rows: Vec<_> = view
        .table
        .rows
        .iter()
        .map(|r| row_json(r, budget, m))
        .collect();
    let current = match view.pick() {
        Some(r) => Some(row_json(r, budget, m)),
        None if budget.is_none() => view
            .table
            .rows
            .iter()
            .find(|r| r.prediction.spec == m.plan_spec)
            .or_else(|| view.table.rows.first())
            .map(|r| row_json(r, budget, m)),
        None => None,
    };
    Ok(Json(serde_json::json!({
        "width": view.request.width,
        "height": view.request.height,
        "steps": view.request.steps,
        "budget": budget.map(|b| b.bytes),
        "rows": rows,
        "plan": current,
        "alternatives": view.alternatives,
        "text": view.text(),
        "svg": view.chart(),
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GalleryQuery {
    limit: Option<usize>,
}

pub async fn images(
    State(app): AppState,
    Query(q): Query<GalleryQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let dir = app.output_dir.clone();
    let list = tokio::task::spawn_blocking(move || gallery::list(&dir, limit))
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "listing failed"))?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("reading the output folder: {e}"),
            )
        })?;
    Ok(Json(serde_json::json!({ "images": list })))
}

/// One written image (`?params` for its parameters as JSON instead).
pub async fn image(
    State(app): AppState,
    Path(name): Path<String>,
    Query(q): Query<std::collections::HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if !is_image_name(&name) {
        return Err(ApiError::invalid(
            "name",
            format!("`{name}` is not an image name of this server (letters, digits, - and _, then .png)"),
        ));
    }
    let path = app.output_dir.join(&name);
    if q.contains_key("params") {
        if !path.is_file() {
            return Err(ApiError::not_found(format!("no image `{name}`")));
        }
        return Ok(
            Json(serde_json::json!({ "name": name, "params": gallery::params(&path) }))
                .into_response(),
        );
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => Ok(png_response(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Err(ApiError::not_found(format!("no image `{name}`")))
        }
        Err(e) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("reading `{name}`: {e}"),
        )),
    }
}
