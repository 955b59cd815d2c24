//! The two prompt tokenizers FLUX uses: CLIP-L (byte-level BPE, 77 ids) and T5 v1.1
//! (sentencepiece unigram, 128/256/512 ids).
//!
//! The reference tokenizes with `padding="max_length", truncation=True` and passes no attention
//! mask, so the pad ids are part of the model input: `encode` always returns exactly `max_len` ids.
//!
//! Parity target: transformers' `CLIPTokenizer` and `T5Tokenizer` as of transformers 5, which are
//! backed by the `tokenizers` library (the same pipelines as the v4 `*Fast` classes). For CLIP the
//! pipeline is rebuilt here around the BPE vocabulary, whichever file that comes from, so all
//! three loaders give the same ids. The v4 *slow* `CLIPTokenizer` cleans text differently (it drops
//! control characters and splits CJK ideographs apart, or runs ftfy when installed); prompts in
//! plain Latin text tokenize the same either way.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use crate::error::{Error, Result};

const CLIP_BOS: &str = "<|startoftext|>";
const CLIP_EOS: &str = "<|endoftext|>";
const END_OF_WORD: &str = "</w>";

/// CLIP's word-splitting regex (case-sensitive, as in transformers' `CLIPTokenizer`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// open_clip reads only this many merges of its file, which holds more (49152 BPE tokens minus
/// the 256 byte tokens and the two special tokens).
const CLIP_MERGES: usize = 49152 - 256 - 2;

fn tok_err(path: impl Into<PathBuf>, message: impl Into<String>) -> Error {
    Error::Tokenizer {
        path: path.into(),
        message: message.into(),
    }
}

fn read_file(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        let fix = if e.kind() == std::io::ErrorKind::NotFound {
            "the file does not exist; check the path or download the tokenizer files again"
        } else {
            "the file cannot be read; check its permissions"
        };
        tok_err(path, format!("cannot read {what} ({e}): {fix}"))
    })
}

/// GPT-2's reversible byte-to-character map: printable Latin-1 bytes map to themselves, the rest
/// to U+0100 onwards, in this order (which is also the order of the first 256 CLIP vocab entries).
fn byte_chars() -> [char; 256] {
    let mut bytes: Vec<u8> = (b'!'..=b'~')
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars: Vec<char> = bytes.iter().map(|&b| b as char).collect();
    let mut n = 0u32;
    for b in 0..=255u8 {
        if !bytes.contains(&b) {
            bytes.push(b);
            chars.push(char::from_u32(256 + n).expect("U+0100..U+0143 are valid chars"));
            n += 1;
        }
    }
    let mut table = ['\0'; 256];
    for (b, c) in bytes.into_iter().zip(chars) {
        table[b as usize] = c;
    }
    table
}

/// The byte characters in vocabulary order: the printable bytes (which keep their code point)
/// then the remapped ones, i.e. ascending code point.
fn byte_chars_in_vocab_order() -> Vec<char> {
    let mut order = byte_chars().to_vec();
    order.sort_unstable();
    order
}

/// CLIP-L's tokenizer; see the module docs for what it reproduces.
pub struct ClipTokenizer {
    inner: tokenizers::Tokenizer,
    bos: u32,
    eos: u32,
    pad: u32,
    vocab_size: usize,
    /// Where the vocabulary came from, for error messages.
    source: PathBuf,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// HF layout: `vocab.json` + `merges.txt` (what FLUX repos' `tokenizer/` folder ships; it has
    /// no tokenizer.json).
    pub fn from_vocab_merges(vocab: &Path, merges: &Path) -> Result<Self> {
        let vocab_bytes = read_file(vocab, "the CLIP vocabulary (vocab.json)")?;
        let map: HashMap<String, u32> = serde_json::from_slice(&vocab_bytes).map_err(|e| {
            tok_err(
                vocab,
                format!(
                    "not a JSON object of token -> id ({e}); the file is corrupt or not a \
                     vocab.json: download the CLIP tokenizer's vocab.json again"
                ),
            )
        })?;
        let merges_bytes = read_file(merges, "the CLIP merges (merges.txt)")?;
        let text = String::from_utf8(merges_bytes).map_err(|_| {
            tok_err(
                merges,
                "not UTF-8 text; the file is corrupt: download the CLIP tokenizer's merges.txt again",
            )
        })?;
        let lines = text.lines().filter(|l| !l.starts_with("#version"));
        let merges_list = parse_merges(merges, lines)?;
        Self::build(map, merges_list, vocab)
    }

