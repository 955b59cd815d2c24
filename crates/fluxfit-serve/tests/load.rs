//! A bounded burst on loopback: 200 OpenAI-style requests from 20 concurrent clients against a
//! queue of 8 on the tiny model. Every request is answered (an image or 429), none is lost or
//! answered twice, no panic, and the server's heap returns to its baseline afterwards. Prints
//! requests/s and p50/p99 latency (`cargo test -p fluxfit-serve --release --test load --
//! --nocapture`).

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use fluxfit::memory::alloc::{current, CountingAlloc};
use fluxfit::variant::Variant;
use serde_json::json;

/// Counts heap bytes, so "back to baseline" is measured, not guessed from RSS.
#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const CLIENTS: usize = 20;
const PER_CLIENT: usize = 10;

#[test]
fn burst_of_200_requests_against_a_queue_of_8() {
    let s = start(Variant::Schnell, |c| {
        c.queue = 8;
        c.preview_every = 0;
    });
    let url = s.url("/v1/images/generations");
    let body = json!({ "prompt": "load", "size": "64x64", "steps": 1, "seed": 1 });
    // Warm up (first-use allocations: thread pools, caches), then take the baseline.
    assert_eq!(post(&url, body.clone()).0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = current();

    let results = Arc::new(Mutex::new(Vec::new()));
    let t = Instant::now();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (url, results) = (url.clone(), results.clone());
            std::thread::spawn(move || {
                let agent = agent();
                for i in 0..PER_CLIENT {
                    let body = json!({ "prompt": format!("client {c} request {i}"),
                                       "size": "64x64", "steps": 1, "seed": c * 100 + i });
                    let start = Instant::now();
                    let (code, v) = json_of(agent.post(&url).send_json(body));
                    let n = v["data"].as_array().map_or(0, Vec::len);
                    results
                        .lock()
                        .unwrap()
                        .push((code, n, start.elapsed().as_secs_f64()));
                }
            })
        })
        .collect();
    for th in threads {
        th.join().expect("a client thread");
    }
    let wall = t.elapsed().as_secs_f64();
    let results = results.lock().unwrap().clone();
    assert_eq!(
        results.len(),
        CLIENTS * PER_CLIENT,
        "every request answered"
    );
    let ok = results.iter().filter(|r| r.0 == 200).count();
    let full = results.iter().filter(|r| r.0 == 429).count();
    assert_eq!(ok + full, results.len(), "only images or 429: {results:?}");
    assert!(results.iter().all(|r| r.0 != 200 || r.1 == 1));
    assert!(ok >= 9, "at least a queue's worth got through: {ok}");
    // One file per answered image (plus the warm-up), none twice.
    assert_eq!(s.written().len(), ok + 1);
    let metrics = text(&s.url("/metrics"));
    assert!(metrics.contains(&format!(
        "fluxfit_jobs_total{{outcome=\"done\"}} {}",
        ok + 1
    )));
    assert!(metrics.contains(&format!("fluxfit_rejected_total {full}")));

    let mut lat: Vec<f64> = results.iter().map(|r| r.2).collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() - 1) as f64 * p).round() as usize];
    let mut ok_lat: Vec<f64> = results.iter().filter(|r| r.0 == 200).map(|r| r.2).collect();
    ok_lat.sort_by(f64::total_cmp);
    let ok_pct = |p: f64| ok_lat[((ok_lat.len() - 1) as f64 * p).round() as usize];
    println!(
        "load: {} requests from {CLIENTS} clients, queue 8, tiny model 64x64 1 step: {ok} images, {full} × 429, {:.1} requests/s, latency p50 {:.3} s p99 {:.3} s (images: p50 {:.3} s p99 {:.3} s), wall {wall:.2} s",
        results.len(),
        results.len() as f64 / wall,
        pct(0.5),
        pct(0.99),
        ok_pct(0.5),
        ok_pct(0.99),
    );

    // Back to baseline: the finished jobs' records stay (bounded: 1000), their work does not.
    std::thread::sleep(Duration::from_millis(300));
    let after = current();
    let grown = after as i64 - baseline as i64;
    println!(
        "heap: baseline {:.1} MiB, after the burst {:.1} MiB ({:+.2} MiB)",
        baseline as f64 / 1048576.0,
        after as f64 / 1048576.0,
        grown as f64 / 1048576.0
    );
    assert!(
        grown < 4 << 20,
        "the heap grew by {grown} bytes over the burst"
    );
}
