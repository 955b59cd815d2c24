//! The job stream against a real Redis (`redis-server`, started here on a Unix socket in a
//! temporary folder): every job completes once, a worker that dies mid-job loses nothing,
//! repeated failures are dead-lettered, and accepted jobs survive a Redis restart.
//!
//! Without `redis-server` on the PATH the tests are skipped, unless `FLUXFIT_REQUIRE_REDIS=1`
//! (as CI sets), where they fail.

use std::net::TcpListener;
use std::time::Duration;

use fluxfit_serve::broker::{Broker, BrokerConfig};

mod redis_server;
use redis_server::{fresh_redis, Redis};

const NONE: Duration = Duration::from_millis(50);

#[test]
fn concurrent_workers_complete_every_job_once() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(60_000);
    let mut server = Broker::connect(cfg.clone()).unwrap();
    let n = 40;
    for i in 0..n {
        server
            .submit(&format!("job-{i}"), &format!("{{\"n\":{i}}}"))
            .unwrap();
    }
    assert_eq!(server.backlog("default").unwrap(), (n as u64, 0));
    let workers: Vec<_> = (0..3)
        .map(|w| {
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let mut b = Broker::connect(cfg).unwrap();
                let mut done = Vec::new();
                while let Some(d) = b.claim(&format!("w{w}"), NONE).unwrap() {
                    assert!(b.complete(&d, &format!("result of {}", d.request)).unwrap());
                    done.push(d.job_id);
                }
                done
            })
        })
        .collect();
    let mut all: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), n, "every job exactly once");
    for i in 0..n {
        assert_eq!(
            server.result(&format!("job-{i}")).unwrap().as_deref(),
            Some(format!("result of {{\"n\":{i}}}").as_str())
        );
    }
    assert_eq!(server.pending().unwrap(), 0);
    // Acknowledged entries are deleted: nothing of a finished job stays on the stream.
    assert_eq!(server.backlog("default").unwrap(), (0, 0));
}

#[test]
fn a_job_left_by_a_dead_worker_is_taken_over_and_kept_once() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(300);
    let mut server = Broker::connect(cfg.clone()).unwrap();
    server.submit("j1", "{}").unwrap();
    // Worker a takes the job and dies without acknowledging.
    let mut a = Broker::connect(cfg.clone()).unwrap();
    let first = a.claim("a", NONE).unwrap().expect("a gets the job");
    assert_eq!(first.deliveries, 1);
    let mut b = Broker::connect(cfg).unwrap();
    assert_eq!(
        b.claim("b", NONE).unwrap(),
        None,
        "not before the visibility timeout"
    );
    std::thread::sleep(Duration::from_millis(400));
    let again = b.claim("b", NONE).unwrap().expect("b takes it over");
    assert_eq!((again.job_id.as_str(), again.deliveries), ("j1", 2));
    assert!(b.complete(&again, "from b").unwrap());
    // a was only slow: its late result does not replace b's.
    assert!(!a.complete(&first, "from a").unwrap());
    assert_eq!(server.result("j1").unwrap().as_deref(), Some("from b"));
    assert_eq!(server.pending().unwrap(), 0);
}

#[test]
fn a_job_that_keeps_failing_is_dead_lettered_with_its_error() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(100);
    let mut b = Broker::connect(cfg).unwrap();
    b.submit("bad", "{\"prompt\":\"x\"}").unwrap();
    let mut attempts = 0;
    loop {
        std::thread::sleep(Duration::from_millis(150));
        let Some(d) = b.claim("w", NONE).unwrap() else {
            break;
        };
        attempts += 1;
        assert_eq!(d.deliveries, attempts);
        if b.fail(&d, &format!("out of memory, attempt {attempts}"))
            .unwrap()
        {
            break;
        }
    }
    assert_eq!(attempts, 3);
    let dead = b.dead_letters().unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job_id, "bad");
    assert_eq!(dead[0].error, "out of memory, attempt 3");
    assert_eq!(b.pending().unwrap(), 0);
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(b.claim("w", NONE).unwrap(), None, "not delivered again");
}

#[test]
fn accepted_jobs_survive_a_redis_restart() {
    let Some((dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(60_000);
    let mut server = Broker::connect(cfg.clone()).unwrap();
    for i in 0..5 {
        server.submit(&format!("j{i}"), "{}").unwrap();
    }
    drop(server);
    redis.stop();
    let redis = Redis::start(dir.path()).unwrap();
    let mut w = Broker::connect(redis.cfg(60_000)).unwrap();
    let mut got = Vec::new();
    while let Some(d) = w.claim("w", NONE).unwrap() {
        w.complete(&d, "ok").unwrap();
        got.push(d.job_id);
    }
    assert_eq!(got, ["j0", "j1", "j2", "j3", "j4"]);
}

#[test]
fn an_unreachable_broker_is_a_clear_error() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Broker::connect(BrokerConfig::new(format!(
        "redis://user:hunter2@127.0.0.1:{port}/"
    )))
    .err()
    .expect("nothing listens there")
    .to_string();
    assert!(err.contains(&format!("127.0.0.1:{port}")), "{err}");
    assert!(!err.contains("hunter2"), "the password is not shown: {err}");
}

#[test]
fn workers_heartbeat_and_lapse() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let mut b = Broker::connect(redis.cfg(60_000)).unwrap();
    b.heartbeat("gpu-24g", "{\"budget\":\"24GB\"}", Duration::from_secs(30))
        .unwrap();
    b.heartbeat(
        "gpu-12g",
        "{\"budget\":\"12GB\"}",
        Duration::from_millis(200),
    )
    .unwrap();
    let names = |b: &mut Broker| -> Vec<String> {
        b.live_workers()
            .unwrap()
            .into_iter()
            .map(|w| w.name)
            .collect()
    };
    assert_eq!(names(&mut b), ["gpu-12g", "gpu-24g"]);
    assert_eq!(b.live_workers().unwrap()[1].serves, "{\"budget\":\"24GB\"}");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(names(&mut b), ["gpu-24g"], "a lapsed heartbeat is not live");
}