    /// A `tokenizer.json` (some repos ship one). Only its BPE vocabulary and merges are used: the
    /// cleanup and special-token handling are CLIP's, as for the other loaders.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "the CLIP tokenizer.json")?;
        let json: serde_json::Value = serde_json::from_slice(&bytes).map_err(|e| {
            tok_err(
                path,
                format!(
                    "not valid JSON ({e}); the file is corrupt or truncated: download it again"
                ),
            )
        })?;
        let model = json.get("model").ok_or_else(|| {
            tok_err(
                path,
                "no `model` entry; this is not a tokenizers tokenizer.json",
            )
        })?;
        if let Some(kind) = model.get("type").and_then(|t| t.as_str()) {
            if kind != "BPE" {
                return Err(tok_err(
                    path,
                    format!(
                        "model type is {kind}, but CLIP needs a BPE tokenizer; point to the CLIP \
                         tokenizer (FLUX repos' `tokenizer/` folder), not the T5 one"
                    ),
                ));
            }
        }
        let map: HashMap<String, u32> = model
            .get("vocab")
            .cloned()
            .map(serde_json::from_value)
            .transpose()
            .ok()
            .flatten()
            .ok_or_else(|| {
                tok_err(
                    path,
                    "`model.vocab` is missing or not a token -> id object; download the \
                     tokenizer.json again",
                )
            })?;
        let raw_merges = model
            .get("merges")
            .and_then(|m| m.as_array())
            .ok_or_else(|| {
                tok_err(
                    path,
                    "`model.merges` is missing or not a list; download the tokenizer.json again",
                )
            })?;
        // Merges are stored as "a b" strings (older files) or ["a", "b"] pairs (newer ones).
        let mut joined = Vec::with_capacity(raw_merges.len());
        for (i, m) in raw_merges.iter().enumerate() {
            let line = match m {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Array(pair) => match pair.as_slice() {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                        Some(format!("{a} {b}"))
                    }
                    _ => None,
                },
                _ => None,
            };
            joined.push(line.ok_or_else(|| {
                tok_err(
                    path,
                    format!(
                        "`model.merges[{i}]` is {m}, expected \"a b\" or [\"a\", \"b\"]; the file \
                         is corrupt: download it again"
                    ),
                )
            })?);
        }
        let merges_list = parse_merges(path, joined.iter().map(String::as_str))?;
        Self::build(map, merges_list, path)
    }

    /// open_clip's `bpe_simple_vocab_16e6.txt.gz` (bundled at crates/fluxfit/assets/; the built-in
    /// tiny model uses it via include_bytes!). The file holds only merges: the vocabulary is
    /// derived from them exactly as open_clip (and OpenAI's CLIP) derive it.
    pub fn from_open_clip_bpe_gz(bytes: &[u8]) -> Result<Self> {
        let source = PathBuf::from("bpe_simple_vocab_16e6.txt.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| {
                tok_err(
                    &source,
                    format!(
                        "not a gzip of UTF-8 text ({e}); pass the bytes of open_clip's \
                         bpe_simple_vocab_16e6.txt.gz unchanged"
                    ),
                )
            })?;
        // Line 0 is the `#version` header.
        let lines = text.split('\n').skip(1).take(CLIP_MERGES);
        let merges_list = parse_merges(&source, lines)?;
        if merges_list.len() != CLIP_MERGES {
            return Err(tok_err(
                &source,
                format!(
                    "{} merges, expected at least {CLIP_MERGES}; the file is truncated: use \
                     open_clip's bpe_simple_vocab_16e6.txt.gz",
                    merges_list.len()
                ),
            ));
        }
        let map = open_clip_vocab(&merges_list);
        Self::build(map, merges_list, &source)
    }

    /// A folder: tokenizer.json if present, else vocab.json + merges.txt.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(tok_err(
                dir,
                "CLIP tokenizer folder not found; pass the folder holding vocab.json + merges.txt \
                 (FLUX repos' `tokenizer/` folder) or a tokenizer.json",
            ));
        }
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let vocab = dir.join("vocab.json");
        let merges = dir.join("merges.txt");
        if vocab.is_file() && merges.is_file() {
            return Self::from_vocab_merges(&vocab, &merges);
        }
        let missing: Vec<&str> = [("vocab.json", &vocab), ("merges.txt", &merges)]
            .into_iter()
            .filter(|(_, p)| !p.is_file())
            .map(|(n, _)| n)
            .collect();
        Err(tok_err(
            dir,
            format!(
                "no CLIP tokenizer here: looked for tokenizer.json, or vocab.json + merges.txt \
                 (missing: {}); copy them from the FLUX repo's `tokenizer/` folder",
                missing.join(", ")
            ),
        ))
    }

    fn build(
        map: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        source: &Path,
    ) -> Result<Self> {
        let bytes = byte_chars();
        // Every byte must have a token with and without the end-of-word suffix, or the BPE could
        // silently drop characters.
        if let Some(c) = bytes.iter().find(|c| {
            !map.contains_key(&c.to_string()) || !map.contains_key(&format!("{c}{END_OF_WORD}"))
        }) {
            return Err(tok_err(
                source,
                format!(
                    "the vocabulary lacks the byte-level token {c:?} (or {c:?}{END_OF_WORD}); \
                     this is not a CLIP byte-level BPE vocabulary: use CLIP-L's tokenizer files"
                ),
            ));
        }
        let special = |name: &str| {
            map.get(name).copied().ok_or_else(|| {
                tok_err(
                    source,
                    format!(
                        "the vocabulary has no {name} token; this is not a CLIP vocabulary: use \
                         CLIP-L's tokenizer files"
                    ),
                )
            })
        };
        let bos = special(CLIP_BOS)?;
        let eos = special(CLIP_EOS)?;
        let vocab_size = map.values().map(|&id| id as usize + 1).max().unwrap_or(0);
        let vocab: Vocab = map.into_iter().collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .end_of_word_suffix(END_OF_WORD.to_string())
            .unk_token(CLIP_EOS.to_string())
            .build()
            .map_err(|e| {
                tok_err(
                    source,
                    format!(
                        "vocabulary and merges do not fit together ({e}); the files come from \
                         different tokenizers or are corrupt: download both again"
                    ),
                )
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pipeline_err = |e| tok_err(source, format!("cannot build the CLIP pipeline: {e}"));
        let whitespace =
            Replace::new(ReplacePattern::Regex(r"\s+".into()), " ").map_err(pipeline_err)?;
        inner
            .with_normalizer(Some(NormalizerSequence::new(vec![
                NFC.into(),
                whitespace.into(),
                Lowercase.into(),
            ])))
            .map_err(pipeline_err)?;
        let words = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(pipeline_err)?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            words.into(),
            ByteLevel::new(false, true, true).into(),
        ])));
        // As transformers registers them: a prompt's literal `<|endoftext|>` is one id, and so is
        // `<|startoftext|>` in any case (it is matched after lowercasing).
        inner
            .add_special_tokens([
                AddedToken::from(CLIP_BOS, true).normalized(true),
                AddedToken::from(CLIP_EOS, true).normalized(false),
            ])
            .map_err(pipeline_err)?;
        Ok(Self {
            inner,
            bos,
            eos,
            // The pad token is <|endoftext|> in openai/clip-vit-large-patch14 and in FLUX repos.
            pad: eos,
            vocab_size,
            source: source.to_path_buf(),
        })
    }

    /// One more than the largest id (49408 for CLIP-L).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// `<|startoftext|>` + tokens + `<|endoftext|>`, truncated to keep the end token and padded
    /// with `<|endoftext|>`: exactly `max_len` ids.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 2 {
            return Err(Error::InvalidRequest(format!(
                "CLIP max_len {max_len} cannot hold the start and end tokens; use 77"
            )));
        }
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, format!("cannot tokenize the prompt: {e}")))?;
        let content = encoding.get_ids();
        let content = &content[..content.len().min(max_len - 2)];
        let mut ids = Vec::with_capacity(max_len);
        ids.push(self.bos);
        ids.extend_from_slice(content);
        ids.push(self.eos);
        ids.resize(max_len, self.pad);
        Ok(ids)
    }
}

