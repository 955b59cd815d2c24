//! Token-id parity with transformers (goldens from tools/reference/make_tokenizers.py) and the
//! loaders' error paths.

use std::path::{Path, PathBuf};

use fluxfit::tokenizer::{ClipTokenizer, T5Tokenizer};
use fluxfit::Error;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn fixtures() -> PathBuf {
    root().join("tests/fixtures")
}

fn clip_dir() -> PathBuf {
    fixtures().join("tiny-diffusers/tokenizer")
}

fn t5_dir() -> PathBuf {
    fixtures().join("tiny-diffusers/tokenizer_2")
}

fn open_clip_gz() -> Vec<u8> {
    let path = root().join("crates/fluxfit/assets/bpe_simple_vocab_16e6.txt.gz");
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

struct Case {
    text: String,
    clip: Vec<u32>,
    t5_16: Vec<u32>,
    t5_64: Vec<u32>,
}

fn goldens() -> Vec<Case> {
    let path = fixtures().join("golden/tokenizers.json");
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let ids = |v: &serde_json::Value, key: &str| -> Vec<u32> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("golden case lacks {key}"))
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let cases: Vec<Case> = json
        .as_array()
        .expect("golden file is a list")
        .iter()
        .map(|c| Case {
            text: c["text"].as_str().unwrap().to_string(),
            clip: ids(c, "clip_ids"),
            t5_16: ids(c, "t5_ids_16"),
            t5_64: ids(c, "t5_ids_64"),
        })
        .collect();
    assert!(!cases.is_empty());
    cases
}

