//! A Hugging Face Hub repository (`--model org/name`), turned into a local snapshot folder.
//!
//! Files go to the standard HF cache (`models--org--name/` with `blobs/`, `snapshots/<commit>/`
//! and `refs/<revision>`), the layout Python's `huggingface_hub` uses, so a model downloaded by
//! either tool is found by both and stored once. Only what fluxfit reads is fetched: the official
//! FLUX.1 repos hold their weights twice (BFL single files, and diffusers `transformer/` + `vae/`,
//! ~24 GB more).
//!
//! Offline (`HF_HUB_OFFLINE=1`, or when the Hub cannot be reached) the cached snapshot is used if
//! it holds everything wanted; otherwise the error names exactly what is missing and where it
//! goes, because "file not found" deep inside model loading is no help to someone offline.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{anyhow, bail, Context, Result};
use hf_hub::progress::{DownloadEvent, ProgressEvent, ProgressHandler};
use hf_hub::repository::RepoTreeEntry;
use hf_hub::{HFClient, HFError};
use indicatif::{HumanBytes, ProgressBar, ProgressStyle};

const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
const DEFAULT_REVISION: &str = "main";

/// What to fetch from a repo: exact files and folder prefixes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// Repo-relative paths of single files (`ae.safetensors`, `tokenizer_2/tokenizer.json`).
    pub files: Vec<String>,
    /// Folders taken whole (`text_encoder`), without the trailing `/`.
    pub folders: Vec<String>,
}

impl Wanted {
    /// A FLUX.1 repo as fluxfit reads it: the BFL flow and AE files, and the diffusers text
    /// encoders and tokenizers (which have no BFL single-file form). The files named inside the
    /// folders are the ones the loaders cannot do without, so an offline check names them.
    pub fn flux(flow_file: &str) -> Self {
        Self {
            files: [
                flow_file,
                "ae.safetensors",
                "model_index.json",
                "text_encoder/config.json",
                "text_encoder_2/config.json",
                "tokenizer_2/tokenizer.json",
            ]
            .map(String::from)
            .to_vec(),
            folders: ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// FLUX.1-Redux-dev as fluxfit reads it: the BFL projector and the diffusers-format SigLIP
    /// vision tower with its configs (`image_embedder/` repeats the projector; not fetched).
    pub fn redux() -> Self {
        Self {
            files: [
                "flux1-redux-dev.safetensors",
                "image_encoder/config.json",
                "image_encoder/model.safetensors",
                "feature_extractor/preprocessor_config.json",
            ]
            .map(String::from)
            .to_vec(),
            folders: Vec::new(),
        }
    }

    fn folder_of<'a>(&'a self, path: &str) -> Option<&'a str> {
        self.folders
            .iter()
            .map(|f| f.trim_end_matches('/'))
            .find(|f| {
                path.strip_prefix(f)
                    .is_some_and(|rest| rest.starts_with('/'))
            })
    }

    /// Whether a repo file is to be fetched. Inside folders, weights in formats fluxfit does not
    /// read (`pytorch_model.bin`, flax, ...) are left out: some repos ship them beside safetensors.
    fn wants(&self, path: &str) -> bool {
        self.files.iter().any(|f| f == path)
            || (self.folder_of(path).is_some() && !is_other_weight_format(path))
    }

    /// `huggingface-cli download --include` patterns for everything wanted.
    fn patterns(&self) -> Vec<String> {
        let in_folder = |f: &String| self.folder_of(f).is_some();
        self.files
            .iter()
            .filter(|f| !in_folder(f))
            .cloned()
            .chain(
                self.folders
                    .iter()
                    .map(|f| format!("{}/*", f.trim_end_matches('/'))),
            )
            .collect()
    }
}

fn is_other_weight_format(path: &str) -> bool {
    const EXTS: &[&str] = &[
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".onnx",
        ".onnx_data",
        ".ot",
        ".gguf",
        ".bin.index.json",
        ".msgpack.index.json",
    ];
    EXTS.iter().any(|e| path.ends_with(e))
}

/// Returns the snapshot folder in the standard HF cache (HF_HOME / HF_HUB_CACHE honoured, default
/// ~/.cache/huggingface/hub), downloading what is missing with a progress bar unless offline.
pub fn snapshot(repo_id: &str, revision: Option<&str>, wanted: &Wanted) -> Result<PathBuf> {
    let settings = Settings::from_env(|k| std::env::var(k).ok());
    snapshot_with(&settings, repo_id, revision, wanted)
}

/// What the environment says; read once so that tests can supply their own (env vars are
/// process-global, and tests run in parallel).
#[derive(Debug, Clone)]
struct Settings {
    cache_dir: PathBuf,
    offline: bool,
    endpoint: String,
    token: Option<String>,
    /// Retries after a failed request; `None`: hf-hub's default.
    retries: Option<usize>,
}

impl Settings {
    /// The variables and defaults of Python's `huggingface_hub`, so both use the same cache.
    fn from_env(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."));
        let expand = |v: String| match v.strip_prefix("~/") {
            Some(rest) => home.join(rest),
            None if v == "~" => home.clone(),
            None => PathBuf::from(v),
        };
        let hf_home = var("HF_HOME").map(expand).unwrap_or_else(|| {
            var("XDG_CACHE_HOME")
                .map(expand)
                .unwrap_or_else(|| home.join(".cache"))
                .join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(expand)
            .unwrap_or_else(|| hf_home.join("hub"));
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });
        let endpoint = var("HF_ENDPOINT")
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        let token = if var("HF_HUB_DISABLE_IMPLICIT_TOKEN").is_some() {
            None
        } else {
            var("HF_TOKEN").or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                std::fs::read_to_string(path)
                    .ok()
                    .map(|t| t.trim().to_string())
                    .filter(|t| !t.is_empty())
            })
        };
        Self {
            cache_dir,
            offline,
            endpoint,
            token,
            retries: None,
        }
    }
}

