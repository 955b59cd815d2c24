//! `fluxfit fill`: inpainting and outpainting with a FLUX.1 Fill model (docs/flux.md §3 `prepare_fill`,
//! the fill demo's size rule and outpainting geometry, §4.3–4.4).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::image::Rgb8;
use fluxfit::image::{read_alpha_mask, read_mask, read_rgb8};
use fluxfit::pipeline::fill::{fill_canvas, fill_tensors, MaskFrom, Outpaint};
use fluxfit::pipeline::{Model, Request};

use crate::generate::check_output;
use crate::run_args::{
    file_name, interactive_loop, on_event, progress, write_image, LoopEvent, RunArgs,
};

#[derive(Args, Debug, Clone)]
pub struct FillArgs {
    /// The image to fill (PNG or JPEG). Resized as the reference demo does: within 0.5–2 MP
    /// only its sides are rounded to multiples of 32, outside it is scaled into that range.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The mask (white = generate, black = keep; greyscale, soft values kept), the image's size.
    /// Without it (and without --outpaint/--zoom-out) the image's alpha channel is the mask:
    /// transparent = generate.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["outpaint", "zoom_out"])]
    pub mask: Option<PathBuf>,
    /// Outpaint: borders as fractions of the image's sides, and the overlap kept for blending,
    /// e.g. `left=0.25,right=0.25,up=0,down=0,overlap=0.05` (unset sides 0, overlap 0.05).
    #[arg(long, value_name = "SPEC")]
    pub outpaint: Option<String>,
    /// Outpaint: zoom out by this factor (> 1), adding (Z − 1)/2 of each side on every side.
    #[arg(long, value_name = "Z")]
    pub zoom_out: Option<f64>,
    /// What to draw in the masked area.
    #[arg(long, default_value = "")]
    pub prompt: String,
    #[command(flatten)]
    pub run: RunArgs,
    /// Output file (.png, or .jpg/.jpeg); an existing file is never replaced.
    #[arg(long, default_value = "fill.png")]
    pub out: PathBuf,
    /// Keep the image's size instead of the demo's 0.5–2 MP rule (its sides must then be
    /// multiples of 32).
    #[arg(long)]
    pub keep_size: bool,
    /// Interactive: prompts from stdin with /i /m /s /g /n /q commands (/help lists them), the
    /// model loaded once.
    #[arg(long = "loop")]
    pub interactive: bool,
}

/// The canvas, its mask (255 = generate) and the mask's description, from the image and
/// the mask flags as the demo makes them.
fn prepare(args: &FillArgs) -> Result<(Rgb8, Vec<u8>, String)> {
    let quiet = args.run.quiet;
    let src =
        read_rgb8(&args.image).with_context(|| format!("--image {}", args.image.display()))?;
    let how = match (&args.outpaint, args.zoom_out) {
        (None, None) => None,
        (spec, zoom) => {
            let mut o = Outpaint::default();
            if let Some(z) = zoom {
                if !(1.0..=4.0).contains(&z) {
                    bail!("--zoom-out {z}: expected a factor from 1 to 4");
                }
                o.zoom = z;
            }
            if let Some(s) = spec {
                o = o.parse_over(s).with_context(|| format!("--outpaint {s}"))?;
            }
            Some(o)
        }
    };
    let (mask, alpha);
    let from = match (how, &args.mask) {
        (Some(o), _) => MaskFrom::Outpaint(o),
        (None, Some(path)) => {
            let (mw, mh, m) =
                read_mask(path).with_context(|| format!("--mask {}", path.display()))?;
            mask = m;
            MaskFrom::Mask(&mask, (mw, mh), file_name(path))
        }
        (None, None) => {
            let Some(m) = read_alpha_mask(&args.image)? else {
                bail!(
                    "{} has no alpha channel: give a --mask, or --outpaint / --zoom-out",
                    args.image.display()
                );
            };
            alpha = m;
            MaskFrom::Alpha(&alpha)
        }
    };
    let (canvas, m, desc) = fill_canvas(&src, from, args.keep_size)
        .with_context(|| format!("--image {}", args.image.display()))?;
    if !quiet && desc.starts_with("outpaint") {
        errln!("{desc}");
    } else if (canvas.width, canvas.height) != (src.width, src.height) && !quiet {
        errln!(
            "image {}x{} resized to {}x{}",
            src.width,
            src.height,
            canvas.width,
            canvas.height
        );
    }
    Ok((canvas, m, desc))
}

pub fn run(mut args: FillArgs) -> Result<()> {
    check_output(&args.out)?;
    let (mut canvas, mut mask, mut source) = prepare(&args)?;
    let model = args.run.load((canvas.width, canvas.height))?;
    let req = args
        .run
        .request(&model, &args.prompt, canvas.width, canvas.height);
    if !args.interactive {
        req.validate(false)?;
        return fill_one(&model, &req, &args, &canvas, &mask, &source).map(|_| ());
    }
    let seed = args.run.seed;
    interactive_loop(LOOP_HELP, req, seed, |event| {
        match event {
            LoopEvent::Command { name, value, req } => match name {
                "i" | "m" => {
                    let mut next = args.clone();
                    let path = PathBuf::from(value);
                    if name == "i" {
                        next.image = path;
                    } else {
                        // A mask replaces outpainting.
                        (next.mask, next.outpaint, next.zoom_out) = (Some(path), None, None);
                    }
                    (canvas, mask, source) = prepare(&next)?;
                    args = next;
                    (req.width, req.height) = (canvas.width, canvas.height);
                }
                _ => return Ok(false),
            },
            LoopEvent::Run(req) => {
                req.validate(false)?;
                fill_one(&model, req, &args, &canvas, &mask, &source)?;
            }
        }
        Ok(true)
    })
}

const LOOP_HELP: &str =
    "Enter what to draw in the masked area (empty: repeat the last one), or a command:
  /i <file>  the next image (the mask flags as given: its alpha, or the outpaint borders)
  /m <file>  the next mask (the image's size; it ends outpainting)
  /s <seed>  seed of the next image (otherwise random)
  /g <x>     guidance
  /n <steps> steps
  /help      this text
  /q         quit";

/// One fill of `canvas` where `mask` says, written with its metadata.
fn fill_one(
    model: &Model,
    req: &Request,
    args: &FillArgs,
    canvas: &Rgb8,
    mask: &[u8],
    mask_source: &str,
) -> Result<PathBuf> {
    if !args.run.quiet {
        errln!(
            "{} | {}x{} | {} steps | guidance {} | seed {} | mask: {mask_source}",
            model.name,
            req.width,
            req.height,
            req.steps,
            req.guidance,
            req.seed
        );
    }
    let (image, mask_t) = fill_tensors(canvas, mask)?;
    let bar = progress(args.run.quiet);
    let out = model.fill(req, &image, &mask_t, None, &mut on_event(&bar))?;
    bar.finish_and_clear();
    let mut meta = fluxfit::pipeline::metadata::metadata(model, req);
    meta.push(("fill_image".into(), file_name(&args.image)));
    meta.push(("fill_mask".into(), mask_source.to_string()));
    let path = write_image(&out.image, &args.out, &meta, req)?;
    Ok(path)
}
