//! `fluxfit generate`: text to image, once or in the reference's interactive loop.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use fluxfit::image::{
    init_image, next_free_path, read_rgb8, resize_lanczos, save, to_rgb8, Format,
};
use fluxfit::memory::ledger::MemoryReport;
use fluxfit::noise::{random_seed, NoiseKind};
use fluxfit::pipeline::control::canny_control;
use fluxfit::pipeline::kontext::image_tensor;
use fluxfit::pipeline::redux::{ReduxImage, MAX_IMAGES as MAX_REDUX_IMAGES};
use fluxfit::pipeline::request::MIN_SIDE;
use fluxfit::pipeline::{Event, ImageInit, Model, Request};
use fluxfit::variant::Variant;
use indicatif::{ProgressBar, ProgressStyle};

use crate::run_args::{interactive_loop, loop_integer, LoopEvent, Planning, RunArgs};

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to draw.
    #[arg(
        long,
        default_value = "a photo of a forest with mist swirling around the tree trunks"
    )]
    pub prompt: String,
    /// Image width in pixels, floored to a multiple of 16 [default: 1360, 256 for tiny].
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels, floored to a multiple of 16 [default: 768, 256 for tiny].
    #[arg(long)]
    pub height: Option<usize>,
    /// Noise as torch 2.6.0 draws it in bf16 (the reference's images), or torch's f32 `randn`.
    #[arg(long, value_enum, default_value = "bf16")]
    pub noise: NoiseArg,
    /// Attention query-chunk length (bounds the score buffer); 0 = unchunked.
    #[arg(long, default_value_t = fluxfit::model::attention::DEFAULT_CHUNK)]
    pub attn_chunk: usize,
    /// img2img: start from this image (PNG or JPEG) instead of pure noise. With --width or
    /// --height it is resized to the requested size (nearest, as the reference demo); without,
    /// cropped from the top-left to sides that are multiples of 16, which become the size.
    #[arg(long, value_name = "FILE")]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the schedule runs, in [0, 1] (1 ignores the image, 0 returns it):
    /// denoising starts at step int((1 − strength)·steps).
    #[arg(long, default_value_t = 0.8, requires = "init_image", value_parser = parse_strength)]
    pub strength: f64,
    /// Structural control with a FLUX.1 Canny or Depth model (or dev with a control --lora):
    /// the image is resized (Lanczos) to the output size; a Canny model is given its Canny
    /// edges (thresholds 50/200, as the reference), a Depth model the image itself as the
    /// depth map (fluxfit does not estimate depth). Without --width/--height the output takes
    /// the image's size, floored to multiples of 16.
    #[arg(long, value_name = "FILE", conflicts_with = "init_image")]
    pub control_image: Option<PathBuf>,
    /// Redux image variation (with dev or schnell; FLUX.1-Redux-dev): the image prompts the
    /// model through SigLIP, its tokens appended to the prompt's (the reference's prompt is
    /// empty: pass --prompt ""). Repeat to mix images (each adds 729 tokens, up to 8 images).
    /// `:STRENGTH` multiplies that image's tokens (0 to 10; default 1, the reference).
    #[arg(
        long = "redux-image",
        value_name = "FILE[:STRENGTH]",
        value_parser = parse_redux_image,
        conflicts_with = "control_image"
    )]
    pub redux_image: Vec<ReduxImageArg>,
    /// Redux's encoder: FLUX.1-Redux-dev's folder, or flux1-redux-dev.safetensors with an
    /// image_encoder/ folder beside it [default for dev and schnell: downloaded from
    /// black-forest-labs/FLUX.1-Redux-dev].
    #[arg(long, value_name = "FILE|DIR", requires = "redux_image")]
    pub redux: Option<PathBuf>,
    /// Redux's SigLIP vision tower, where it is not beside the projector (a SiglipVisionModel
    /// folder, or google/siglip-so400m-patch14-384's).
    #[arg(long, value_name = "FILE|DIR", requires = "redux_image")]
    pub siglip: Option<PathBuf>,
    /// Use --control-image as the control as is (an edge map you made), not its Canny edges.
    #[arg(long, requires = "control_image")]
    pub control_raw: bool,
    /// Storage of the flow and T5 weights on the device: `stored` (as the files are; with
    /// --vram GGUF weights may stay packed), `none` (never packed), a type (`q8_0`, `q6_k`,
    /// `q4_k`, ...: dense files quantized to it on load and kept packed), or with --vram `auto`
    /// (quantizing on load allowed: the least lossy storage within 10% of the fastest plan).
    #[arg(long, default_value = "stored")]
    pub quant: fluxfit::planner::choice::Quant,
    /// After the run, print what each phase held on the compute device: weights (from the
    /// ledger), activations and total peak (measured on the CPU).
    #[arg(long)]
    pub report_memory: bool,
    /// With --report-memory: print the report as one JSON object on stdout instead of a table.
    #[arg(long, requires = "report_memory")]
    pub json: bool,
    /// Output file (.png, or .jpg/.jpeg); an existing file is never replaced: the next free name is used.
    #[arg(long, default_value = "fluxfit.png")]
    pub out: PathBuf,
    /// Allow sides above 4096 pixels.
    #[arg(long)]
    pub allow_large: bool,
    /// Interactive: prompts from stdin, with /w /h /s /g /n /q commands (/help lists them).
    #[arg(long = "loop")]
    pub interactive: bool,
    #[command(flatten)]
    pub run: RunArgs,
}