fn snapshot_with(
    s: &Settings,
    repo_id: &str,
    revision: Option<&str>,
    wanted: &Wanted,
) -> Result<PathBuf> {
    check_repo_id(repo_id)?;
    if let Some(rev) = revision {
        check_revision(rev)?;
    }
    if s.offline {
        let why = "fluxfit is offline (HF_HUB_OFFLINE is set), so it cannot download anything";
        let fix = "unset HF_HUB_OFFLINE and rerun: fluxfit downloads just what is missing";
        return cached_snapshot(&s.cache_dir, repo_id, revision, wanted, why, fix);
    }
    match fetch(s, repo_id, revision.unwrap_or(DEFAULT_REVISION), wanted) {
        Ok(dir) => Ok(dir),
        Err(Failure::Fatal(e)) => Err(e),
        Err(Failure::Network(e)) => {
            let why = format!("the Hub could not be reached ({e:#})");
            let fix = "rerun once the network is back: fluxfit downloads just what is missing";
            let dir = cached_snapshot(&s.cache_dir, repo_id, revision, wanted, &why, fix)?;
            eprintln!(
                "warning: {why}; using the cached snapshot {}",
                dir.display()
            );
            Ok(dir)
        }
        // A complete cached snapshot needs no access; without one, access is the problem to fix.
        Err(Failure::Auth(e)) => {
            match cached_snapshot(&s.cache_dir, repo_id, revision, wanted, "", "") {
                Ok(dir) => {
                    eprintln!(
                        "warning: {e:#}\nusing the cached snapshot {}",
                        dir.display()
                    );
                    Ok(dir)
                }
                Err(_) => Err(e),
            }
        }
    }
}

/// Repo ids become folder names: refuse anything that could step outside the cache.
fn check_repo_id(repo_id: &str) -> Result<()> {
    let ok_part = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    };
    match repo_id.split_once('/') {
        Some((owner, name)) if ok_part(owner) && ok_part(name) && !name.contains("..") => Ok(()),
        _ => bail!(
            "`{repo_id}` is not a Hugging Face repo id: expected `owner/name` (letters, digits, \
             `-`, `_`, `.`), e.g. black-forest-labs/FLUX.1-schnell"
        ),
    }
}

/// Revisions become `refs/<revision>` files.
fn check_revision(rev: &str) -> Result<()> {
    if rev.is_empty()
        || rev.starts_with('/')
        || rev.contains('\\')
        || rev
            .split('/')
            .any(|p| p.is_empty() || p == "." || p == "..")
    {
        bail!("`{rev}` is not a usable revision (a branch, tag or commit hash)");
    }
    Ok(())
}

fn is_commit_hash(rev: &str) -> bool {
    rev.len() == 40 && rev.chars().all(|c| c.is_ascii_hexdigit())
}

fn repo_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(format!("models--{}", repo_id.replace('/', "--")))
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn cli_command(repo_id: &str, revision: Option<&str>, patterns: &[String]) -> String {
    let rev = revision
        .map(|r| format!(" --revision {}", shell_quote(r)))
        .unwrap_or_default();
    let pats: Vec<String> = patterns.iter().map(|p| shell_quote(p)).collect();
    format!(
        "huggingface-cli download {repo_id}{rev} --include {}",
        pats.join(" ")
    )
}

// ---------------------------------------------------------------------------------------------
// Offline: the cached snapshot, checked for completeness.

/// The cached snapshot of `repo_id` at `revision` if it holds everything wanted. `why` says why
/// it cannot be downloaded and `fix` how to get online; both go into the error.
fn cached_snapshot(
    cache_dir: &Path,
    repo_id: &str,
    revision: Option<&str>,
    wanted: &Wanted,
    why: &str,
    fix: &str,
) -> Result<PathBuf> {
    let repo = repo_dir(cache_dir, repo_id);
    let command = cli_command(repo_id, revision, &wanted.patterns());
    let not_cached = |detail: String| {
        anyhow!(
            "{repo_id} is not in the Hugging Face cache ({detail}), and {why}.\n\
             To fix it, do one of:\n  \
             - {fix};\n  \
             - download it with: {command}\n  \
             - or pass --model a local folder that holds the model."
        )
    };
    if !repo.is_dir() {
        return Err(not_cached(format!("no {}", repo.display())));
    }
    let snap = find_snapshot(&repo, revision).map_err(not_cached)?;
    let missing = missing_in(&snap, wanted);
    if missing.is_empty() {
        return Ok(snap);
    }
    let list: Vec<String> = missing
        .iter()
        .map(|m| match &m.note {
            Some(note) => format!("  - {} ({note})", m.path),
            None => format!("  - {}", m.path),
        })
        .collect();
    let patterns: Vec<String> = missing.iter().map(|m| m.pattern.clone()).collect();
    bail!(
        "{repo_id}: the cached snapshot is incomplete, and {why}.\n\
         Missing from {}:\n{}\n\
         To fix it, do one of:\n  \
         - {fix};\n  \
         - download them with: {}\n  \
         - or copy them to those paths under {}",
        snap.display(),
        list.join("\n"),
        cli_command(repo_id, revision, &patterns),
        snap.display()
    )
}

