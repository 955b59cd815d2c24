//! The bodies of the fuzz targets (`fuzz/`, run with `tools/fuzz.sh`): every parser of
//! untrusted bytes, each fed arbitrary input. A target may return an error, never panic, hang
//! or allocate without bound. The engine tests replay the committed corpus through the same
//! functions on the stable toolchain (`tests/engine/fuzz_corpus.rs`), so a crash once found
//! stays fixed.

use std::path::Path;

use crate::checkpoint::gguf::GgufFile;
use crate::checkpoint::layout::shard_names;
use crate::checkpoint::lora::keys;
use crate::checkpoint::safetensors::SafetensorsFile;
use crate::checkpoint::store::TensorStore;
use crate::memory::plan::Plan;
use crate::pipeline::fill::Outpaint;
use crate::pipeline::kontext::aspect_ratio_size;
use crate::tokenizer::{ClipTokenizer, T5Tokenizer};

/// A target: arbitrary bytes in, nothing out (an error is fine, a panic is a finding).
pub type Target = fn(&[u8]);

/// Every target, by the name its corpus folder has.
pub const TARGETS: &[(&str, Target)] = &[
    ("safetensors", safetensors),
    ("gguf", gguf),
    ("shard_index", shard_index),
    ("t5_tokenizer", t5_tokenizer),
    ("clip_bpe", clip_bpe),
    ("tokenize", tokenize),
    ("lora_keys", lora_keys),
    ("specs", specs),
    ("image", image),
];

/// A safetensors header and data section, then the store built over it.
pub fn safetensors(data: &[u8]) {
    if let Ok(file) = SafetensorsFile::from_bytes("<fuzz>", data.to_vec()) {
        let store = TensorStore::from_files("<fuzz>", vec![file], &[]);
        for key in store.keys() {
            let _ = store.info(key).map(|i| i.nbytes());
        }
    }
}

/// A GGUF file (written to a temporary file: GGUF files are memory-mapped).
pub fn gguf(data: &[u8]) {
    let path = std::env::temp_dir().join(format!("fluxfit-fuzz-{}.gguf", std::process::id()));
    if std::fs::write(&path, data).is_ok() {
        if let Ok(file) = GgufFile::open(&path) {
            let _ = TensorStore::from_gguf("<fuzz>", file, |n| Some(n.to_string()));
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// A sharded checkpoint's `*.safetensors.index.json`.
pub fn shard_index(data: &[u8]) {
    if let Ok(names) = shard_names(Path::new("<fuzz>"), data) {
        for n in names {
            let leaves = Path::new(&n).components().any(|c| {
                !matches!(
                    c,
                    std::path::Component::Normal(_) | std::path::Component::CurDir
                )
            });
            assert!(!leaves, "a shard name leaves its folder: {n}");
        }
    }
}

/// A T5 `tokenizer.json`, then a prompt through it.
pub fn t5_tokenizer(data: &[u8]) {
    if let Ok(t) = T5Tokenizer::from_bytes(data) {
        let _ = t.encode("a photo of a fox", 16);
    }
}

/// OpenCLIP's gzipped BPE merges, then a prompt through them.
pub fn clip_bpe(data: &[u8]) {
    if let Ok(t) = ClipTokenizer::from_open_clip_bpe_gz(data) {
        let _ = t.encode("a photo of a fox", 77);
    }
}

/// Arbitrary text through the built-in tiny model's tokenizers.
pub fn tokenize(data: &[u8]) {
    static TOKENIZERS: std::sync::OnceLock<(T5Tokenizer, ClipTokenizer)> =
        std::sync::OnceLock::new();
    let text = String::from_utf8_lossy(data);
    let (t5, clip) = TOKENIZERS.get_or_init(crate::pipeline::tiny::tokenizers);
    let _ = t5.encode(&text, 64);
    let _ = clip.encode(&text, 77);
}

/// A LoRA file's key names (one per line): layout detection, refusal, module grouping.
pub fn lora_keys(data: &[u8]) {
    let names: Vec<String> = String::from_utf8_lossy(data)
        .lines()
        .map(String::from)
        .collect();
    let _ = keys::refusal(&names);
    let _ = keys::parse(&names);
}

/// The user-typed specs: `--plan`, `--outpaint`, Kontext's `--aspect-ratio`.
pub fn specs(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let _ = Plan::resident(candle_core::DType::F32, None).with_spec(&text);
    let _ = Outpaint::default().parse_over(&text);
    let _ = aspect_ratio_size(&text);
}

/// An uploaded image under the server's limits.
pub fn image(data: &[u8]) {
    let _ = crate::image::decode_bytes("<fuzz>", data, 1024, 64 << 20);
}