/// open_clip's (and OpenAI CLIP's) vocabulary: the byte tokens, the same with `</w>`, one token
/// per merge, then the two special tokens.
fn open_clip_vocab(merges: &[(String, String)]) -> HashMap<String, u32> {
    let bytes = byte_chars_in_vocab_order();
    let singles = bytes.iter().map(|c| c.to_string());
    let ends = bytes.iter().map(|c| format!("{c}{END_OF_WORD}"));
    let merged = merges.iter().map(|(a, b)| format!("{a}{b}"));
    let special = [CLIP_BOS, CLIP_EOS].map(String::from);
    singles
        .chain(ends)
        .chain(merged)
        .chain(special)
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect()
}

/// Splits merges lines "a b" into pairs (rank = order), skipping blank lines.
fn parse_merges<'a>(
    source: &Path,
    lines: impl Iterator<Item = &'a str>,
) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (i, line) in lines.enumerate() {
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(a), Some(b), None) => out.push((a.to_string(), b.to_string())),
            (None, _, _) => continue,
            _ => {
                return Err(tok_err(
                    source,
                    format!(
                        "merge {} is {line:?}, expected two tokens separated by a space; the file \
                         is corrupt: download it again",
                        i + 1
                    ),
                ))
            }
        }
    }
    if out.is_empty() {
        return Err(tok_err(
            source,
            "no BPE merges found; the file is empty or truncated: download it again",
        ));
    }
    Ok(out)
}