/// `refs/<revision>` → `snapshots/<commit>`; with no revision asked for and no usable ref (a
/// snapshot copied in by hand, say), the newest snapshot. Err: what the cache holds instead.
fn find_snapshot(repo: &Path, revision: Option<&str>) -> std::result::Result<PathBuf, String> {
    let snapshots = repo.join("snapshots");
    let rev = revision.unwrap_or(DEFAULT_REVISION);
    let commit = if is_commit_hash(rev) {
        Some(rev.to_string())
    } else {
        std::fs::read_to_string(repo.join("refs").join(rev))
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
    };
    if let Some(commit) = &commit {
        let dir = snapshots.join(commit);
        if dir.is_dir() {
            return Ok(dir);
        }
    }
    let mut all: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .map(|p| {
                    let t = p
                        .metadata()
                        .and_then(|m| m.modified())
                        .unwrap_or(std::time::UNIX_EPOCH);
                    (t, p)
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    let names: Vec<String> = all
        .iter()
        .filter_map(|(_, p)| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    match (revision, all.pop()) {
        (None, Some((_, newest))) => Ok(newest),
        (None, None) => Err(format!("{} holds no snapshot", repo.display())),
        (Some(rev), _) => Err(format!(
            "no snapshot for revision `{rev}` in {}{}",
            repo.display(),
            if names.is_empty() {
                String::new()
            } else {
                format!("; it holds {}", names.join(", "))
            }
        )),
    }
}

/// One thing a cached snapshot lacks, as shown to the user.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Missing {
    /// Relative to the snapshot; a folder ends in `/`, a kind of file is a `*` pattern.
    path: String,
    /// What it is or what is wrong, where the path alone does not say.
    note: Option<String>,
    /// A `huggingface-cli download --include` pattern that fetches it.
    pattern: String,
}

impl Missing {
    fn new(path: impl Into<String>, note: Option<String>) -> Self {
        let path = path.into();
        Self {
            pattern: path.clone(),
            path,
            note,
        }
    }
}

/// What `snap` lacks of `wanted`. A folder counts as complete when it has its config/tokenizer
/// files, every shard its `*.safetensors.index.json` names, weights if it has a `config.json`,
/// the vocabulary if it is a tokenizer, and no link to a blob that is gone (the cache's files are
/// symlinks into `blobs/`, so a deleted or interrupted blob leaves a dangling link).
fn missing_in(snap: &Path, wanted: &Wanted) -> Vec<Missing> {
    let mut out: Vec<Missing> = Vec::new();
    let absent_folders: BTreeSet<&str> = wanted
        .folders
        .iter()
        .map(|f| f.trim_end_matches('/'))
        .filter(|f| !snap.join(f).is_dir())
        .collect();
    for file in &wanted.files {
        if wanted
            .folder_of(file)
            .is_some_and(|f| absent_folders.contains(f))
        {
            continue; // the folder's own entry covers it
        }
        let path = snap.join(file);
        if !path.is_file() {
            out.push(Missing::new(file.clone(), dangling_note(&path)));
        }
    }
    for folder in &wanted.folders {
        for m in missing_in_folder(snap, folder.trim_end_matches('/')) {
            if !out.iter().any(|o| o.path == m.path) {
                out.push(m);
            }
        }
    }
    out
}

fn dangling_note(path: &Path) -> Option<String> {
    (path.symlink_metadata().is_ok() && path.metadata().is_err())
        .then(|| "a link to a blob that is gone".to_string())
}

fn missing_in_folder(snap: &Path, folder: &str) -> Vec<Missing> {
    let dir = snap.join(folder);
    if !dir.is_dir() {
        return vec![Missing {
            path: format!("{folder}/"),
            note: Some("the whole folder".into()),
            pattern: format!("{folder}/*"),
        }];
    }
    let mut out = Vec::new();
    let mut present = BTreeSet::new();
    walk(&dir, "", &mut present, &mut |rel| {
        out.push(Missing::new(
            format!("{folder}/{rel}"),
            Some("a link to a blob that is gone".into()),
        ))
    });
    let has = |name: &str| present.contains(name);
    let any_ends = |suffix: &str| present.iter().any(|p| p.ends_with(suffix));
    let kind = |pattern: &str, note: &str| Missing {
        path: format!("{folder}/{pattern}"),
        note: Some(note.to_string()),
        pattern: format!("{folder}/{pattern}"),
    };

    if !any_ends(".json") {
        out.push(kind("*.json", "its config/tokenizer files"));
    }
    for index in present
        .iter()
        .filter(|p| p.ends_with(".safetensors.index.json"))
    {
        match shards_of(&dir.join(index)) {
            Ok(shards) => {
                for shard in shards {
                    if !dir.join(&shard).is_file() {
                        out.push(Missing::new(
                            format!("{folder}/{shard}"),
                            Some(format!("a shard named in {folder}/{index}")),
                        ));
                    }
                }
            }
            Err(e) => out.push(Missing::new(
                format!("{folder}/{index}"),
                Some(format!("unreadable: {e:#}")),
            )),
        }
    }
    if has("config.json") && !any_ends(".safetensors") {
        out.push(kind("*.safetensors", "the weights; config.json is there"));
    }
    if has("vocab.json") && !has("merges.txt") && !has("tokenizer.json") {
        out.push(Missing::new(
            format!("{folder}/merges.txt"),
            Some("the BPE merges that go with vocab.json".into()),
        ));
    }
    if has("tokenizer_config.json")
        && !["tokenizer.json", "vocab.json", "vocab.txt", "spiece.model"]
            .iter()
            .any(|n| has(n))
    {
        out.push(Missing {
            path: format!("{folder}/tokenizer.json"),
            note: Some("the vocabulary; only tokenizer_config.json is there".into()),
            pattern: format!("{folder}/*"),
        });
    }
    let mut seen = BTreeSet::new();
    out.retain(|m| seen.insert(m.path.clone()));
    out
}

/// Readable files under `dir` (relative, `/`-separated) into `present`; dangling links to `broken`.
fn walk(dir: &Path, prefix: &str, present: &mut BTreeSet<String>, broken: &mut dyn FnMut(&str)) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = format!("{prefix}{name}");
        let path = entry.path();
        match path.metadata() {
            Ok(m) if m.is_dir() => walk(&path, &format!("{rel}/"), present, broken),
            Ok(_) => {
                present.insert(rel);
            }
            Err(_) => broken(&rel),
        }
    }
}

/// The shard file names a `*.safetensors.index.json` maps its tensors to.
fn shards_of(index: &Path) -> Result<BTreeSet<String>> {
    let text = std::fs::read_to_string(index)?;
    let json: serde_json::Value = serde_json::from_str(&text).context("not valid JSON")?;
    let map = json["weight_map"]
        .as_object()
        .context("no `weight_map` object")?;
    Ok(map
        .values()
        .filter_map(|v| v.as_str().map(String::from))
        .collect())
}

// ---------------------------------------------------------------------------------------------
// Online: list, select, download what the snapshot lacks.

/// Why a download failed, which decides whether the cache may stand in.
enum Failure {
    /// The Hub could not be reached (or failed on its side): use the cache if it is complete.
    Network(anyhow::Error),
    /// 401/403: a complete cache needs no access; otherwise the message says how to get it.
    Auth(anyhow::Error),
    /// Anything else (no such repo, revision or file; disk errors): report it.
    Fatal(anyhow::Error),
}

