//! The blocking HTTP client of the server tests, shared by `fluxfit-serve`'s and
//! `fluxfit-cli`'s: statuses as values, not errors.
#![allow(dead_code)]

use std::time::Duration;

pub fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(120)))
            .build(),
    )
}

/// A body as text (`/metrics`, the page).
pub fn text(url: &str) -> String {
    agent()
        .get(url)
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}