/// One `--redux-image FILE[:STRENGTH]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReduxImageArg {
    pub path: PathBuf,
    pub strength: f64,
}

/// `FILE` or `FILE:STRENGTH`; a path that exists as given wins over a colon inside it.
fn parse_redux_image(s: &str) -> std::result::Result<ReduxImageArg, String> {
    if let Some((path, strength)) = s.rsplit_once(':') {
        if !Path::new(s).exists() && !strength.contains(['/', '\\']) {
            return match strength.trim().parse::<f64>() {
                Ok(v) if v.is_finite() && (0.0..=10.0).contains(&v) => Ok(ReduxImageArg {
                    path: path.into(),
                    strength: v,
                }),
                _ => Err(format!(
                    "{s}: `{strength}` is not a Redux strength; give a number from 0 to 10 after the colon"
                )),
            };
        }
    }
    Ok(ReduxImageArg {
        path: s.into(),
        strength: 1.0,
    })
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum NoiseArg {
    Bf16,
    F32,
}

/// Floors a side to a multiple of 16 as the reference does, saying so when it changes.
fn floor16(name: &str, v: usize, quiet: bool) -> usize {
    let f = v / 16 * 16;
    if f != v && !quiet {
        errln!("{name} {v} floored to {f} (a multiple of 16)");
    }
    f
}

/// Fails early, before any compute, if the output cannot be written.
pub(crate) fn check_output(path: &Path) -> Result<()> {
    if path.as_os_str() == "-" {
        bail!(
            "--out -: images are not written to standard output; give a file name such as out.png"
        );
    }
    if path.is_dir() || path.as_os_str().to_string_lossy().ends_with(['/', '\\']) {
        bail!(
            "--out {}: a folder; give a file name inside it, such as {}",
            path.display(),
            path.join("fluxfit.png").display()
        );
    }
    Format::from_path(path)?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.is_dir() {
        bail!(
            "output {}: {}",
            path.display(),
            if dir.exists() {
                format!("{} is not a folder", dir.display())
            } else {
                format!("folder {} does not exist", dir.display())
            }
        );
    }
    let probe = dir.join(format!(".fluxfit-write-test-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| {
        format!(
            "output {}: folder {} is not writable",
            path.display(),
            dir.display()
        )
    })?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

pub fn run(args: GenerateArgs) -> Result<()> {
    check_output(&args.out)?;
    // The sides as typed, before flooring or planning (a 63 is refused as 63, not as 48).
    fluxfit::pipeline::request::check_sides(
        args.width.unwrap_or(MIN_SIDE),
        args.height.unwrap_or(MIN_SIDE),
        args.allow_large,
    )
    .context("--width/--height")?;
    // A control image sets the default size, which the planner needs before loading.
    let control_size = match &args.control_image {
        Some(path) => {
            let img =
                read_rgb8(path).with_context(|| format!("--control-image {}", path.display()))?;
            let sized = args.width.is_some() && args.height.is_some();
            if !sized && (img.width < MIN_SIDE || img.height < MIN_SIDE) {
                bail!(
                    "--control-image {} is {}x{}: the output takes its size, and sides must be at \
                     least {MIN_SIDE} pixels; give --width and --height, or a larger image",
                    path.display(),
                    img.width,
                    img.height
                );
            }
            Some((img.width, img.height))
        }
        None => None,
    };
    // Redux images are read now: a bad one is named before anything loads.
    let redux_images = load_redux_images(&args)?;
    let redux = if redux_images.is_empty() {
        None
    } else {
        Some(crate::source::redux_paths(
            &args.run.model,
            args.redux.as_deref(),
            args.siglip.as_deref(),
        )?)
    };
    let mut model = args.run.load_planned(Planning {
        width: args.width.or(control_size.map(|s| s.0)),
        height: args.height.or(control_size.map(|s| s.1)),
        image_input: args.init_image.is_some() || args.control_image.is_some(),
        cond_size: None,
        redux,
        redux_images: redux_images.len(),
        quant: args.quant,
        attn_chunk: (args.attn_chunk > 0).then_some(args.attn_chunk),
    })?;
    let v = model.variant;
    let tiny = model.name.starts_with("tiny");
    let side_default = match control_size {
        Some(size) => size,
        None if tiny => (256, 256),
        None => (1360, 768),
    };
    let mut req = Request {
        prompt: args.prompt.clone(),
        width: floor16(
            "width",
            args.width.unwrap_or(side_default.0),
            args.run.quiet,
        ),
        height: floor16(
            "height",
            args.height.unwrap_or(side_default.1),
            args.run.quiet,
        ),
        steps: args.run.steps.unwrap_or(v.default_steps()),
        guidance: args.run.guidance.unwrap_or(v.default_guidance()),
        seed: 0,
        t5_tokens: args.run.t5_tokens.unwrap_or(v.t5_tokens()),
        noise: match args.noise {
            NoiseArg::Bf16 => NoiseKind::TorchBf16,
            NoiseArg::F32 => NoiseKind::TorchF32,
        },
    };
    if let Some(init) = load_init(&args, &req)? {
        // Cropped to multiples of 16 when no size was asked for: that is the size.
        let (_, _, h, w) = init.image.dims4()?;
        (req.width, req.height) = (w, h);
    }
    if !args.interactive {
        req.seed = args.run.seed.unwrap_or_else(random_seed);
        req.validate(args.allow_large)?;
        return match generate_one(&model, &req, &args) {
            Err(e) if !model.device().is_cpu() && out_of_memory(&e) => {
                retry_smaller(&mut model, &req, &args, e)
            }
            other => other.map(|_| ()),
        };
    }
    interactive(&model, req, args)
}

/// Once, after the device ran out of memory: the next smaller plan, said out loud.
fn retry_smaller(
    model: &mut Model,
    req: &Request,
    args: &GenerateArgs,
    e: anyhow::Error,
) -> Result<()> {
    let Some(smaller) = fluxfit::planner::choice::smaller_plan(model, req, model.plan()) else {
        return Err(e.context("the device ran out of memory and no smaller plan exists"));
    };
    errln!(
        "out of device memory under plan {} ({e:#}); retrying once with the smaller plan {}",
        model.plan().spec(),
        smaller.spec()
    );
    model.set_plan(smaller);
    generate_one(model, req, args).map(|_| ())
}

/// Whether the library said the device ran out of memory (a smaller plan may cure it).
fn out_of_memory(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<fluxfit::Error>()
            .is_some_and(fluxfit::Error::is_out_of_memory)
    })
}