fn fetch(s: &Settings, repo_id: &str, revision: &str, wanted: &Wanted) -> Result<PathBuf, Failure> {
    let fatal = |e: anyhow::Error| Failure::Fatal(e);
    let hub = |what: String| move |e: HFError| classify(s, repo_id, e, what);

    let mut builder = HFClient::builder()
        .endpoint(s.endpoint.clone())
        .cache_dir(s.cache_dir.clone());
    if let Some(token) = &s.token {
        builder = builder.token(token.clone());
    }
    if let Some(n) = s.retries {
        builder = builder.retry_max_attempts(n);
    }
    let client = builder
        .build_sync()
        .map_err(|e| fatal(anyhow!(e).context("creating the Hugging Face Hub client")))?;
    let (owner, name) = hf_hub::split_id(repo_id);
    let repo = client.model(owner, name);

    let info = repo
        .info()
        .revision(revision)
        .send()
        .map_err(hub(format!("looking up {repo_id} (revision {revision})")))?;
    let commit = info
        .sha
        .clone()
        .filter(|c| is_commit_hash(c))
        .ok_or_else(|| {
            fatal(anyhow!(
                "the Hub gave no commit hash for {repo_id} at revision {revision}"
            ))
        })?;
    let entries = repo
        .list_tree()
        .revision(commit.clone())
        .recursive(true)
        .send()
        .map_err(hub(format!("listing the files of {repo_id}")))?;
    let listed: Vec<(String, u64)> = entries
        .into_iter()
        .filter_map(|e| match e {
            RepoTreeEntry::File { path, size, .. } => Some((path, size)),
            _ => None,
        })
        .collect();
    let selected = select(&listed, wanted)
        .map_err(|e| fatal(e.context(format!("{repo_id} at revision {revision}"))))?;

    let repo_folder = repo_dir(&s.cache_dir, repo_id);
    let snap = repo_folder.join("snapshots").join(&commit);
    // Written first, as Python does, so an interrupted download is still found offline.
    if !is_commit_hash(revision) {
        write_ref(&repo_folder, revision, &commit).map_err(fatal)?;
    }
    let todo: Vec<&(String, u64)> = selected
        .iter()
        .filter(|(path, _)| !snap.join(path).is_file())
        .collect();
    if todo.is_empty() {
        return Ok(snap);
    }
    let gated = info
        .gated
        .as_ref()
        .is_some_and(|g| !matches!(g, serde_json::Value::Bool(false) | serde_json::Value::Null));
    if gated && s.token.is_none() {
        return Err(Failure::Auth(anyhow!(access_message(
            s,
            repo_id,
            true,
            "it is gated and no token is set"
        ))));
    }

    let total: u64 = todo.iter().map(|(_, size)| size).sum();
    eprintln!(
        "Downloading {} file{} ({}) of {repo_id} into {}",
        todo.len(),
        if todo.len() == 1 { "" } else { "s" },
        HumanBytes(total),
        snap.display()
    );
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:32!} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    let mut base = 0;
    for (path, size) in todo {
        bar.set_message(path.clone());
        let progress = FileProgress {
            bar: bar.clone(),
            base,
            size: *size,
            file: path.clone(),
            done: AtomicU64::new(0),
        };
        let got = repo
            .download_file()
            .filename(path.clone())
            .revision(commit.clone())
            .progress(progress)
            .send()
            .map_err(|e| {
                bar.abandon();
                hub(format!("downloading {path} from {repo_id}"))(e)
            })?;
        let len = std::fs::metadata(&got).map(|m| m.len()).unwrap_or(0);
        if len != *size {
            bar.abandon();
            return Err(fatal(anyhow!(
                "downloaded {path} from {repo_id} is {len} bytes, the Hub lists {size}: \
                 delete {} and rerun",
                got.display()
            )));
        }
        if !snap.join(path).is_file() {
            bar.abandon();
            return Err(fatal(anyhow!(
                "{path} landed at {}, not in the snapshot {} (the Hub served another commit?)",
                got.display(),
                snap.display()
            )));
        }
        base += size;
        bar.set_position(base);
    }
    bar.finish_and_clear();
    eprintln!("Downloaded {} of {repo_id}", HumanBytes(total));
    Ok(snap)
}

/// The wanted files among the repo's, or which wanted ones the repo lacks.
fn select(listed: &[(String, u64)], wanted: &Wanted) -> Result<Vec<(String, u64)>> {
    let selected: Vec<(String, u64)> = listed
        .iter()
        .filter(|(path, _)| wanted.wants(path))
        .cloned()
        .collect();
    let has = |p: &str| selected.iter().any(|(s, _)| s == p);
    let mut lacking: Vec<String> = wanted.files.iter().filter(|f| !has(f)).cloned().collect();
    lacking.extend(
        wanted
            .folders
            .iter()
            .map(|f| f.trim_end_matches('/'))
            .filter(|f| {
                !selected
                    .iter()
                    .any(|(s, _)| wanted.folder_of(s) == Some(*f))
            })
            .map(|f| format!("{f}/")),
    );
    if !lacking.is_empty() {
        bail!(
            "the repo lacks what fluxfit needs: {} (is it a FLUX.1 repo in the official layout, \
             with BFL files and diffusers text encoders? if not, download it yourself and pass \
             --model the folder, or --flow/--vae/--t5/--clip)",
            lacking.join(", ")
        );
    }
    Ok(selected)
}

fn write_ref(repo_folder: &Path, revision: &str, commit: &str) -> Result<()> {
    let path = repo_folder.join("refs").join(revision);
    let write = || -> std::io::Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, commit)
    };
    write().with_context(|| format!("writing {}", path.display()))
}

/// Sorts an hf-hub error into a [`Failure`], with the message a user can act on.
fn classify(s: &Settings, repo_id: &str, e: HFError, what: String) -> Failure {
    let refused = |status: u16, code: Option<&str>, server: Option<&str>| {
        let gated = code == Some("GatedRepo");
        let detail = match server {
            Some(m) if !m.trim().is_empty() => {
                format!(
                    "the Hub answered {status}: {}",
                    m.trim().trim_end_matches('.')
                )
            }
            _ => format!("the Hub answered {status}"),
        };
        if code == Some("RepoNotFound") {
            return Failure::Fatal(anyhow!(
                "{what}: {detail}. No such repo, or it is private: check the id, and for a \
                 private repo set HF_TOKEN to a token of an account that can read it"
            ));
        }
        Failure::Auth(anyhow!(access_message(s, repo_id, gated, &detail)).context(what.clone()))
    };
    match &e {
        HFError::AuthRequired { context } | HFError::Forbidden { context } => refused(
            context.status.as_u16(),
            context.error_code.as_deref(),
            context.server_message.as_deref(),
        ),
        HFError::Http { context } if matches!(context.status.as_u16(), 401 | 403) => refused(
            context.status.as_u16(),
            context.error_code.as_deref(),
            context.server_message.as_deref(),
        ),
        HFError::Http { context } if context.status.is_server_error() => {
            Failure::Network(anyhow!("{what}: {e}"))
        }
        // reqwest's chain repeats the URL at each level; the innermost cause is the news.
        HFError::Request { .. } | HFError::RateLimited { .. } | HFError::Xet { .. } => {
            let root = anyhow!(e);
            Failure::Network(anyhow!("{what} at {}: {}", s.endpoint, root.root_cause()))
        }
        HFError::RepoNotFound { .. } => Failure::Fatal(anyhow!(
            "{what}: no repo {repo_id} on {} (check the id; a private repo needs HF_TOKEN)",
            s.endpoint
        )),
        // The revision endpoint's 404 also stands for a repo that does not exist.
        HFError::RevisionNotFound {
            context: Some(context),
            ..
        } if context.error_code.as_deref() == Some("RepoNotFound") => Failure::Fatal(anyhow!(
            "{what}: no repo {repo_id} on {} (check the id; a private repo needs HF_TOKEN)",
            s.endpoint
        )),
        HFError::RevisionNotFound { revision, .. } => Failure::Fatal(anyhow!(
            "{what}: {repo_id} has no revision `{revision}` (a branch, tag or commit hash)"
        )),
        _ => Failure::Fatal(anyhow!(e).context(what)),
    }
}