/// Compares every case and reports all mismatches at once, so one run shows the whole picture.
fn check(name: &str, encode: impl Fn(&str) -> Vec<u32>, golden: impl Fn(&Case) -> &[u32]) {
    let mut failures = Vec::new();
    for case in goldens() {
        let got = encode(&case.text);
        let want = golden(&case);
        if got != want {
            failures.push(format!(
                "{name} {:?}:\n   got {got:?}\n  want {want:?}",
                case.text
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn tokenizer_err_path(err: Error) -> (PathBuf, String) {
    match err {
        Error::Tokenizer { path, message } => (path, message),
        other => panic!("expected Error::Tokenizer, got {other:?}"),
    }
}

#[test]
fn clip_vocab_merges_matches_golden() {
    let dir = clip_dir();
    let tok =
        ClipTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    check(
        "clip(vocab+merges)",
        |t| tok.encode(t, 77).unwrap(),
        |c| &c.clip,
    );
}

#[test]
fn clip_open_clip_gz_matches_golden() {
    let tok = ClipTokenizer::from_open_clip_bpe_gz(&open_clip_gz()).unwrap();
    assert_eq!(tok.vocab_size(), 49408);
    check(
        "clip(open_clip gz)",
        |t| tok.encode(t, 77).unwrap(),
        |c| &c.clip,
    );
}

#[test]
fn clip_from_dir_matches_golden() {
    let tok = ClipTokenizer::from_dir(&clip_dir()).unwrap();
    check("clip(dir)", |t| tok.encode(t, 77).unwrap(), |c| &c.clip);
}

/// A CLIP tokenizer.json (built here from the fixture's vocab and merges, in both merge formats
/// tokenizers writes) gives the same ids, and `from_dir` prefers it.
#[test]
fn clip_tokenizer_json_matches_golden() {
    let dir = clip_dir();
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("vocab.json")).unwrap()).unwrap();
    let merges_txt = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    let merges: Vec<&str> = merges_txt
        .lines()
        .filter(|l| !l.starts_with("#version") && !l.is_empty())
        .collect();
    let as_pairs: Vec<Vec<&str>> = merges.iter().map(|m| m.split(' ').collect()).collect();
    for (name, merges) in [
        ("strings", serde_json::json!(merges)),
        ("pairs", serde_json::json!(as_pairs)),
    ] {
        let tmp = tempdir(&format!("clip_json_{name}"));
        let json = serde_json::json!({
            "version": "1.0",
            "model": { "type": "BPE", "vocab": vocab, "merges": merges, "end_of_word_suffix": "</w>" },
        });
        std::fs::write(tmp.join("tokenizer.json"), json.to_string()).unwrap();
        // A broken vocab.json next to it shows that tokenizer.json is the one read.
        std::fs::write(tmp.join("vocab.json"), "broken").unwrap();
        std::fs::write(tmp.join("merges.txt"), "broken").unwrap();
        let tok = ClipTokenizer::from_dir(&tmp).unwrap();
        check(
            &format!("clip(tokenizer.json, {name})"),
            |t| tok.encode(t, 77).unwrap(),
            |c| &c.clip,
        );
    }
}

#[test]
fn t5_matches_golden() {
    let tok = T5Tokenizer::from_dir(&t5_dir()).unwrap();
    assert_eq!(tok.vocab_size(), 600);
    check("t5/16", |t| tok.encode(t, 16).unwrap(), |c| &c.t5_16);
    check("t5/64", |t| tok.encode(t, 64).unwrap(), |c| &c.t5_64);
}

#[test]
fn t5_embedded_asset_matches_golden() {
    let path = root().join("crates/fluxfit/assets/t5_tiny_tokenizer.json");
    let tok = T5Tokenizer::from_bytes(&std::fs::read(path).unwrap()).unwrap();
    check("t5 asset/16", |t| tok.encode(t, 16).unwrap(), |c| &c.t5_16);
}

/// Checks `want` is a prefix of the ids and the rest is `pad`.
fn check_prefix(name: &str, cases: &[(&str, &[u32])], pad: u32, encode: impl Fn(&str) -> Vec<u32>) {
    let mut failures = Vec::new();
    for &(text, want) in cases {
        let got = encode(text);
        if !got.starts_with(want) || got[want.len()..].iter().any(|&id| id != pad) {
            failures.push(format!(
                "{name} {text:?}:\n   got {got:?}\n  want {want:?} + pad"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Prompts beyond the goldens: special tokens typed into a prompt, control and format characters,
/// case mapping, compatibility characters, Unicode whitespace. Expected ids are from transformers
/// 5.24.0 (`CLIPTokenizer` / `T5Tokenizer` on the fixture folders, `padding="max_length",
/// truncation=True`), trailing padding left out.
#[test]
fn edge_cases_match_transformers() {
    let clip_cases: &[(&str, &[u32])] = &[
        ("a <|endoftext|> b", &[49406, 320, 49407, 321, 49407]),
        ("x.<|endoftext|>", &[49406, 343, 269, 49407]),
        (
            "a <|EndOfText|> b",
            &[49406, 320, 27, 347, 40786, 4160, 91, 285, 321, 49407],
        ),
        ("<|StartOfText|>hi", &[49406, 49406, 1883, 49407]),
        (
            "\u{39f}\u{394}\u{39f}\u{3a3}",
            &[49406, 138, 123, 138, 112, 138, 123, 139, 481, 49407],
        ),
        (
            "a\u{0}b\u{7}c\u{200b}d",
            &[49406, 320, 444, 321, 451, 322, 9844, 323, 49407],
        ),
        ("''s x'S", &[49406, 8445, 338, 343, 568, 49407]),
        ("\u{130}stanbul", &[49406, 328, 16384, 11231, 49407]),
        ("\u{fb01}ne", &[49406, 171, 105, 223, 1422, 49407]),
        ("e\u{301}t\u{e9}", &[49406, 3459, 39694, 49407]),
        ("a\u{3000}b\u{a0}c", &[49406, 320, 321, 322, 49407]),
    ];
    let t5_cases: &[(&str, &[u32])] = &[
        ("hello </s>", &[3, 131, 129, 1, 1]),
        ("a <extra_id_0> b", &[5, 599, 26, 1]),
        ("  a  b  ", &[5, 26, 1]),
        ("<pad>x", &[0, 3, 234, 1]),
        ("a\u{3000}b", &[5, 26, 1]),
        ("x<unk>y", &[3, 234, 2, 78, 1]),
        ("\u{fb01}ne \u{2460}", &[190, 257, 238, 1]),
    ];
    let dir = clip_dir();
    let hf =
        ClipTokenizer::from_vocab_merges(&dir.join("vocab.json"), &dir.join("merges.txt")).unwrap();
    let oc = ClipTokenizer::from_open_clip_bpe_gz(&open_clip_gz()).unwrap();
    check_prefix("clip", clip_cases, 49407, |t| hf.encode(t, 77).unwrap());
    check_prefix("clip(open_clip)", clip_cases, 49407, |t| {
        oc.encode(t, 77).unwrap()
    });
    let t5 = T5Tokenizer::from_dir(&t5_dir()).unwrap();
    check_prefix("t5", t5_cases, 0, |t| t5.encode(t, 16).unwrap());
}

#[test]
fn outputs_are_exactly_max_len() {
    let clip = ClipTokenizer::from_dir(&clip_dir()).unwrap();
    let t5 = T5Tokenizer::from_dir(&t5_dir()).unwrap();
    let long = "a very long prompt ".repeat(200);
    for n in [2, 3, 77, 100] {
        let ids = clip.encode(&long, n).unwrap();
        assert_eq!(ids.len(), n);
        assert_eq!((ids[0], ids[n - 1]), (49406, 49407));
    }
    for n in [1, 2, 128, 256, 512] {
        let ids = t5.encode(&long, n).unwrap();
        assert_eq!(ids.len(), n);
        assert_eq!(ids[n - 1], 1, "T5 keeps </s> last when truncating");
        assert_eq!(t5.encode("", n).unwrap()[0], 1);
    }
    assert!(matches!(clip.encode("x", 1), Err(Error::InvalidRequest(_))));
    assert!(matches!(t5.encode("x", 0), Err(Error::InvalidRequest(_))));
}

#[test]
fn clip_missing_folder_and_files_name_the_path() {
    let tmp = tempdir("clip_missing");
    let missing = tmp.join("nope");
    let (path, msg) = tokenizer_err_path(ClipTokenizer::from_dir(&missing).unwrap_err());
    assert_eq!(path, missing);
    assert!(msg.contains("not found"), "{msg}");

    // An empty folder: the message lists what was looked for.
    let (path, msg) = tokenizer_err_path(ClipTokenizer::from_dir(&tmp).unwrap_err());
    assert_eq!(path, *tmp);
    for name in ["tokenizer.json", "vocab.json", "merges.txt"] {
        assert!(msg.contains(name), "{msg}");
    }

    let vocab = clip_dir().join("vocab.json");
    let no_merges = tmp.join("merges.txt");
    let (path, _) =
        tokenizer_err_path(ClipTokenizer::from_vocab_merges(&vocab, &no_merges).unwrap_err());
    assert_eq!(path, no_merges);
    let (path, _) = tokenizer_err_path(ClipTokenizer::from_tokenizer_json(&no_merges).unwrap_err());
    assert_eq!(path, no_merges);
}

#[test]
fn t5_missing_folder_and_spiece_only() {
    let tmp = tempdir("t5_missing");
    let missing = tmp.join("nope");
    let (path, _) = tokenizer_err_path(T5Tokenizer::from_dir(&missing).unwrap_err());
    assert_eq!(path, missing);

    std::fs::copy(t5_dir().join("spiece.model"), tmp.join("spiece.model")).unwrap();
    let (path, msg) = tokenizer_err_path(T5Tokenizer::from_dir(&tmp).unwrap_err());
    assert_eq!(path, *tmp);
    assert!(
        msg.contains("tokenizer.json") && msg.contains("tokenizer_2"),
        "{msg}"
    );
}

#[test]
fn corrupt_files_are_errors_not_panics() {
    let tmp = tempdir("corrupt");
    let good = std::fs::read(t5_dir().join("tokenizer.json")).unwrap();
    let truncated = tmp.join("tokenizer.json");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let (path, _) = tokenizer_err_path(T5Tokenizer::from_tokenizer_json(&truncated).unwrap_err());
    assert_eq!(path, truncated);
    tokenizer_err_path(T5Tokenizer::from_bytes(b"{\"model\": 3}").unwrap_err());
    // A folder whose tokenizer.json is broken fails on it rather than falling back.
    let (path, _) = tokenizer_err_path(ClipTokenizer::from_dir(&tmp).unwrap_err());
    assert_eq!(path, truncated);

    // The T5 tokenizer.json is valid JSON but not a CLIP (BPE) one.
    let (_, msg) = tokenizer_err_path(
        ClipTokenizer::from_tokenizer_json(&t5_dir().join("tokenizer.json")).unwrap_err(),
    );
    assert!(msg.contains("BPE"), "{msg}");

    let bad_vocab = tmp.join("vocab.json");
    std::fs::write(&bad_vocab, "[1, 2").unwrap();
    let merges = clip_dir().join("merges.txt");
    let (path, _) =
        tokenizer_err_path(ClipTokenizer::from_vocab_merges(&bad_vocab, &merges).unwrap_err());
    assert_eq!(path, bad_vocab);

    // A vocabulary that lacks the merges' tokens.
    std::fs::write(&bad_vocab, "{\"a\": 0}").unwrap();
    let (path, _) =
        tokenizer_err_path(ClipTokenizer::from_vocab_merges(&bad_vocab, &merges).unwrap_err());
    assert_eq!(path, bad_vocab);

    tokenizer_err_path(ClipTokenizer::from_open_clip_bpe_gz(b"not gzip").unwrap_err());
}

/// A scratch folder, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "fluxfit-tokenizer-test-{}-{name}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}
