//! `fluxfit quantize`: a flow model or T5 encoder → a GGUF in a quantized storage type,
//! streamed tensor by tensor (the library's `checkpoint::quantize`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fluxfit::checkpoint::gguf;
use fluxfit::checkpoint::layout::{open_flow, open_t5};
use fluxfit::checkpoint::quantize::{self, Component, QuantSpec, Reason};
use fluxfit::checkpoint::store::TensorStore;
use indicatif::{ProgressBar, ProgressStyle};

#[derive(Args, Debug)]
pub struct QuantizeArgs {
    /// The checkpoint: a flow model (BFL `flux1-*.safetensors`, a diffusers folder or its
    /// `transformer/`, fp8 or GGUF) or a T5 encoder (`text_encoder_2/` or a GGUF).
    #[arg(long = "in", value_name = "FILE|DIR")]
    pub input: PathBuf,
    /// The GGUF to write; never replaced if it exists.
    #[arg(long, value_name = "FILE.gguf")]
    pub out: PathBuf,
    /// Storage type of the matrices: q8_0, q6_k, q5_k, q5_1, q5_0, q4_k, q4_1, q4_0, q3_k,
    /// q2_k, f16, bf16 or f32. Vectors (norms, biases) stay f32; so do the flow model's
    /// embedders and final layer, and T5's relative attention bias, as in published files.
    #[arg(long = "type", value_name = "TYPE", default_value = "q8_0")]
    pub qtype: String,
    /// Another type for the tensors whose canonical name matches a glob (`*` any run of
    /// characters, `?` one), first match wins; repeatable. E.g.
    /// `--keep 'double_blocks.*.img_attn.*=q8_0'`.
    #[arg(long, value_name = "PATTERN=TYPE")]
    pub keep: Vec<String>,
    /// What the checkpoint is [default: told by its tensors].
    #[arg(long, value_enum)]
    pub component: Option<ComponentArg>,
    /// No progress bar.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ComponentArg {
    Flow,
    T5,
}

fn open(args: &QuantizeArgs) -> Result<(TensorStore, Component)> {
    let path = &args.input;
    let ctx = || format!("reading {}", path.display());
    match args.component {
        Some(ComponentArg::Flow) => Ok((open_flow(path).with_context(ctx)?, Component::Flow)),
        Some(ComponentArg::T5) => Ok((open_t5(path).with_context(ctx)?, Component::T5)),
        None => match open_flow(path) {
            Ok(s) => Ok((s, Component::Flow)),
            Err(flow) => match open_t5(path) {
                Ok(s) => Ok((s, Component::T5)),
                Err(t5) => bail!(
                    "{}: neither a FLUX flow model ({flow}) nor a T5 encoder ({t5})",
                    path.display()
                ),
            },
        },
    }
}

fn gb(bytes: usize) -> String {
    format!("{:.3} GB", bytes as f64 / 1e9)
}

pub fn run(args: QuantizeArgs) -> Result<()> {
    let out = &args.out;
    if !out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        bail!(
            "--out {}: fluxfit quantize writes GGUF files; name it *.gguf (standard output is not supported)",
            out.display()
        );
    }
    let folder = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    if !folder.is_dir() {
        bail!(
            "--out {}: folder {} does not exist",
            out.display(),
            folder.display()
        );
    }
    if args.out.symlink_metadata().is_ok() {
        bail!(
            "{} exists; fluxfit never replaces a file: remove it or choose another --out",
            args.out.display()
        );
    }
    let mut spec = QuantSpec::new(gguf::parse_type(&args.qtype).context("--type")?);
    for k in &args.keep {
        spec.keep
            .push(QuantSpec::parse_keep(k).with_context(|| format!("--keep {k}"))?);
    }
    let (store, component) = open(&args)?;
    let choices = quantize::plan(&store, component, &spec)?;

    // What each type will hold, and every fallback, before the long part.
    let mut by_type: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    let mut fallbacks: BTreeMap<(String, usize), Vec<&str>> = BTreeMap::new();
    for c in &choices {
        let e = by_type.entry(gguf::type_name(c.ggml)).or_default();
        e.0 += 1;
        e.1 += c.nbytes();
        if let Reason::Fallback { wanted, row } = c.reason {
            let note = format!("{} → {}", gguf::type_name(wanted), gguf::type_name(c.ggml));
            fallbacks.entry((note, row)).or_default().push(&c.key);
        }
    }
    if !args.quiet {
        errln!(
            "{}: {} tensors ({} architecture) → {}",
            args.input.display(),
            choices.len(),
            component.architecture(),
            args.out.display()
        );
        for (t, (n, bytes)) in &by_type {
            errln!("  {t:>5}: {n:>5} tensors, {}", gb(*bytes));
        }
        for ((note, row), keys) in &fallbacks {
            let wanted = note.split(' ').next().unwrap_or_default();
            let block = gguf::parse_type(wanted).map_or(0, |t| t.block_size());
            errln!(
                "note: {} tensors stored {note}: their rows of {row} are not a multiple of {block} (e.g. {})",
                keys.len(),
                keys[0]
            );
        }
    }

    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(choices.iter().map(|c| c.numel() as u64).sum());
        b.set_style(
            ProgressStyle::with_template(
                "quantize [{bar:30}] {percent:>3}%  {msg:40!}  {elapsed} eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    };
    let name = args
        .input
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let start = Instant::now();
    let summary = quantize::write(&store, component, &choices, &args.out, &name, |_, c| {
        bar.inc(c.numel() as u64);
        bar.set_message(c.key.clone());
    })
    .with_context(|| format!("writing {}", args.out.display()))?;
    bar.finish_and_clear();
    if !args.quiet {
        errln!(
            "wrote {}: {} tensors, {} ({:.2} bits per weight) from {} in {:.1} s",
            args.out.display(),
            summary.tensors,
            gb(summary.bytes_out),
            8.0 * summary.bytes_out as f64 / summary.params.max(1) as f64,
            gb(summary.bytes_in),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