/// T5 v1.1's sentencepiece tokenizer, loaded from the `tokenizer.json` that FLUX repos ship in
/// `tokenizer_2/` (reading `spiece.model` would need protobuf and sentencepiece's normalizer).
pub struct T5Tokenizer {
    inner: tokenizers::Tokenizer,
    eos: u32,
    pad: u32,
    source: PathBuf,
}

impl std::fmt::Debug for T5Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("T5Tokenizer")
            .field("source", &self.source)
            .field("vocab_size", &self.vocab_size())
            .finish_non_exhaustive()
    }
}

impl T5Tokenizer {
    pub fn from_tokenizer_json(path: &Path) -> Result<Self> {
        let bytes = read_file(path, "the T5 tokenizer.json")?;
        Self::from_bytes_at(&bytes, path)
    }

    /// The built-in tiny model embeds crates/fluxfit/assets/t5_tiny_tokenizer.json.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        Self::from_bytes_at(json, Path::new("<embedded T5 tokenizer.json>"))
    }

    fn from_bytes_at(json: &[u8], source: &Path) -> Result<Self> {
        let bad = |e: String| {
            tok_err(
                source,
                format!(
                    "not a valid tokenizer.json ({e}); the file is corrupt or truncated: download \
                     the T5 tokenizer.json (FLUX repos' `tokenizer_2/`) again"
                ),
            )
        };
        // The `tokenizers` crate panics on some malformed files (an `expect` in its decoder
        // deserializer, found by fuzzing); that is a bad file, not a crash.
        let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(json))
            .map_err(|_| bad("its parser failed on a malformed entry".into()))?;
        let mut inner = parsed.map_err(|e| bad(e.to_string()))?;
        // Truncation and padding are done in `encode`, the way transformers does them; settings
        // stored in the file must not interfere.
        inner.with_padding(None);
        inner
            .with_truncation(None)
            .map_err(|e| tok_err(source, format!("cannot disable truncation: {e}")))?;
        let special = |name: &str| {
            inner.token_to_id(name).ok_or_else(|| {
                tok_err(
                    source,
                    format!(
                        "the vocabulary has no {name} token; this is not a T5 tokenizer: use the \
                         tokenizer.json from FLUX repos' `tokenizer_2/`"
                    ),
                )
            })
        };
        let eos = special("</s>")?;
        let pad = special("<pad>")?;
        Ok(Self {
            inner,
            eos,
            pad,
            source: source.to_path_buf(),
        })
    }

    /// A folder with tokenizer.json.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(tok_err(
                dir,
                "T5 tokenizer folder not found; pass the folder holding tokenizer.json (FLUX \
                 repos' `tokenizer_2/` folder)",
            ));
        }
        let json = dir.join("tokenizer.json");
        if json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        let message = if dir.join("spiece.model").is_file() {
            "only spiece.model here, and fluxfit reads T5's tokenizer.json instead: add the \
             tokenizer.json that FLUX repos ship in `tokenizer_2/`"
        } else {
            "no tokenizer.json here: add the tokenizer.json that FLUX repos ship in `tokenizer_2/`"
        };
        Err(tok_err(dir, message))
    }

    /// Token ids + `</s>`, truncated to keep `</s>` last and padded with `<pad>`: exactly
    /// `max_len` ids.
    pub fn encode(&self, text: &str, max_len: usize) -> Result<Vec<u32>> {
        if max_len < 1 {
            return Err(Error::InvalidRequest(
                "T5 max_len 0 cannot hold the end token; use 512 (dev), 256 (schnell) or 128 (fill)"
                    .to_string(),
            ));
        }
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| tok_err(&self.source, format!("cannot tokenize the prompt: {e}")))?;
        let mut ids = encoding.get_ids().to_vec();
        // transformers truncates to leave room for `</s>`, then appends it (even after a literal
        // `</s>` in the prompt; the v4 slow tokenizer would not).
        ids.truncate(max_len - 1);
        ids.push(self.eos);
        ids.resize(max_len, self.pad);
        Ok(ids)
    }

    /// Token count including added tokens (32100 for T5 v1.1; the embedding has 32128 rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(rel)
    }

    /// The vocabulary derived from open_clip's merges is the one HF ships as vocab.json.
    #[test]
    fn open_clip_vocab_equals_hf_vocab_json() {
        let gz = std::fs::read(fixture(
            "crates/fluxfit/assets/bpe_simple_vocab_16e6.txt.gz",
        ));
        let vocab = std::fs::read(fixture(
            "tests/fixtures/tiny-diffusers/tokenizer/vocab.json",
        ));
        let (Ok(gz), Ok(vocab)) = (gz, vocab) else {
            panic!("tokenizer fixtures missing: run tools/reference/make_tokenizers.py");
        };
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz.as_slice())
            .read_to_string(&mut text)
            .unwrap();
        let lines = text.split('\n').skip(1).take(CLIP_MERGES);
        let merges = parse_merges(Path::new("gz"), lines).unwrap();
        let hf: HashMap<String, u32> = serde_json::from_slice(&vocab).unwrap();
        let ours = open_clip_vocab(&merges);
        assert_eq!(ours.len(), 49408);
        assert_eq!(ours, hf);
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let table = byte_chars();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(
            (table[b' ' as usize], table[b'a' as usize]),
            ('\u{120}', 'a')
        );
    }

    #[test]
    fn tokenizers_are_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<ClipTokenizer>();
        check::<T5Tokenizer>();
    }
}