fn parse_strength(s: &str) -> std::result::Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("`{s}` is not a strength: a number from 0 to 1")),
    }
}

/// The init image as the request needs it (see `--init-image`).
fn load_init(args: &GenerateArgs, req: &Request) -> Result<Option<ImageInit>> {
    let Some(path) = &args.init_image else {
        return Ok(None);
    };
    let rgb = read_rgb8(path).with_context(|| format!("--init-image {}", path.display()))?;
    // In the loop the size is the request's, whatever image comes next (`/i`).
    let resize = args.width.is_some() || args.height.is_some() || args.interactive;
    let image = init_image(&rgb, resize.then_some((req.width, req.height)))
        .with_context(|| format!("--init-image {}", path.display()))?;
    Ok(Some(ImageInit {
        image,
        strength: args.strength,
    }))
}

/// The `--redux-image` files, decoded (each is resized for SigLIP when it is encoded).
fn load_redux_images(args: &GenerateArgs) -> Result<Vec<ReduxImage>> {
    if args.redux_image.len() > MAX_REDUX_IMAGES {
        bail!(
            "--redux-image given {} times; Redux mixes at most {MAX_REDUX_IMAGES} images",
            args.redux_image.len()
        );
    }
    args.redux_image
        .iter()
        .map(|r| {
            let image = read_rgb8(&r.path)
                .with_context(|| format!("--redux-image {}", r.path.display()))?;
            Ok(ReduxImage {
                image,
                strength: r.strength,
            })
        })
        .collect()
}