/// How to get access to a gated (FLUX.1-dev) or private repo.
fn access_message(s: &Settings, repo_id: &str, gated: bool, detail: &str) -> String {
    let page = format!("{}/{repo_id}", s.endpoint);
    let token_state = if s.token.is_some() {
        "A token is set (HF_TOKEN or the token file) but it was refused: check it is valid, and \
         that the license was accepted by the account it belongs to."
    } else {
        "No token is set."
    };
    let kind = if gated {
        "is gated"
    } else {
        "refused access (a gated or private repo)"
    };
    format!(
        "{repo_id} {kind}: {detail}.\n\
         To download it:\n  \
         1. log in at {endpoint} and accept the license on {page}\n  \
         2. create a read token at {endpoint}/settings/tokens and set HF_TOKEN=<token> \
         (or run `huggingface-cli login`)\n\
         {token_state}",
        endpoint = s.endpoint,
    )
}

/// Feeds one file's download progress into the overall bytes bar.
struct FileProgress {
    bar: ProgressBar,
    /// Bytes of the files before this one.
    base: u64,
    size: u64,
    file: String,
    done: AtomicU64,
}

impl ProgressHandler for FileProgress {
    fn on_progress(&self, event: &ProgressEvent) {
        // Plain downloads report per-file deltas, xet ones aggregate bytes; either is this file.
        let bytes = match event {
            ProgressEvent::Download(DownloadEvent::Progress { files }) => files
                .iter()
                .filter(|f| f.filename == self.file)
                .map(|f| f.bytes_completed)
                .max(),
            ProgressEvent::Download(DownloadEvent::AggregateProgress {
                bytes_completed, ..
            }) => Some(*bytes_completed),
            _ => None,
        };
        if let Some(bytes) = bytes.map(|b| b.min(self.size)) {
            let before = self.done.fetch_max(bytes, Ordering::Relaxed);
            self.bar.set_position(self.base + before.max(bytes));
        }
    }
}

#[cfg(test)]
mod tests {
    //! Offline only: a fake HF cache in a temp dir, and a fake Hub on 127.0.0.1 for the
    //! download path. Settings are passed explicitly, never through env vars, so tests can run
    //! in parallel.

    use super::*;
    use std::collections::HashMap;
    use std::io::{BufRead, BufReader, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};

    const REPO: &str = "org/flux";
    const SHA: &str = "0123456789abcdef0123456789abcdef01234567";
    const FLOW: &str = "flux1-schnell.safetensors";

    /// A FLUX.1 repo in the official layout, with the extras fluxfit must not fetch.
    fn repo_files() -> Vec<(String, Vec<u8>)> {
        let index = r#"{"metadata": {"total_size": 8}, "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors"}}"#;
        [
            (FLOW, "flow".as_bytes()),
            ("ae.safetensors", b"ae"),
            ("model_index.json", b"{}"),
            ("README.md", b"# readme"),
            (".gitattributes", b"*.safetensors filter=lfs"),
            ("text_encoder/config.json", b"{}"),
            ("text_encoder/model.safetensors", b"clip"),
            ("text_encoder/pytorch_model.bin", b"pickle"),
            ("text_encoder_2/config.json", b"{}"),
            (
                "text_encoder_2/model.safetensors.index.json",
                index.as_bytes(),
            ),
            ("text_encoder_2/model-00001-of-00002.safetensors", b"t5a"),
            ("text_encoder_2/model-00002-of-00002.safetensors", b"t5b"),
            ("tokenizer/vocab.json", b"{}"),
            ("tokenizer/merges.txt", b"#version"),
            ("tokenizer/tokenizer_config.json", b"{}"),
            ("tokenizer/special_tokens_map.json", b"{}"),
            ("tokenizer_2/tokenizer.json", b"{}"),
            ("tokenizer_2/spiece.model", b"spm"),
            ("tokenizer_2/tokenizer_config.json", b"{}"),
            ("tokenizer_2/special_tokens_map.json", b"{}"),
            ("transformer/config.json", b"{}"),
            (
                "transformer/diffusion_pytorch_model.safetensors",
                b"dup flow",
            ),
            ("vae/config.json", b"{}"),
            ("vae/diffusion_pytorch_model.safetensors", b"dup ae"),
        ]
        .into_iter()
        .map(|(p, c)| (p.to_string(), c.to_vec()))
        .collect()
    }

    /// The files fluxfit reads, i.e. what a complete snapshot holds.
    fn wanted_files() -> Vec<(String, Vec<u8>)> {
        let wanted = Wanted::flux(FLOW);
        repo_files()
            .into_iter()
            .filter(|(p, _)| wanted.wants(p))
            .collect()
    }

    /// Writes `files` into a cache the way huggingface_hub does: blobs, links, refs/main.
    fn fake_cache(cache: &Path, files: &[(String, Vec<u8>)]) -> PathBuf {
        let repo = repo_dir(cache, REPO);
        let snap = repo.join("snapshots").join(SHA);
        for (i, (rel, content)) in files.iter().enumerate() {
            let path = snap.join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let blob = repo.join("blobs").join(format!("blob{i}"));
            std::fs::create_dir_all(blob.parent().unwrap()).unwrap();
            std::fs::write(&blob, content).unwrap();
            link(&blob, &path);
        }
        write_ref(&repo, "main", SHA).unwrap();
        snap
    }

    #[cfg(unix)]
    fn link(blob: &Path, path: &Path) {
        std::os::unix::fs::symlink(blob, path).unwrap();
    }

    #[cfg(not(unix))]
    fn link(blob: &Path, path: &Path) {
        std::fs::copy(blob, path).unwrap();
    }

    fn offline(cache: &Path, wanted: &Wanted) -> Result<PathBuf> {
        cached_snapshot(cache, REPO, None, wanted, "WHY", "FIX")
    }

    #[test]
    fn flux_selection_skips_duplicates_and_other_formats() {
        let got: Vec<String> = wanted_files().into_iter().map(|(p, _)| p).collect();
        for p in &got {
            assert!(
                !p.starts_with("transformer/") && !p.starts_with("vae/"),
                "{p}"
            );
            assert!(!p.ends_with(".bin") && p != "README.md", "{p}");
        }
        assert_eq!(got.len(), 17, "{got:?}");
        // A folder name is not a prefix of its neighbours' names.
        let w = Wanted {
            files: vec![],
            folders: vec!["text_encoder".into()],
        };
        assert!(w.wants("text_encoder/config.json"));
        assert!(!w.wants("text_encoder_2/config.json"));
        assert!(!w.wants("text_encoder"));
    }

