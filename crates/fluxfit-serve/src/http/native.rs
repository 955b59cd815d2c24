//! Native jobs: `POST /v1/jobs` queues one, `GET /v1/jobs/{id}` shows it, `DELETE` cancels it,
//! and `GET /v1/jobs/{id}/events` streams its events as Server-Sent Events.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::IntoResponse;
use axum::Json;
use futures_util::stream::{self, Stream};

use super::{prepare_and_submit, App, AppState};
use crate::error::{parse_json, ApiError};
use crate::job::JobSpec;
use crate::jobs::{Job, JobEvent};

pub async fn submit(State(app): AppState, body: Bytes) -> Result<impl IntoResponse, ApiError> {
    let spec: JobSpec = parse_json(&body)?;
    let job = prepare_and_submit(&app, vec![(spec, None, None)])
        .await?
        .remove(0);
    let (_, pos) = app.jobs.get(&job.id).unwrap_or((job.clone(), None));
    Ok((StatusCode::ACCEPTED, Json(job.view(pos))))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    limit: Option<usize>,
}

/// The jobs queued and running, then the newest finished ones (`?limit`, default 50): what a
/// reloaded page needs to find its running job again.
pub async fn list(
    State(app): AppState,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> Json<serde_json::Value> {
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    Json(serde_json::json!({ "jobs": app.jobs.list(limit) }))
}

fn find(app: &App, id: &str) -> Result<(Arc<Job>, Option<usize>), ApiError> {
    app.jobs
        .get(id)
        .ok_or_else(|| ApiError::not_found(format!("no job `{id}` (finished jobs are forgotten after 1000 more; their images stay in the gallery)")))
}

pub async fn status(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (job, pos) = find(&app, &id)?;
    Ok(Json(job.view(pos)))
}

pub async fn cancel(
    State(app): AppState,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let (job, pos) = find(&app, &id)?;
    if !app.jobs.cancel(&job, "cancelled by the client") {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!("job `{id}` has already finished"),
        ));
    }
    // A running job stops after its current step: 202 until then.
    let code = if job.state().status.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((code, Json(job.view(pos))))
}

/// The event log so far, then each new event as it comes; the stream ends after the final
/// event. `Last-Event-ID` resumes after that event.
pub async fn events(
    State(app): AppState,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let (job, _) = find(&app, &id)?;
    let next = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(0, |n| n.saturating_add(1));
    let rx = job.subscribe();
    let state = (job, rx, next, VecDeque::<JobEvent>::new(), false);
    let s = stream::unfold(
        state,
        |(job, mut rx, mut next, mut buf, ended)| async move {
            loop {
                if let Some(e) = buf.pop_front() {
                    let event = Event::default()
                        .id(e.seq.to_string())
                        .event(e.kind)
                        .data(e.data.to_string());
                    return Some((Ok(event), (job, rx, next, buf, ended)));
                }
                if ended {
                    return None;
                }
                rx.mark_unchanged();
                let (fresh, is_final) = {
                    let s = job.state();
                    let fresh: Vec<JobEvent> =
                        s.events.iter().filter(|e| e.seq >= next).cloned().collect();
                    (fresh, s.status.is_final())
                };
                if let Some(last) = fresh.last() {
                    next = last.seq + 1;
                }
                buf.extend(fresh);
                if is_final {
                    return match buf.pop_front() {
                        Some(e) => {
                            let event = Event::default()
                                .id(e.seq.to_string())
                                .event(e.kind)
                                .data(e.data.to_string());
                            Some((Ok(event), (job, rx, next, buf, true)))
                        }
                        None => None,
                    };
                }
                if buf.is_empty() && rx.changed().await.is_err() {
                    return None;
                }
            }
        },
    );
    Ok(Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
