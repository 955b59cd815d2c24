//! The job stream shared by servers and workers on Redis Streams (`--broker redis://…`).
//!
//! Accepted jobs go on the stream of a *pool*, `{ns}:jobs:{pool}` (`id`, `request` JSON): the
//! workers that load the same model under the same budget, so that any of them can run any
//! job routed there. The pool's consumer group `workers` hands each job to one worker at a
//! time. A worker that dies leaves its delivery pending:
//! after the visibility timeout another worker takes it over (`XAUTOCLAIM`). A result is written
//! under its job id only if none is there yet (`SET … NX`) and only then acknowledged, so a job
//! run twice keeps one result. A job delivered `max_deliveries` times without a result moves
//! to the dead-letter stream `{ns}:dead` with its last error.
//!
//! Blocking connections: a worker's loop is blocking anyway (the model runs on its thread), and
//! the server calls these from `spawn_blocking`.

use std::time::Duration;

use redis::{Connection, Value};

/// The consumer group every worker reads through.
const GROUP: &str = "workers";

/// What can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    // The cause is in the message, not also a `source`: printed with its chain it would
    // repeat.
    #[error("broker {url}: {error}")]
    Redis {
        url: String,
        error: redis::RedisError,
    },
    #[error("broker: unexpected reply to {command}: {reply}")]
    Reply {
        command: &'static str,
        reply: String,
    },
}

pub type Result<T> = std::result::Result<T, BrokerError>;

/// Settings of one broker connection.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    /// `redis://[user:password@]host:port[/db]` or `rediss://…` (TLS).
    pub url: String,
    /// Prefix of every key, so that several deployments can share one Redis.
    pub namespace: String,
    /// How long a delivery may stay unacknowledged before another worker may take it over.
    pub visibility: Duration,
    /// Deliveries after which a job that never produced a result goes to the dead letters.
    pub max_deliveries: u64,
    /// The pool whose stream this connection's worker reads (see the module doc).
    pub pool: String,
    /// How long a result stays in Redis for the server to collect.
    pub result_ttl: Duration,
}

impl BrokerConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            namespace: "fluxfit".into(),
            visibility: Duration::from_secs(120),
            max_deliveries: 3,
            pool: "default".into(),
            result_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// A job handed to a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// The stream entry (what is acknowledged).
    pub entry: String,
    pub job_id: String,
    pub request: String,
    /// How many times this entry has been delivered, this one included.
    pub deliveries: u64,
    /// Taken over from a worker that left it past the visibility timeout.
    pub reclaimed: bool,
}

/// A dead-lettered job.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadJob {
    pub job_id: String,
    pub request: String,
    pub error: String,
}

