//! `fluxfit serve --broker` and `fluxfit worker`s on a real Redis (started here): 100 jobs from
//! concurrent clients over three workers, one of them SIGKILLed mid-job and one drained with
//! SIGTERM, both started again; every job completes exactly once, none is lost, and the
//! images are the CLI's. A job no live worker can fit is refused at submission.

mod common;
#[path = "../../fluxfit-serve/tests/redis_server/mod.rs"]
mod redis_server;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// `fluxfit serve --broker URL` on a free port, and its base URL.
fn serve(dir: &Path, url: &str, extra: &[&str]) -> (Proc, String) {
    let mut args = vec!["--broker", url];
    args.extend_from_slice(extra);
    common::serve(dir, &args)
}

/// `fluxfit worker` on the tiny model, once it serves its pool.
fn worker(dir: &Path, url: &str, name: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "worker",
        "--broker",
        url,
        "--model",
        "tiny",
        "--name",
        name,
        "--preview-every",
        "0",
    ];
    args.extend_from_slice(extra);
    let p = Proc::start(dir, &args);
    p.wait_for("on pool");
    p
}

/// Waits until `n` workers are live in the server's view.
fn until_workers(base: &str, n: usize) {
    let t = Instant::now();
    // Before the first, /v1/info is a 503 (no model to describe).
    while get(&format!("{base}/v1/info"))["workers"]
        .as_array()
        .map_or(0, Vec::len)
        != n
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "{n} workers never showed"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A metric's value in `/metrics`.
fn metric(base: &str, name: &str) -> f64 {
    text(&format!("{base}/metrics"))
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

/// The CLI's image for a job's parameters, against the served one.
fn same_as_cli(dir: &Path, served: &Path, job: &Value) {
    let p = &job["params"];
    let n = |k: &str| p[k].as_u64().unwrap().to_string();
    let out = format!("cli-{}.png", job["id"].as_str().unwrap());
    succeeds(
        dir,
        &[
            "generate",
            "--model",
            "tiny",
            "--prompt",
            p["prompt"].as_str().unwrap(),
            "--width",
            &n("width"),
            "--height",
            &n("height"),
            "--steps",
            &n("steps"),
            "--seed",
            &n("seed"),
            "--out",
            &out,
        ],
    );
    assert_eq!(
        pixels(served),
        pixels(&dir.join(&out)),
        "job {}: the served image is not the CLI's",
        job["id"]
    );
}

#[test]
fn a_hundred_jobs_over_three_workers_survive_a_kill_and_a_restart() {
    let Some((_redis_dir, redis)) = redis_server::fresh_redis() else {
        return;
    };
    let url = redis.url();
    let dir = tempdir();
    let (_server, base) = serve(
        dir.path(),
        &url,
        &[
            "--queue",
            "200",
            "--output-dir",
            "out",
            "--preview-every",
            "0",
        ],
    );
    // A short visibility timeout, so the killed worker's job is taken over within seconds.
    let w = ["--visibility", "5"];
    let mut workers: BTreeMap<String, Proc> = ["w1", "w2", "w3"]
        .iter()
        .map(|n| (n.to_string(), worker(dir.path(), &url, n, &w)))
        .collect();
    until_workers(&base, 3);

    // The first job is long, so that its worker can be killed while it runs.
    let (code, long) = post(
        &format!("{base}/v1/jobs"),
        &json!({ "prompt": "the long one", "width": 256, "height": 256, "steps": 40, "seed": 1000 }),
    );
    assert_eq!(code, 202, "{long}");
    let long_id = long["id"].as_str().unwrap().to_string();

    // 99 more from four concurrent clients.
    let t0 = Instant::now();
    let clients: Vec<_> = (0..4)
        .map(|c| {
            let base = base.clone();
            std::thread::spawn(move || {
                (1..100)
                    .filter(|i| i % 4 == c)
                    .map(|i| {
                        let (code, v) = post(
                            &format!("{base}/v1/jobs"),
                            &json!({ "prompt": format!("job {i}"), "width": 128,
                                     "height": 128, "steps": 3, "seed": i }),
                        );
                        assert_eq!(code, 202, "{v}");
                        v["id"].as_str().unwrap().to_string()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();

    // Kill the long job's worker mid-job: once it has run two steps.
    let events = agent()
        .get(&format!("{base}/v1/jobs/{long_id}/events"))
        .call()
        .unwrap()
        .into_body()
        .into_reader();
    let mut victim = None;
    let mut kind = String::new();
    for line in BufReader::new(events).lines() {
        let line = line.unwrap();
        if let Some(k) = line.strip_prefix("event: ") {
            kind = k.to_string();
        } else if let Some(data) = line.strip_prefix("data: ") {
            let v: Value = serde_json::from_str(data).unwrap();
            if kind == "started" {
                victim = v["worker"].as_str().map(str::to_string);
            }
            if kind == "step" && v["step"].as_u64() >= Some(2) {
                break;
            }
        }
    }
    let victim = victim.expect("the long job's worker");
    workers[&victim].signal("-KILL");
    let mut killed = workers.remove(&victim).unwrap();
    killed.wait_exit(Duration::from_secs(10));

    let mut ids = vec![long_id.clone()];
    for c in clients {
        ids.extend(c.join().unwrap());
    }
    assert_eq!(ids.len(), 100);

    // Drain another worker with SIGTERM: it finishes its job, acknowledges, exits cleanly.
    let drained_name = workers.keys().next().unwrap().clone();
    let mut drained = workers.remove(&drained_name).unwrap();
    drained.signal("-TERM");
    let status = drained.wait_exit(Duration::from_secs(60));
    assert!(
        status.success(),
        "drained worker: {status}\n{}",
        drained.log()
    );
    assert!(drained.log().contains("stopped"), "{}", drained.log());

    // Both start again, under their names.
    for name in [victim.clone(), drained_name.clone()] {
        workers.insert(name.clone(), worker(dir.path(), &url, &name, &w));
    }

    // Every job ends, done.
    let t = Instant::now();
    let mut views = BTreeMap::new();
    for id in &ids {
        loop {
            let v = get(&format!("{base}/v1/jobs/{id}"));
            if matches!(v["status"].as_str(), Some("done" | "failed" | "cancelled")) {
                assert_eq!(v["status"], "done", "{v}");
                views.insert(id.clone(), v);
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(300),
                "job {id} never finished: {v}\nserver:\n{}",
                _server.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let seconds = t0.elapsed().as_secs_f64();
    eprintln!(
        "100 jobs in {seconds:.1} s over 3 workers (one killed, one drained, both restarted): {:.0} jobs/min",
        100.0 / seconds * 60.0
    );

    // Exactly once: one run to completion per job across every worker's log, one image each.
    let mut logs: String = [&killed, &drained].iter().map(|p| p.log()).collect();
    // The surviving and restarted workers log their last jobs before they stop.
    for p in workers.values() {
        p.signal("-TERM");
    }
    for p in workers.values_mut() {
        assert!(p.wait_exit(Duration::from_secs(60)).success());
        logs.push_str(&p.log());
    }
    for id in &ids {
        let runs = logs.matches(&format!("job {id}: done")).count();
        assert_eq!(runs, 1, "job {id} ran to completion {runs} times:\n{logs}");
    }
    assert!(
        !killed.log().contains(&format!("job {long_id}: done")),
        "the killed worker finished the long job after all"
    );
    let mut pngs: Vec<String> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".png"))
        .collect();
    pngs.sort();
    let mut expected: Vec<String> = ids.iter().map(|id| format!("{id}.png")).collect();
    expected.sort();
    assert_eq!(pngs, expected, "one image per job, named by its id");

    // The long job was taken over after the kill; the server's counters agree.
    assert!(metric(&base, "fluxfit_reclaimed_total") >= 1.0);
    assert_eq!(metric(&base, "fluxfit_jobs_total{outcome=\"done\"}"), 100.0);
    assert_eq!(metric(&base, "fluxfit_dead_letters_total"), 0.0);

    // The images are the CLI's: the taken-over job and two others.
    for id in [&ids[0], &ids[1], &ids[99]] {
        let v = &views[id];
        let name = v["image"]["name"].as_str().unwrap();
        same_as_cli(dir.path(), &dir.path().join("out").join(name), v);
    }
    drop(redis);
}

#[test]
fn a_job_no_live_worker_fits_is_refused_with_the_reason() {
    let Some((_redis_dir, redis)) = redis_server::fresh_redis() else {
        return;
    };
    let url = redis.url();
    let dir = tempdir();
    let (_server, base) = serve(dir.path(), &url, &["--output-dir", "out"]);
    let jobs = format!("{base}/v1/jobs");
    let job = json!({ "prompt": "x", "width": 256, "height": 256, "steps": 2, "seed": 1 });
    // No worker yet: refused, saying what to start.
    let (code, v) = post(&jobs, &job);
    assert_eq!(code, 503, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("fluxfit worker"),
        "{v}"
    );

    let _w = worker(dir.path(), &url, "small", &["--vram", "100MB"]);
    until_workers(&base, 1);
    let (code, v) = post(
        &jobs,
        &json!({ "prompt": "x", "width": 2048, "height": 2048, "steps": 2 }),
    );
    assert_eq!(code, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("no live worker can run this job") && message.contains("budget"),
        "{message}"
    );
    assert_eq!(v["error"]["param"], "width");
    // A mode its model does not run, with the model named.
    let (code, v) = post(
        &jobs,
        &json!({ "mode": "edit", "prompt": "x", "image": "AAAA" }),
    );
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["error"]["param"], "mode", "{v}");
    // An entry no server wrote (corrupt, or from another version) is dead-lettered with the
    // reason, and the worker goes on.
    let pool = get(&format!("{base}/v1/info"))["workers"][0]["pool"]
        .as_str()
        .unwrap()
        .to_string();
    let mut b = fluxfit_serve::broker::Broker::connect(redis.cfg(60_000)).unwrap();
    b.submit_to(&pool, "bogus", "{not json").unwrap();
    let t = Instant::now();
    let dead = loop {
        let d = b.dead_letters().unwrap();
        if !d.is_empty() {
            break d;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "never dead-lettered");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(dead[0].job_id, "bogus");
    assert!(
        dead[0].error.contains("not one this worker reads"),
        "{}",
        dead[0].error
    );
    // What it fits runs.
    let (code, v) = post(&jobs, &job);
    assert_eq!(code, 202, "{v}");
    let id = v["id"].as_str().unwrap();
    let t = Instant::now();
    while get(&format!("{jobs}/{id}"))["status"] != "done" {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job never finished"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until job `id` has `status`.
fn until_status(jobs: &str, id: &str, status: &str) -> Value {
    let t = Instant::now();
    loop {
        let v = get(&format!("{jobs}/{id}"));
        if v["status"] == status {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "job {id} never became {status}: {v}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn cancellation_the_openai_api_and_redis_and_server_restarts_work_through_the_broker() {
    let Some((redis_dir, redis)) = redis_server::fresh_redis() else {
        return;
    };
    let url = redis.url();
    let dir = tempdir();
    let (server, base) = serve(dir.path(), &url, &["--output-dir", "out"]);
    let jobs = format!("{base}/v1/jobs");
    let mut w = worker(dir.path(), &url, "w1", &[]);
    until_workers(&base, 1);

    // A running job is cancelled on its worker, within a step or so.
    let (code, v) = post(
        &jobs,
        &json!({ "prompt": "x", "width": 256, "height": 256, "steps": 500 }),
    );
    assert_eq!(code, 202, "{v}");
    let running = v["id"].as_str().unwrap().to_string();
    // A job queued behind it is cancelled before any worker takes it.
    let (_, v) = post(
        &jobs,
        &json!({ "prompt": "y", "width": 64, "height": 64, "steps": 2 }),
    );
    let queued = v["id"].as_str().unwrap().to_string();
    until_status(&jobs, &running, "running");
    let r = agent().delete(&format!("{jobs}/{queued}")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200, "a queued job ends at once");
    let r = agent().delete(&format!("{jobs}/{running}")).call().unwrap();
    assert_eq!(
        r.status().as_u16(),
        202,
        "a running job ends after its step"
    );
    let v = until_status(&jobs, &running, "cancelled");
    assert!(v["step"].as_u64().unwrap() < 500, "{v}");
    // The worker stopped it and went on: the next job runs.
    let (_, v) = post(
        &jobs,
        &json!({ "prompt": "z", "width": 64, "height": 64, "steps": 2 }),
    );
    until_status(&jobs, v["id"].as_str().unwrap(), "done");
    // The worker handed the cancelled queued job skipped it, recording why.
    let mut b = fluxfit_serve::broker::Broker::connect(redis.cfg(60_000)).unwrap();
    let result = b
        .result(&queued)
        .unwrap()
        .expect("a result for the skipped job");
    assert!(result.contains("\"status\":\"cancelled\""), "{result}");

    // OpenAI's images API, answered by a worker.
    let (code, v) = post(
        &format!("{base}/v1/images/generations"),
        &json!({ "prompt": "a fox", "size": "64x64", "steps": 2, "seed": 3,
                 "response_format": "b64_json" }),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["data"][0]["b64_json"].as_str().unwrap().len() > 100);

    // Redis goes down and comes back (its append-only file on): jobs accepted before are
    // run, and the server and worker connect again on their own.
    w.signal("-TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    let mut accepted = Vec::new();
    for i in 0..5 {
        let (code, v) = post(
            &jobs,
            &json!({ "prompt": format!("kept {i}"), "width": 64, "height": 64, "steps": 2 }),
        );
        assert_eq!(code, 202, "{v}");
        accepted.push(v["id"].as_str().unwrap().to_string());
    }
    redis.stop();
    let redis = redis_server::Redis::start(redis_dir.path()).unwrap();
    let mut w = worker(dir.path(), &url, "w1", &[]);
    for id in &accepted {
        until_status(&jobs, id, "done");
    }

    // The server is killed with jobs on the broker; started again on the same output
    // folder, it follows them under their ids and collects their images.
    w.signal("-TERM");
    assert!(w.wait_exit(Duration::from_secs(30)).success());
    let mut pending = Vec::new();
    for i in 0..2 {
        let (_, v) = post(
            &jobs,
            &json!({ "prompt": format!("while down {i}"), "width": 64, "height": 64, "steps": 2 }),
        );
        pending.push(v["id"].as_str().unwrap().to_string());
    }
    drop(server);
    let (_server, base) = serve(dir.path(), &url, &["--output-dir", "out"]);
    let jobs = format!("{base}/v1/jobs");
    let _w = worker(dir.path(), &url, "w1", &[]);
    for id in &pending {
        let v = until_status(&jobs, id, "done");
        let name = v["image"]["name"].as_str().unwrap();
        assert!(dir.path().join("out").join(name).is_file(), "{v}");
    }
    drop(redis);
}