#[test]
fn progress_events_and_cancellation_reach_the_other_side() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(60_000);
    let mut worker = Broker::connect(cfg.clone()).unwrap();
    let mut server = Broker::connect(cfg).unwrap();
    for step in 1..=3 {
        worker
            .publish_event("j", &format!("{{\"step\":{step}}}"), 100)
            .unwrap();
    }
    let got = server.events("j", "0", NONE).unwrap();
    assert_eq!(
        got.iter().map(|e| e.1.as_str()).collect::<Vec<_>>(),
        ["{\"step\":1}", "{\"step\":2}", "{\"step\":3}"]
    );
    // Reading on from the last id: nothing new yet, then the next event.
    let last = got.last().unwrap().0.clone();
    assert!(server.events("j", &last, NONE).unwrap().is_empty());
    worker.publish_event("j", "done", 100).unwrap();
    assert_eq!(server.events("j", &last, NONE).unwrap()[0].1, "done");

    assert_eq!(worker.cancelled("j").unwrap(), None);
    server
        .cancel("j", "cancelled by the user", Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        worker.cancelled("j").unwrap().as_deref(),
        Some("cancelled by the user")
    );
}

/// `rediss://` with a password, against a `redis-server` with TLS on (a self-signed
/// certificate made with `openssl`; skipped where there is none): the certificate is checked
/// unless the URL ends in `#insecure`, and a wrong password is an error that does not show it.
#[test]
fn tls_and_passwords() {
    let dir = tempfile::tempdir().unwrap();
    let made = std::process::Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("no openssl here: skipped");
        return;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let Some(redis) = Redis::start_with(
        dir.path(),
        &[
            "--tls-port",
            &port.to_string(),
            "--tls-cert-file",
            "cert.pem",
            "--tls-key-file",
            "key.pem",
            "--tls-ca-cert-file",
            "cert.pem",
            "--tls-auth-clients",
            "no",
            "--requirepass",
            "s3cret",
        ],
    ) else {
        return;
    };
    let url =
        |pw: &str, tail: &str| BrokerConfig::new(format!("rediss://:{pw}@127.0.0.1:{port}/{tail}"));
    let t = std::time::Instant::now();
    let mut b = loop {
        match Broker::connect(url("s3cret", "#insecure")) {
            Ok(b) => break b,
            Err(e) => {
                assert!(t.elapsed() < Duration::from_secs(10), "{e}");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    b.submit("j1", "{}").unwrap();
    let e = Broker::connect(url("wrong", "#insecure"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("rediss://:***@") && !e.contains("wrong"), "{e}");
    let e = Broker::connect(url("s3cret", ""))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("certificate") && !e.contains("s3cret"), "{e}");
    drop(redis);
}

/// A worker keeps its running job claimed, but does not take back one another worker took
/// over; a worker restarted under its name takes back what it held at once.
#[test]
fn keeping_a_claim_and_taking_back_after_a_restart() {
    let Some((_dir, redis)) = fresh_redis() else {
        return;
    };
    let cfg = redis.cfg(200);
    let mut server = Broker::connect(cfg.clone()).unwrap();
    server.submit("a", "{}").unwrap();
    let mut w1 = Broker::connect(cfg.clone()).unwrap();
    let mut w2 = Broker::connect(cfg.clone()).unwrap();
    let d = w1.claim("w1", NONE).unwrap().unwrap();
    // Touched more often than the visibility timeout, it is not taken over.
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(80));
        assert!(w1.touch("w1", &d.entry).unwrap());
        assert!(w2.claim("w2", NONE).unwrap().is_none());
    }
    // Left alone past it, it is; and w1's touch no longer takes it back.
    std::thread::sleep(Duration::from_millis(300));
    let taken = w2.claim("w2", NONE).unwrap().unwrap();
    assert_eq!((taken.job_id.as_str(), taken.deliveries), ("a", 2));
    assert!(!w1.touch("w1", &d.entry).unwrap());
    // w2 "restarts": under its name, it takes the job back without waiting.
    let mut w2 = Broker::connect(cfg).unwrap();
    let own = w2.reclaim_own("w2").unwrap();
    assert_eq!(own.len(), 1);
    assert_eq!((own[0].job_id.as_str(), own[0].deliveries), ("a", 3));
    assert!(w2.complete(&own[0], "ok").unwrap());
    assert!(w2.reclaim_own("w2").unwrap().is_empty());
}