/// One connection to the broker.
pub struct Broker {
    cfg: BrokerConfig,
    con: Connection,
    /// Pools whose stream and group this connection has made sure of.
    groups: std::collections::HashSet<String>,
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".into()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

/// Field `name` of an entry's flat `[k, v, k, v, …]` field list.
fn field(fields: &[Value], name: &str) -> Option<String> {
    fields
        .chunks(2)
        .find(|kv| text(&kv[0]).as_deref() == Some(name))
        .and_then(|kv| kv.get(1).and_then(text))
}

/// `[[entry id, [fields…]], …]` → (entry, fields); entries whose data was deleted are skipped.
fn entries(v: &Value) -> Vec<(String, Vec<Value>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|e| match e {
            Value::Array(pair) if pair.len() == 2 => match (&pair[0], &pair[1]) {
                (id, Value::Array(fields)) => Some((text(id)?, fields.clone())),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// The entry id an `XADD` answers.
fn added(v: Value) -> Result<String> {
    text(&v).ok_or_else(|| BrokerError::Reply {
        command: "XADD",
        reply: format!("{v:?}"),
    })
}

/// The `[stream, entries]` pairs of an `XREAD`/`XREADGROUP` reply: an array in RESP2, a map
/// in RESP3, nil when the wait ran out.
fn streams(v: Value) -> Vec<Value> {
    match v {
        Value::Array(s) => s,
        Value::Map(m) => m
            .into_iter()
            .map(|(k, v)| Value::Array(vec![k, v]))
            .collect(),
        _ => Vec::new(),
    }
}

/// The entries of an `XREAD`/`XREADGROUP` reply, all streams together: `[[stream, entries]]`
/// in RESP2, a map in RESP3, nil when the wait ran out.
fn read_entries(v: Value) -> Vec<(String, Vec<Value>)> {
    streams(v)
        .iter()
        .flat_map(|s| match s {
            Value::Array(pair) if pair.len() == 2 => entries(&pair[1]),
            _ => Vec::new(),
        })
        .collect()
}

impl Broker {
    /// Connects (within 10 s) and makes sure the stream and its consumer group exist.
    pub fn connect(cfg: BrokerConfig) -> Result<Self> {
        let err = |error| BrokerError::Redis {
            url: redact(&cfg.url),
            error,
        };
        if cfg.url.starts_with("rediss://") {
            // Once per process; a provider already installed stays.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let client = redis::Client::open(cfg.url.as_str()).map_err(err)?;
        let con = client
            .get_connection_with_timeout(Duration::from_secs(10))
            .map_err(err)?;
        let mut b = Self {
            cfg,
            con,
            groups: Default::default(),
        };
        let pool = b.cfg.pool.clone();
        b.ensure_group(&pool)?;
        Ok(b)
    }

    /// Creates `pool`'s stream and consumer group unless they exist. From the stream's start
    /// (`0`): jobs put there before the first worker came are delivered too.
    fn ensure_group(&mut self, pool: &str) -> Result<()> {
        if self.groups.contains(pool) {
            return Ok(());
        }
        let created: redis::RedisResult<Value> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(self.stream(pool))
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut self.con);
        match created {
            Ok(_) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(self.err(e)),
        }
        self.groups.insert(pool.to_string());
        Ok(())
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.cfg
    }

    fn err(&self, error: redis::RedisError) -> BrokerError {
        BrokerError::Redis {
            url: redact(&self.cfg.url),
            error,
        }
    }

    fn stream(&self, pool: &str) -> String {
        format!("{}:jobs:{pool}", self.cfg.namespace)
    }

    fn jobs(&self) -> String {
        self.stream(&self.cfg.pool)
    }

    fn stats_key(&self) -> String {
        format!("{}:stats", self.cfg.namespace)
    }

    fn dead(&self) -> String {
        format!("{}:dead", self.cfg.namespace)
    }

    fn result_key(&self, job_id: &str) -> String {
        format!("{}:result:{job_id}", self.cfg.namespace)
    }

    fn query(&mut self, cmd: &redis::Cmd) -> Result<Value> {
        cmd.query(&mut self.con).map_err(|e| self.err(e))
    }

    /// `GET key`.
    fn get(&mut self, key: &str) -> Result<Option<String>> {
        let mut c = redis::cmd("GET");
        c.arg(key);
        Ok(text(&self.query(&c)?))
    }

    /// `SET key value PX ttl`.
    fn set_for(&mut self, key: &str, value: &str, ttl: Duration) -> Result<()> {
        let mut c = redis::cmd("SET");
        c.arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64);
        self.query(&c)?;
        Ok(())
    }

    /// Puts an accepted job on this connection's pool's stream; returns its entry id.
    pub fn submit(&mut self, job_id: &str, request: &str) -> Result<String> {
        let pool = self.cfg.pool.clone();
        self.submit_to(&pool, job_id, request)
    }

    /// Puts an accepted job on `pool`'s stream together with the server's record of it
    /// (`{ns}:job:{id}`, kept `result_ttl`), in one transaction: a server that restarts finds
    /// every job it had put on a stream and not yet collected ([`Broker::records`]).
    pub fn submit_recorded(
        &mut self,
        pool: &str,
        job_id: &str,
        request: &str,
        record: &str,
    ) -> Result<()> {
        self.ensure_group(pool)?;
        let mut p = redis::pipe();
        p.atomic()
            .cmd("SET")
            .arg(self.record_key(job_id))
            .arg(record)
            .arg("PX")
            .arg(self.cfg.result_ttl.as_millis().max(1) as u64)
            .ignore()
            .cmd("XADD")
            .arg(self.stream(pool))
            .arg("*")
            .arg("id")
            .arg(job_id)
            .arg("request")
            .arg(request)
            .ignore();
        p.query::<()>(&mut self.con).map_err(|e| self.err(e))
    }

    fn record_key(&self, job_id: &str) -> String {
        format!("{}:job:{job_id}", self.cfg.namespace)
    }

    /// The server's records of jobs it put on a stream and has not collected: (id, record).
    pub fn records(&mut self) -> Result<Vec<(String, String)>> {
        let prefix = self.record_key("");
        let mut out = Vec::new();
        for key in self.keys(&prefix)? {
            if let Some(r) = self.get(&key)? {
                out.push((key[prefix.len()..].to_string(), r));
            }
        }
        Ok(out)
    }

    /// The job is collected (or given up): its record goes.
    pub fn drop_record(&mut self, job_id: &str) -> Result<()> {
        let mut c = redis::cmd("DEL");
        c.arg(self.record_key(job_id));
        self.query(&c)?;
        Ok(())
    }

    /// Puts an accepted job on `pool`'s stream; returns its entry id.
    pub fn submit_to(&mut self, pool: &str, job_id: &str, request: &str) -> Result<String> {
        self.ensure_group(pool)?;
        let mut c = redis::cmd("XADD");
        c.arg(self.stream(pool))
            .arg("*")
            .arg("id")
            .arg(job_id)
            .arg("request")
            .arg(request);
        added(self.query(&c)?)
    }

    /// The next job for `consumer`: a delivery another worker left unacknowledged past the
    /// visibility timeout, else a new one, waiting up to `block` for one to arrive.
    pub fn claim(&mut self, consumer: &str, block: Duration) -> Result<Option<Delivery>> {
        let mut c = redis::cmd("XAUTOCLAIM");
        c.arg(self.jobs())
            .arg(GROUP)
            .arg(consumer)
            .arg(self.cfg.visibility.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(1);
        let v = self.query(&c)?;
        let stale = match &v {
            Value::Array(parts) if parts.len() >= 2 => entries(&parts[1]),
            _ => Vec::new(),
        };
        let reclaimed = !stale.is_empty();
        let (entry, fields) = match stale.into_iter().next() {
            Some(e) => {
                self.count("reclaimed")?;
                e
            }
            None => {
                let mut c = redis::cmd("XREADGROUP");
                c.arg("GROUP")
                    .arg(GROUP)
                    .arg(consumer)
                    .arg("COUNT")
                    .arg(1)
                    .arg("BLOCK")
                    .arg(block.as_millis().max(1) as u64)
                    .arg("STREAMS")
                    .arg(self.jobs())
                    .arg(">");
                let found = read_entries(self.query(&c)?).into_iter().next();
                match found {
                    Some(e) => e,
                    None => return Ok(None),
                }
            }
        };
        let deliveries = self.deliveries(&entry)?;
        Ok(Some(Delivery {
            job_id: field(&fields, "id").unwrap_or_default(),
            request: field(&fields, "request").unwrap_or_default(),
            entry,
            deliveries,
            reclaimed,
        }))
    }

    /// Keeps a delivery this consumer is still working on from being taken over: resets its
    /// idle time (`XCLAIM … JUSTID`, which does not count a delivery). Only while the
    /// consumer still holds it (a delivery another worker took over is not taken back);
    /// returns whether it does.
    pub fn touch(&mut self, consumer: &str, entry: &str) -> Result<bool> {
        let mut c = redis::cmd("XPENDING");
        c.arg(self.jobs())
            .arg(GROUP)
            .arg(entry)
            .arg(entry)
            .arg(1)
            .arg(consumer);
        if !matches!(self.query(&c)?, Value::Array(rows) if !rows.is_empty()) {
            return Ok(false);
        }
        let mut c = redis::cmd("XCLAIM");
        c.arg(self.jobs())
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(entry)
            .arg("JUSTID");
        self.query(&c)?;
        Ok(true)
    }

    /// The deliveries `consumer` held when it stopped (a worker restarted under its name),
    /// taken back at once rather than after the visibility timeout; each counts as a new
    /// delivery.
    pub fn reclaim_own(&mut self, consumer: &str) -> Result<Vec<Delivery>> {
        let mut c = redis::cmd("XPENDING");
        c.arg(self.jobs())
            .arg(GROUP)
            .arg("-")
            .arg("+")
            .arg(100)
            .arg(consumer);
        let ids: Vec<String> = match self.query(&c)? {
            Value::Array(rows) => rows
                .iter()
                .filter_map(|r| match r {
                    Value::Array(cols) => cols.first().and_then(text),
                    _ => None,
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut out = Vec::new();
        for id in ids {
            let mut c = redis::cmd("XCLAIM");
            c.arg(self.jobs()).arg(GROUP).arg(consumer).arg(0).arg(&id);
            let v = self.query(&c)?;
            for (entry, fields) in entries(&v) {
                self.count("reclaimed")?;
                let deliveries = self.deliveries(&entry)?;
                out.push(Delivery {
                    job_id: field(&fields, "id").unwrap_or_default(),
                    request: field(&fields, "request").unwrap_or_default(),
                    entry,
                    deliveries,
                    reclaimed: true,
                });
            }
        }
        Ok(out)
    }

    /// Adds one to a deployment-wide counter (`reclaimed`, `dead`) for `/metrics`.
    fn count(&mut self, what: &str) -> Result<()> {
        let mut c = redis::cmd("HINCRBY");
        c.arg(self.stats_key()).arg(what).arg(1);
        self.query(&c)?;
        Ok(())
    }

    /// The deployment-wide counters: (`reclaimed`, `dead`).
    pub fn counters(&mut self) -> Result<(u64, u64)> {
        let mut c = redis::cmd("HMGET");
        c.arg(self.stats_key()).arg("reclaimed").arg("dead");
        let v = self.query(&c)?;
        let n = |i: usize| match &v {
            Value::Array(a) => a
                .get(i)
                .and_then(text)
                .and_then(|t| t.parse().ok())
                .unwrap_or(0),
            _ => 0,
        };
        Ok((n(0), n(1)))
    }

    /// `pool`'s backlog: entries no worker has been handed yet, and entries handed out and
    /// not yet acknowledged. (An acknowledged entry is deleted, so the stream's length is the
    /// two together.)
    pub fn backlog(&mut self, pool: &str) -> Result<(u64, u64)> {
        let mut c = redis::cmd("XLEN");
        c.arg(self.stream(pool));
        let len = match self.query(&c)? {
            Value::Int(n) => n.max(0) as u64,
            _ => 0,
        };
        let pending = self.pending_of(pool)?;
        Ok((len.saturating_sub(pending), pending))
    }

    /// How many times `entry` has been delivered (XPENDING's counter).
    fn deliveries(&mut self, entry: &str) -> Result<u64> {
        let mut c = redis::cmd("XPENDING");
        c.arg(self.jobs()).arg(GROUP).arg(entry).arg(entry).arg(1);
        let v = self.query(&c)?;
        let count = match &v {
            Value::Array(rows) => rows.first().and_then(|r| match r {
                Value::Array(cols) if cols.len() == 4 => match &cols[3] {
                    Value::Int(n) => Some(*n as u64),
                    _ => None,
                },
                _ => None,
            }),
            _ => None,
        };
        Ok(count.unwrap_or(1))
    }

    /// Records `result` for the delivery's job unless one is there already, then acknowledges.
    /// Returns whether this call's result is the one kept.
    pub fn complete(&mut self, d: &Delivery, result: &str) -> Result<bool> {
        let kept = self.record(&d.job_id, result)?;
        self.ack(&d.entry)?;
        Ok(kept)
    }

    /// Records `result` for `job_id` unless one is there already (kept `result_ttl`).
    pub fn record(&mut self, job_id: &str, result: &str) -> Result<bool> {
        let mut c = redis::cmd("SET");
        c.arg(self.result_key(job_id))
            .arg(result)
            .arg("NX")
            .arg("PX")
            .arg(self.cfg.result_ttl.as_millis().max(1) as u64);
        Ok(!matches!(self.query(&c)?, Value::Nil))
    }

    /// A failed attempt: after `max_deliveries` the job goes to the dead letters with `error`
    /// and is acknowledged; before, it stays pending for another worker after the visibility
    /// timeout. Returns whether it was dead-lettered.
    pub fn fail(&mut self, d: &Delivery, error: &str) -> Result<bool> {
        if d.deliveries < self.cfg.max_deliveries {
            return Ok(false);
        }
        self.dead_letter(d, error)?;
        Ok(true)
    }

    /// Moves the delivery's job to the dead letters with `error` and acknowledges it.
    pub fn dead_letter(&mut self, d: &Delivery, error: &str) -> Result<()> {
        self.count("dead")?;
        let mut c = redis::cmd("XADD");
        c.arg(self.dead())
            .arg("*")
            .arg("id")
            .arg(&d.job_id)
            .arg("request")
            .arg(&d.request)
            .arg("error")
            .arg(error);
        self.query(&c)?;
        self.ack(&d.entry)
    }

    /// Acknowledges the entry and deletes it: a finished job's request (its uploads with it)
    /// does not stay in Redis.
    fn ack(&mut self, entry: &str) -> Result<()> {
        let mut p = redis::pipe();
        p.atomic()
            .cmd("XACK")
            .arg(self.jobs())
            .arg(GROUP)
            .arg(entry)
            .ignore()
            .cmd("XDEL")
            .arg(self.jobs())
            .arg(entry)
            .ignore();
        p.query::<()>(&mut self.con).map_err(|e| self.err(e))
    }

    /// The result recorded for `job_id`, if any.
    pub fn result(&mut self, job_id: &str) -> Result<Option<String>> {
        self.get(&self.result_key(job_id))
    }

    /// Jobs delivered and not yet acknowledged.
    pub fn pending(&mut self) -> Result<u64> {
        let pool = self.cfg.pool.clone();
        self.pending_of(&pool)
    }

    /// Jobs of `pool` delivered and not yet acknowledged.
    pub fn pending_of(&mut self, pool: &str) -> Result<u64> {
        let mut c = redis::cmd("XPENDING");
        c.arg(self.stream(pool)).arg(GROUP);
        match self.query(&c)? {
            Value::Array(parts) => Ok(match parts.first() {
                Some(Value::Int(n)) => *n as u64,
                _ => 0,
            }),
            v => Err(BrokerError::Reply {
                command: "XPENDING",
                reply: format!("{v:?}"),
            }),
        }
    }

    /// The dead letters, oldest first.
    pub fn dead_letters(&mut self) -> Result<Vec<DeadJob>> {
        let mut c = redis::cmd("XRANGE");
        c.arg(self.dead()).arg("-").arg("+");
        let v = self.query(&c)?;
        Ok(entries(&v)
            .into_iter()
            .map(|(_, f)| DeadJob {
                job_id: field(&f, "id").unwrap_or_default(),
                request: field(&f, "request").unwrap_or_default(),
                error: field(&f, "error").unwrap_or_default(),
            })
            .collect())
    }
}

/// A live worker's advertisement: its name and what it serves (free-form JSON the router
/// reads: the model, its budget, the sizes and modes its planner fits).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerInfo {
    pub name: String,
    pub serves: String,
}

impl Broker {
    fn worker_key(&self, name: &str) -> String {
        format!("{}:worker:{name}", self.cfg.namespace)
    }

    fn events_key(&self, job_id: &str) -> String {
        format!("{}:events:{job_id}", self.cfg.namespace)
    }

    fn cancel_key(&self, job_id: &str) -> String {
        format!("{}:cancel:{job_id}", self.cfg.namespace)
    }

    /// A worker's heartbeat: its advertisement, alive for `ttl` unless renewed (a worker
    /// renews it well within `ttl`; one that dies drops out when it lapses).
    pub fn heartbeat(&mut self, name: &str, serves: &str, ttl: Duration) -> Result<()> {
        self.set_for(&self.worker_key(name), serves, ttl)
    }

    /// Every key that starts with `prefix` (`SCAN … MATCH`), sorted.
    fn keys(&mut self, prefix: &str) -> Result<Vec<String>> {
        let mut names = Vec::new();
        let mut cursor = "0".to_string();
        loop {
            let mut c = redis::cmd("SCAN");
            c.arg(&cursor)
                .arg("MATCH")
                .arg(format!("{prefix}*"))
                .arg("COUNT")
                .arg(100);
            let v = self.query(&c)?;
            let Value::Array(parts) = v else { break };
            cursor = parts.first().and_then(text).unwrap_or_else(|| "0".into());
            if let Some(Value::Array(keys)) = parts.get(1) {
                names.extend(keys.iter().filter_map(text));
            }
            if cursor == "0" {
                break;
            }
        }
        names.sort();
        Ok(names)
    }

    /// Workers whose heartbeat has not lapsed, by name.
    pub fn live_workers(&mut self) -> Result<Vec<WorkerInfo>> {
        let prefix = self.worker_key("");
        let names = self.keys(&prefix)?;
        let mut out = Vec::new();
        for key in names {
            // A heartbeat that lapsed between the scan and the read is not live.
            if let Some(serves) = self.get(&key)? {
                out.push(WorkerInfo {
                    name: key[prefix.len()..].to_string(),
                    serves,
                });
            }
        }
        Ok(out)
    }

    /// Appends a progress event to the job's event stream (kept to its last `keep` events).
    pub fn publish_event(&mut self, job_id: &str, event: &str, keep: usize) -> Result<String> {
        let mut c = redis::cmd("XADD");
        c.arg(self.events_key(job_id))
            .arg("MAXLEN")
            .arg("~")
            .arg(keep.max(1))
            .arg("*")
            .arg("event")
            .arg(event);
        added(self.query(&c)?)
    }

    /// A job's events after `after` (`"0"` for all), waiting up to `block` for the first:
    /// (event id, event) pairs in order.
    pub fn events(
        &mut self,
        job_id: &str,
        after: &str,
        block: Duration,
    ) -> Result<Vec<(String, String)>> {
        let mut c = redis::cmd("XREAD");
        c.arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS")
            .arg(self.events_key(job_id))
            .arg(after);
        Ok(read_entries(self.query(&c)?)
            .into_iter()
            .map(|(id, f)| (id, field(&f, "event").unwrap_or_default()))
            .collect())
    }

    /// The events of several jobs after the last id seen of each (`"0"` for all), waiting up
    /// to `block` for the first: (job id, event id, event) in order per job.
    pub fn events_of(
        &mut self,
        after: &[(String, String)],
        block: Duration,
    ) -> Result<Vec<(String, String, String)>> {
        if after.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = redis::cmd("XREAD");
        c.arg("BLOCK")
            .arg(block.as_millis().max(1) as u64)
            .arg("STREAMS");
        for (job, _) in after {
            c.arg(self.events_key(job));
        }
        for (_, id) in after {
            c.arg(id);
        }
        let prefix = self.events_key("");
        let mut out = Vec::new();
        for s in &streams(self.query(&c)?) {
            let Value::Array(pair) = s else { continue };
            let (Some(key), Some(list)) = (pair.first().and_then(text), pair.get(1)) else {
                continue;
            };
            let job = key.strip_prefix(&prefix).unwrap_or(&key).to_string();
            for (id, f) in entries(list) {
                out.push((job.clone(), id, field(&f, "event").unwrap_or_default()));
            }
        }
        Ok(out)
    }

    /// Lets a finished job's event stream lapse after `ttl` (a late reader still finds it).
    pub fn expire_events(&mut self, job_id: &str, ttl: Duration) -> Result<()> {
        let mut c = redis::cmd("PEXPIRE");
        c.arg(self.events_key(job_id))
            .arg(ttl.as_millis().max(1) as u64);
        self.query(&c)?;
        Ok(())
    }

    /// A worker's heartbeat removed: it stopped cleanly and serves no more.
    pub fn retire(&mut self, name: &str) -> Result<()> {
        let mut c = redis::cmd("DEL");
        c.arg(self.worker_key(name));
        self.query(&c)?;
        Ok(())
    }

    /// Asks whichever worker runs `job_id` to stop (it checks between steps); the request
    /// lapses after `ttl`.
    pub fn cancel(&mut self, job_id: &str, why: &str, ttl: Duration) -> Result<()> {
        self.set_for(&self.cancel_key(job_id), why, ttl)
    }

    /// Why `job_id` was cancelled, if it was.
    pub fn cancelled(&mut self, job_id: &str) -> Result<Option<String>> {
        self.get(&self.cancel_key(job_id))
    }
}

/// A broker URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_hidden_in_messages() {
        assert_eq!(
            redact("redis://user:secret@host:6379/0"),
            "redis://user:***@host:6379/0"
        );
        assert_eq!(redact("redis://host:6379"), "redis://host:6379");
        assert_eq!(redact("rediss://:pw@h"), "rediss://:***@h");
    }
}