/// The control image as the request needs it (see `--control-image`), and how it was made.
fn load_control(
    args: &GenerateArgs,
    model: &Model,
    req: &Request,
) -> Result<Option<(fluxfit::candle_core::Tensor, &'static str)>> {
    let Some(path) = &args.control_image else {
        return Ok(None);
    };
    let ctx = || format!("--control-image {}", path.display());
    let rgb = resize_lanczos(&read_rgb8(path).with_context(ctx)?, req.width, req.height);
    let (rgb, how) = if model.variant == Variant::DevCanny && !args.control_raw {
        (canny_control(&rgb), "canny 50/200")
    } else if model.variant == Variant::DevDepth {
        (rgb, "depth map as given")
    } else {
        (rgb, "as given")
    };
    Ok(Some((image_tensor(&rgb).with_context(ctx)?, how)))
}

fn report_memory(report: &MemoryReport, model: &Model, args: &GenerateArgs) -> Result<()> {
    if args.json {
        let v = serde_json::json!({ "plan": model.plan().spec(), "memory": report });
        crate::outln!("{}", serde_json::to_string(&v)?)?;
    } else {
        crate::outln!("plan {}", model.plan().spec())?;
        crate::out!("{}", report.table())?;
    }
    Ok(())
}

fn generate_one(model: &Model, req: &Request, args: &GenerateArgs) -> Result<PathBuf> {
    if !args.run.quiet {
        errln!(
            "{} | {}x{} | {} steps | guidance {} | seed {} | {:?} on {:?} | plan {}",
            model.name,
            req.width,
            req.height,
            req.steps,
            req.guidance,
            req.seed,
            model.dtype(),
            model.device(),
            model.plan().spec()
        );
    }
    let start = Instant::now();
    let bar = if args.run.quiet {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(req.steps as u64);
        b.set_style(
            ProgressStyle::with_template(
                "{msg:>8} [{bar:30}] {pos}/{len} steps  {per_sec}  eta {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    };
    let init = load_init(args, req)?;
    let mut on_event = |e| match e {
        Event::Phase(p) => bar.set_message(p.name()),
        Event::Step { step, total } => {
            bar.set_length(total as u64);
            bar.set_position(step as u64)
        }
    };
    let control = load_control(args, model, req)?;
    let redux = load_redux_images(args)?;
    let out = match (&init, &control) {
        _ if !redux.is_empty() => model.redux(req, &redux, init.as_ref(), None, &mut on_event)?,
        (Some(init), _) => model.image_to_image(req, init, None, &mut on_event)?,
        (None, Some((image, _))) => model.control(req, image, None, &mut on_event)?,
        (None, None) => model.text_to_image(req, &mut on_event)?,
    };
    bar.finish_and_clear();
    let rgb = to_rgb8(&out.image)?;
    let path = next_free_path(&args.out);
    if path != args.out && !args.run.quiet {
        errln!(
            "{} exists; writing {} instead",
            args.out.display(),
            path.display()
        );
    }
    let mut meta = fluxfit::pipeline::metadata::metadata(model, req);
    if let (Some(path), Some(init)) = (&args.init_image, &init) {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        meta.push(("init_image".into(), name));
        meta.push(("strength".into(), init.strength.to_string()));
    }
    if let (Some(path), Some((_, how))) = (&args.control_image, &control) {
        meta.push(("control_image".into(), crate::run_args::file_name(path)));
        meta.push(("control".into(), how.to_string()));
    }
    if !args.redux_image.is_empty() {
        let images: Vec<String> = args
            .redux_image
            .iter()
            .map(|r| format!("{}:{}", crate::run_args::file_name(&r.path), r.strength))
            .collect();
        meta.push(("redux_images".into(), images.join(", ")));
    }
    save(&rgb, &path, &meta)?;
    crate::outln!(
        "wrote {} ({}x{}, seed {}) in {:.1}s",
        path.display(),
        rgb.width,
        rgb.height,
        req.seed,
        start.elapsed().as_secs_f64()
    )?;
    if args.report_memory {
        report_memory(&out.memory, model, args)?;
    }
    Ok(path)
}

const LOOP_HELP: &str = "Enter a prompt to generate (empty: repeat the last one), or a command:
  /w <px>    width (floored to a multiple of 16)
  /h <px>    height (floored to a multiple of 16)
  /s <seed>  seed of the next image (otherwise random)
  /g <x>     guidance
  /n <steps> steps
  /i <file>  the next input image (with --init-image or --control-image)
  /help      this text
  /q         quit";

/// The reference's `--loop`: settings persist, the seed is reset after each image.
fn interactive(model: &Model, req: Request, mut args: GenerateArgs) -> Result<()> {
    let seed = args.run.seed;
    interactive_loop(LOOP_HELP, req, seed, |event| {
        match event {
            LoopEvent::Command { name, value, req } => match name {
                "i" => {
                    let slot = match (&mut args.init_image, &mut args.control_image) {
                        (Some(p), _) | (None, Some(p)) => p,
                        (None, None) => {
                            bail!("/i needs a run started with --init-image or --control-image")
                        }
                    };
                    let path = PathBuf::from(value);
                    if !path.is_file() {
                        bail!("/i {value}: no such file");
                    }
                    *slot = path;
                }
                "w" | "h" => {
                    let word = if name == "w" { "width" } else { "height" };
                    if let Some(n) = loop_integer(name, value, word) {
                        let side = floor16(word, n as usize, false);
                        if name == "w" {
                            req.width = side;
                        } else {
                            req.height = side;
                        }
                        errln!(
                            "{}x{} ({:.2} MP)",
                            req.width,
                            req.height,
                            (req.width * req.height) as f64 / 1e6
                        );
                    }
                }
                _ => return Ok(false),
            },
            LoopEvent::Run(req) => {
                req.validate(args.allow_large)?;
                generate_one(model, req, &args)?;
            }
        }
        Ok(true)
    })
}