    #[test]
    fn redux_selection_takes_the_projector_and_the_tower_only() {
        let listed: Vec<(String, u64)> = [
            "flux1-redux-dev.safetensors",
            "image_embedder/config.json",
            "image_embedder/diffusion_pytorch_model.safetensors",
            "image_encoder/config.json",
            "image_encoder/model.safetensors",
            "feature_extractor/preprocessor_config.json",
            "model_index.json",
            "README.md",
        ]
        .iter()
        .map(|p| (p.to_string(), 1))
        .collect();
        let got: Vec<String> = select(&listed, &Wanted::redux())
            .unwrap()
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        assert_eq!(
            got,
            [
                "flux1-redux-dev.safetensors",
                "image_encoder/config.json",
                "image_encoder/model.safetensors",
                "feature_extractor/preprocessor_config.json"
            ]
        );
    }

    #[test]
    fn select_names_what_the_repo_lacks() {
        let listed: Vec<(String, u64)> = repo_files()
            .into_iter()
            .filter(|(p, _)| !p.starts_with("tokenizer/") && p != "ae.safetensors")
            .map(|(p, c)| (p, c.len() as u64))
            .collect();
        let e = select(&listed, &Wanted::flux(FLOW))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("ae.safetensors") && e.contains("tokenizer/"),
            "{e}"
        );
        assert!(!e.contains("tokenizer_2"), "{e}");
    }

    #[test]
    fn complete_snapshot_is_found() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), &wanted_files());
        assert_eq!(offline(tmp.path(), &Wanted::flux(FLOW)).unwrap(), snap);
        // An explicit revision, a commit hash, and no ref at all (newest snapshot).
        let w = Wanted::flux(FLOW);
        let rev = |r| cached_snapshot(tmp.path(), REPO, Some(r), &w, "", "");
        assert_eq!(rev("main").unwrap(), snap);
        assert_eq!(rev(SHA).unwrap(), snap);
        std::fs::remove_file(repo_dir(tmp.path(), REPO).join("refs/main")).unwrap();
        assert_eq!(offline(tmp.path(), &w).unwrap(), snap);
        let e = format!("{:#}", rev("v2").unwrap_err());
        assert!(
            e.contains("no snapshot for revision `v2`") && e.contains(SHA),
            "{e}"
        );
    }

    #[test]
    fn missing_files_are_each_named() {
        let tmp = tempfile::tempdir().unwrap();
        let files: Vec<_> = wanted_files()
            .into_iter()
            .filter(|(p, _)| {
                ![
                    FLOW,
                    "tokenizer/merges.txt",
                    "text_encoder/model.safetensors",
                ]
                .contains(&p.as_str())
                    && !p.starts_with("tokenizer_2/")
            })
            .collect();
        let snap = fake_cache(tmp.path(), &files);
        let e = format!(
            "{:#}",
            offline(tmp.path(), &Wanted::flux(FLOW)).unwrap_err()
        );
        for expect in [
            &format!("Missing from {}:", snap.display()),
            &format!("  - {FLOW}\n"),
            "  - tokenizer/merges.txt (the BPE merges that go with vocab.json)",
            "  - text_encoder/*.safetensors (the weights; config.json is there)",
            "  - tokenizer_2/ (the whole folder)",
            "WHY",
            "FIX",
            &format!(
                "huggingface-cli download {REPO} --include {FLOW} 'text_encoder/*.safetensors' \
                 tokenizer/merges.txt 'tokenizer_2/*'"
            ),
        ] {
            assert!(e.contains(expect), "no {expect:?} in:\n{e}");
        }
        // The folder entry covers the file wanted inside it.
        assert!(!e.contains("tokenizer_2/tokenizer.json"), "{e}");
        assert!(!e.contains("ae.safetensors"), "{e}");
    }

    #[test]
    fn missing_shard_named_in_index_is_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let shard = "text_encoder_2/model-00002-of-00002.safetensors";
        let files: Vec<_> = wanted_files()
            .into_iter()
            .filter(|(p, _)| p != shard)
            .collect();
        fake_cache(tmp.path(), &files);
        let e = format!(
            "{:#}",
            offline(tmp.path(), &Wanted::flux(FLOW)).unwrap_err()
        );
        assert!(
            e.contains(&format!(
                "  - {shard} (a shard named in text_encoder_2/model.safetensors.index.json)"
            )),
            "{e}"
        );
        assert!(!e.contains("00001-of"), "{e}");
        assert_eq!(e.matches("a shard named in").count(), 1, "{e}");
    }

    #[cfg(unix)]
    #[test]
    fn dangling_links_and_bad_index_are_listed() {
        let tmp = tempfile::tempdir().unwrap();
        let snap = fake_cache(tmp.path(), &wanted_files());
        // Blobs deleted (e.g. by a cache cleanup) leave links that point nowhere.
        let gone = |rel: &str| {
            let blob = std::fs::canonicalize(snap.join(rel)).unwrap();
            std::fs::remove_file(blob).unwrap();
        };
        gone("ae.safetensors");
        gone("tokenizer/vocab.json");
        std::fs::remove_file(snap.join("text_encoder_2/model.safetensors.index.json")).unwrap();
        std::fs::write(
            snap.join("text_encoder_2/model.safetensors.index.json"),
            "{",
        )
        .unwrap();
        let e = format!(
            "{:#}",
            offline(tmp.path(), &Wanted::flux(FLOW)).unwrap_err()
        );
        for expect in [
            "  - ae.safetensors (a link to a blob that is gone)",
            "  - tokenizer/vocab.json (a link to a blob that is gone)",
            "  - text_encoder_2/model.safetensors.index.json (unreadable: not valid JSON",
        ] {
            assert!(e.contains(expect), "no {expect:?} in:\n{e}");
        }
    }

    #[test]
    fn never_cached_repo_is_a_clear_error() {
        let tmp = tempfile::tempdir().unwrap();
        let e = format!(
            "{:#}",
            offline(tmp.path(), &Wanted::flux(FLOW)).unwrap_err()
        );
        assert!(
            e.starts_with(&format!("{REPO} is not in the Hugging Face cache")),
            "{e}"
        );
        assert!(e.contains("models--org--flux") && e.contains("WHY") && e.contains("FIX"));
        assert!(
            e.contains(&format!(
                "huggingface-cli download {REPO} --include {FLOW} ae.safetensors \
                 model_index.json 'text_encoder/*' 'text_encoder_2/*' 'tokenizer/*' \
                 'tokenizer_2/*'"
            )),
            "{e}"
        );
        // A repo folder with no snapshot in it.
        std::fs::create_dir_all(repo_dir(tmp.path(), REPO).join("refs")).unwrap();
        let e = format!(
            "{:#}",
            offline(tmp.path(), &Wanted::flux(FLOW)).unwrap_err()
        );
        assert!(e.contains("holds no snapshot"), "{e}");
    }

    fn env(vars: &[(&str, &str)]) -> Settings {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_env(|k| map.get(k).cloned())
    }

    #[test]
    fn settings_follow_huggingface_hub() {
        let s = env(&[("HOME", "/h")]);
        assert_eq!(s.cache_dir, Path::new("/h/.cache/huggingface/hub"));
        assert!(!s.offline);
        assert_eq!(s.endpoint, "https://huggingface.co");
        let s = env(&[("HOME", "/h"), ("XDG_CACHE_HOME", "/x")]);
        assert_eq!(s.cache_dir, Path::new("/x/huggingface/hub"));
        let s = env(&[
            ("HOME", "/h"),
            ("XDG_CACHE_HOME", "/x"),
            ("HF_HOME", "~/hf"),
        ]);
        assert_eq!(s.cache_dir, Path::new("/h/hf/hub"));
        let s = env(&[("HF_HOME", "/hf"), ("HUGGINGFACE_HUB_CACHE", "/old")]);
        assert_eq!(s.cache_dir, Path::new("/old"));
        let s = env(&[("HUGGINGFACE_HUB_CACHE", "/old"), ("HF_HUB_CACHE", "/c")]);
        assert_eq!(s.cache_dir, Path::new("/c"));
        for (v, offline) in [
            ("1", true),
            ("TRUE", true),
            ("yes", true),
            ("0", false),
            ("", false),
        ] {
            assert_eq!(env(&[("HF_HUB_OFFLINE", v)]).offline, offline, "{v}");
        }
        let s = env(&[("HF_TOKEN", "hf_x"), ("HF_ENDPOINT", "http://e/")]);
        assert_eq!(
            (s.token.as_deref(), s.endpoint.as_str()),
            (Some("hf_x"), "http://e")
        );
        let s = env(&[("HF_TOKEN", "hf_x"), ("HF_HUB_DISABLE_IMPLICIT_TOKEN", "1")]);
        assert_eq!(s.token, None);
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("token"), "hf_file\n").unwrap();
        let s = env(&[("HF_HOME", tmp.path().to_str().unwrap())]);
        assert_eq!(s.token.as_deref(), Some("hf_file"));
    }

    #[test]
    fn public_path_offline_uses_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().to_str().unwrap();
        let s = env(&[("HF_HUB_CACHE", cache), ("HF_HUB_OFFLINE", "1")]);
        let w = Wanted::flux(FLOW);
        let e = format!("{:#}", snapshot_with(&s, REPO, None, &w).unwrap_err());
        assert!(e.contains("HF_HUB_OFFLINE") && e.contains("not in the Hugging Face cache"));
        let snap = fake_cache(tmp.path(), &wanted_files());
        assert_eq!(snapshot_with(&s, REPO, None, &w).unwrap(), snap);
        for bad in ["org", "org/", "../x", "org/..", "a/b/c"] {
            assert!(snapshot_with(&s, bad, None, &w).is_err(), "{bad}");
        }
        assert!(snapshot_with(&s, REPO, Some("../../x"), &w).is_err());
    }

    // -- A fake Hub: just the endpoints the download path uses. --

    struct FakeHub {
        url: String,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl FakeHub {
        /// `refused`: files answered with 401 GatedRepo; `gated`: what the repo info says.
        fn start(files: Vec<(String, Vec<u8>)>, refused: &[&str], gated: bool) -> Self {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let log = Arc::new(Mutex::new(Vec::new()));
            let files = Arc::new(files);
            let refused: Arc<Vec<String>> =
                Arc::new(refused.iter().map(|s| s.to_string()).collect());
            let thread_log = log.clone();
            std::thread::spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (files, refused, log) =
                        (files.clone(), refused.clone(), thread_log.clone());
                    std::thread::spawn(move || serve(stream, &files, &refused, gated, &log));
                }
            });
            Self { url, log }
        }

        fn downloads(&self) -> Vec<String> {
            let log = self.log.lock().unwrap();
            log.iter()
                .filter(|l| l.starts_with("GET /org/flux/resolve/"))
                .cloned()
                .collect()
        }
    }

    fn serve(
        mut stream: TcpStream,
        files: &[(String, Vec<u8>)],
        refused: &[String],
        gated: bool,
        log: &Mutex<Vec<String>>,
    ) {
        let mut reader = BufReader::new(stream.try_clone().unwrap());
        let mut first = String::new();
        if reader.read_line(&mut first).is_err() {
            return;
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        let mut parts = first.split_whitespace();
        let method = parts.next().unwrap_or("").to_string();
        let target = parts.next().unwrap_or("").to_string();
        let path = target.split('?').next().unwrap_or("").to_string();
        log.lock().unwrap().push(format!("{method} {path}"));

        let json = |v: serde_json::Value| (200, vec![], v.to_string().into_bytes());
        let resolve = format!("/org/flux/resolve/{SHA}/");
        let (status, headers, body): (u16, Vec<(&str, String)>, Vec<u8>) = if path
            == "/api/models/org/flux/revision/main"
        {
            let gated = if gated {
                serde_json::json!("manual")
            } else {
                serde_json::json!(false)
            };
            json(serde_json::json!({"id": REPO, "sha": SHA, "gated": gated}))
        } else if path == format!("/api/models/org/flux/tree/{SHA}") {
            let list: Vec<_> = files
                    .iter()
                    .map(|(p, c)| serde_json::json!({"type": "file", "oid": "x", "size": c.len(), "path": p}))
                    .collect();
            json(serde_json::Value::Array(list))
        } else if let Some(file) = path.strip_prefix(&resolve) {
            match files.iter().position(|(p, _)| p == file) {
                Some(_) if refused.iter().any(|r| r == file) => (
                    401,
                    vec![
                        ("X-Error-Code", "GatedRepo".to_string()),
                        (
                            "X-Error-Message",
                            "Access to model org/flux is restricted.".to_string(),
                        ),
                    ],
                    br#"{"error": "Access to model org/flux is restricted."}"#.to_vec(),
                ),
                Some(i) => (
                    200,
                    vec![
                        ("ETag", format!("\"etag{i}\"")),
                        ("X-Repo-Commit", SHA.to_string()),
                    ],
                    files[i].1.clone(),
                ),
                None => (404, vec![("X-Error-Code", "EntryNotFound".into())], vec![]),
            }
        } else {
            (404, vec![("X-Error-Code", "RepoNotFound".into())], vec![])
        };
        let mut head = format!(
            "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let _ = stream.write_all(head.as_bytes());
        if method != "HEAD" {
            let _ = stream.write_all(&body);
        }
    }

    fn online(cache: &Path, endpoint: &str, token: Option<&str>) -> Settings {
        Settings {
            cache_dir: cache.to_path_buf(),
            offline: false,
            endpoint: endpoint.to_string(),
            token: token.map(String::from),
            retries: Some(0),
        }
    }

    #[test]
    fn download_fills_the_standard_cache_with_only_what_is_wanted() {
        let hub = FakeHub::start(repo_files(), &[], false);
        let tmp = tempfile::tempdir().unwrap();
        let s = online(tmp.path(), &hub.url, None);
        let w = Wanted::flux(FLOW);
        let snap = snapshot_with(&s, REPO, None, &w).unwrap();
        let repo = repo_dir(tmp.path(), REPO);
        assert_eq!(snap, repo.join("snapshots").join(SHA));
        assert_eq!(
            std::fs::read_to_string(repo.join("refs/main")).unwrap(),
            SHA
        );
        for (rel, content) in wanted_files() {
            assert_eq!(std::fs::read(snap.join(&rel)).unwrap(), content, "{rel}");
            #[cfg(unix)]
            assert!(
                snap.join(&rel).symlink_metadata().unwrap().is_symlink(),
                "{rel} should link into blobs/"
            );
        }
        let downloads = hub.downloads();
        assert_eq!(downloads.len(), wanted_files().len(), "{downloads:?}");
        for d in &downloads {
            for skipped in ["transformer/", "vae/", ".bin", "README", ".gitattributes"] {
                assert!(!d.contains(skipped), "{d}");
            }
        }
        assert!(!snap.join("transformer").exists() && !snap.join("vae").exists());
        // What the download selects, the offline check accepts.
        assert_eq!(offline(tmp.path(), &w).unwrap(), snap);
        // A second run downloads nothing.
        assert_eq!(snapshot_with(&s, REPO, None, &w).unwrap(), snap);
        assert_eq!(hub.downloads().len(), downloads.len());
        // Only what is missing is fetched again (a file whose blob is still there is relinked).
        let merges = snap.join("tokenizer/merges.txt");
        std::fs::remove_file(std::fs::canonicalize(&merges).unwrap()).unwrap();
        std::fs::remove_file(&merges).unwrap();
        std::fs::remove_file(snap.join("tokenizer/vocab.json")).unwrap();
        snapshot_with(&s, REPO, None, &w).unwrap();
        let again = hub.downloads();
        assert_eq!(again.len(), downloads.len() + 1);
        assert!(again.last().unwrap().ends_with("tokenizer/merges.txt"));
        assert!(merges.is_file() && snap.join("tokenizer/vocab.json").is_file());
    }

    #[test]
    fn gated_repo_says_how_to_get_access() {
        let msg = |hub: &FakeHub, token| {
            let tmp = tempfile::tempdir().unwrap();
            let s = online(tmp.path(), &hub.url, token);
            let e = snapshot_with(&s, REPO, None, &Wanted::flux(FLOW)).unwrap_err();
            format!("{e:#}")
        };
        // The Hub refuses the file (token set but the license not accepted, say).
        let hub = FakeHub::start(repo_files(), &[FLOW], false);
        let e = msg(&hub, Some("hf_x"));
        for expect in [
            "org/flux is gated",
            "401",
            "Access to model org/flux is restricted",
            &format!("accept the license on {}/org/flux", hub.url),
            "HF_TOKEN=<token>",
            "A token is set",
            &format!("downloading {FLOW}"),
        ] {
            assert!(e.contains(expect), "no {expect:?} in:\n{e}");
        }
        // Gated and no token: said before trying.
        let hub = FakeHub::start(repo_files(), &[], true);
        let e = msg(&hub, None);
        assert!(e.contains("it is gated and no token is set") && e.contains("No token is set"));
        assert!(hub.downloads().is_empty(), "{:?}", hub.downloads());
    }

    #[test]
    fn repo_lacking_files_or_unknown_is_reported() {
        let files: Vec<_> = repo_files()
            .into_iter()
            .filter(|(p, _)| p != "ae.safetensors")
            .collect();
        let hub = FakeHub::start(files, &[], false);
        let tmp = tempfile::tempdir().unwrap();
        let s = online(tmp.path(), &hub.url, None);
        let e = format!(
            "{:#}",
            snapshot_with(&s, REPO, None, &Wanted::flux(FLOW)).unwrap_err()
        );
        assert!(
            e.contains("the repo lacks what fluxfit needs: ae.safetensors"),
            "{e}"
        );
        let e = format!(
            "{:#}",
            snapshot_with(&s, "org/other", None, &Wanted::flux(FLOW)).unwrap_err()
        );
        assert!(
            e.contains("No such repo, or it is private") || e.contains("no repo org/other"),
            "{e}"
        );
    }

    #[test]
    fn unreachable_hub_falls_back_to_the_cache() {
        // A port nobody listens on: connections are refused at once.
        let endpoint = {
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            format!("http://{}", l.local_addr().unwrap())
        };
        let tmp = tempfile::tempdir().unwrap();
        let s = online(tmp.path(), &endpoint, None);
        let w = Wanted::flux(FLOW);
        let e = format!("{:#}", snapshot_with(&s, REPO, None, &w).unwrap_err());
        assert!(e.contains("the Hub could not be reached"), "{e}");
        assert!(e.contains("not in the Hugging Face cache"), "{e}");
        let files: Vec<_> = wanted_files()
            .into_iter()
            .filter(|(p, _)| p != FLOW)
            .collect();
        let snap = fake_cache(tmp.path(), &files);
        let e = format!("{:#}", snapshot_with(&s, REPO, None, &w).unwrap_err());
        assert!(
            e.contains(&format!("  - {FLOW}\n")) && e.contains("network is back"),
            "{e}"
        );
        std::fs::write(snap.join(FLOW), "flow").unwrap();
        assert_eq!(snapshot_with(&s, REPO, None, &w).unwrap(), snap);
    }
}
