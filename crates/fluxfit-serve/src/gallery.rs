//! The output folder as a gallery: every image the server (or an earlier run of it) wrote,
//! newest first, with the parameters its PNG records. Read from the folder on each request,
//! so a restarted server lists what is already there.

use std::path::Path;

use serde::Serialize;

use crate::names::is_image_name;

#[derive(Debug, Serialize)]
pub struct Entry {
    pub name: String,
    pub url: String,
    pub bytes: u64,
    /// The PNG's text chunks (prompt, seed, steps, size, model, plan, …).
    pub params: serde_json::Map<String, serde_json::Value>,
}

/// The newest `limit` images, newest first (names start with a UTC time stamp).
pub fn list(dir: &Path, limit: usize) -> std::io::Result<Vec<Entry>> {
    let mut names: Vec<(String, u64)> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let meta = e.metadata().ok()?;
            (meta.is_file() && is_image_name(&name)).then_some((name, meta.len()))
        })
        .collect();
    names.sort_by(|a, b| b.0.cmp(&a.0));
    names.truncate(limit);
    Ok(names
        .into_iter()
        .map(|(name, bytes)| Entry {
            params: params(&dir.join(&name)),
            url: format!("/v1/images/{name}"),
            name,
            bytes,
        })
        .collect())
}

/// The PNG's text chunks; empty when it has none or cannot be read.
pub fn params(path: &Path) -> serde_json::Map<String, serde_json::Value> {
    fluxfit::image::png_text(path)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect()
}
