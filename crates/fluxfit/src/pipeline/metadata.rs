//! What an image records of how it was made: one PNG text chunk per field, plus the
//! `parameters` line of A1111 that many tools read. The CLI and the server write the same.

use super::{Model, Request};
use crate::noise::NoiseKind;

/// PNG text chunks: one per field, plus A1111's `parameters` line that many tools read.
pub fn metadata(model: &Model, req: &Request) -> Vec<(String, String)> {
    let dtype = format!("{:?}", model.dtype()).to_lowercase();
    let mut m: Vec<(String, String)> = vec![
        ("prompt".into(), req.prompt.clone()),
        ("seed".into(), req.seed.to_string()),
        ("steps".into(), req.steps.to_string()),
        ("guidance".into(), req.guidance.to_string()),
        ("width".into(), req.width.to_string()),
        ("height".into(), req.height.to_string()),
        ("model".into(), model.name.clone()),
        ("variant".into(), model.variant.name().into()),
        ("dtype".into(), dtype),
        ("t5_tokens".into(), req.t5_tokens.to_string()),
        ("plan".into(), model.plan().spec()),
        (
            "noise".into(),
            match req.noise {
                NoiseKind::TorchBf16 => "torch-2.6-bf16".into(),
                NoiseKind::TorchF32 => "torch-f32".into(),
            },
        ),
        ("software".into(), format!("fluxfit {}", crate::version())),
    ];
    if !model.loras.is_empty() {
        let name = |p: &std::path::Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        let list = |f: &dyn Fn(&crate::checkpoint::lora::LoraSummary) -> String| {
            model.loras.iter().map(f).collect::<Vec<_>>().join(", ")
        };
        m.push(("lora".into(), list(&|l| name(&l.path))));
        m.push(("lora_scale".into(), list(&|l| l.scale.to_string())));
        // A1111's `Lora hashes` (name: first 12 hex digits of the file's SHA-256).
        m.push((
            "lora_hashes".into(),
            list(&|l| format!("{}: {}", name(&l.path), l.hash)),
        ));
    }
    let hashes = m
        .iter()
        .find(|(k, _)| k == "lora_hashes")
        .map_or_else(String::new, |(_, v)| format!(", Lora hashes: \"{v}\""));
    m.push((
        "parameters".into(),
        format!(
            "{}\nSteps: {}, Sampler: Euler, Schedule: {}, Distilled CFG Scale: {}, Seed: {}, Size: {}x{}, Model: {}{hashes}, Version: fluxfit {}",
            req.prompt,
            req.steps,
            if model.variant.shift_schedule() { "flux-shift" } else { "linear" },
            req.guidance,
            req.seed,
            req.width,
            req.height,
            model.variant.name(),
            crate::version()
        ),
    ));
    m
}
