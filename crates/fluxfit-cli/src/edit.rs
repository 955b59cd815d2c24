//! `fluxfit edit`: instruction editing with FLUX.1 Kontext (docs/flux.md §3 `prepare_kontext`, the
//! kontext CLI's sizes, §4.3).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::image::{read_rgb8, resize_lanczos, Rgb8};
use fluxfit::pipeline::kontext::{aspect_ratio_size, conditioning_size, image_tensor};
use fluxfit::pipeline::{Model, Request};

use crate::generate::check_output;
use crate::run_args::{
    file_name, interactive_loop, loop_integer, on_event, progress, write_image, LoopEvent,
    Planning, RunArgs,
};
use fluxfit::planner::choice::Quant;

#[derive(Args, Debug)]
pub struct EditArgs {
    /// The image to edit (PNG or JPEG). It is resized (Lanczos) to the Kontext resolution of
    /// closest aspect ratio (17 sizes of about 1 MP), as the reference does.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The edit, as an instruction: "replace the logo with the text 'fluxfit'" (with --loop,
    /// they come from stdin).
    #[arg(long, required_unless_present = "interactive")]
    pub prompt: Option<String>,
    /// Output aspect ratio W:H at about 1 MP (16:9 → 1360x768) [default: the input's, after
    /// snapping].
    #[arg(long, value_name = "W:H", conflicts_with_all = ["width", "height"])]
    pub aspect_ratio: Option<String>,
    /// Output width, floored to a multiple of 16 [default: the conditioning image's].
    #[arg(long)]
    pub width: Option<usize>,
    /// Output height, floored to a multiple of 16 [default: the conditioning image's].
    #[arg(long)]
    pub height: Option<usize>,
    /// Encode the image at its own size (floored to multiples of 16) instead of snapping it to
    /// a Kontext resolution: fewer tokens, but sizes the model was not trained on.
    #[arg(long)]
    pub keep_size: bool,
    #[command(flatten)]
    pub run: RunArgs,
    /// Output file (.png, or .jpg/.jpeg); an existing file is never replaced.
    #[arg(long, default_value = "edit.png")]
    pub out: PathBuf,
    /// Interactive: edit instructions from stdin, with /i /ar /w /h /s /g /n /q commands
    /// (/help lists them), the model loaded once.
    #[arg(long = "loop")]
    pub interactive: bool,
}

/// The conditioning image as it is encoded: snapped to a Kontext resolution (or, with
/// `--keep-size`, floored to multiples of 16) and resized with Lanczos.
fn conditioning(path: &Path, keep_size: bool, quiet: bool) -> Result<Rgb8> {
    let src = read_rgb8(path).with_context(|| format!("--image {}", path.display()))?;
    let (cw, ch) = if keep_size {
        (src.width / 16 * 16, src.height / 16 * 16)
    } else {
        conditioning_size(src.width, src.height)
    };
    if cw < 16 || ch < 16 {
        bail!(
            "--image {} is {}x{}: smaller than 16 pixels a side",
            path.display(),
            src.width,
            src.height
        );
    }
    if (cw, ch) != (src.width, src.height) && !quiet {
        errln!(
            "conditioning image {}x{} resized to {cw}x{ch}",
            src.width,
            src.height
        );
    }
    Ok(resize_lanczos(&src, cw, ch))
}

/// The output size: the aspect ratio's, else the given sides, else the conditioning image's.
fn target_size(args: &EditArgs, cond: &Rgb8) -> Result<(usize, usize)> {
    Ok(match &args.aspect_ratio {
        Some(ar) => aspect_ratio_size(ar).with_context(|| format!("--aspect-ratio {ar}"))?,
        None => {
            // The sides as typed (or the image's), before flooring.
            let (w, h) = (
                args.width.unwrap_or(cond.width),
                args.height.unwrap_or(cond.height),
            );
            fluxfit::pipeline::request::check_sides(w, h, false).with_context(|| {
                match (args.width, args.height) {
                    (None, None) => {
                        format!("the output takes --image {}'s size", args.image.display())
                    }
                    _ => "--width/--height".to_string(),
                }
            })?;
            (w / 16 * 16, h / 16 * 16)
        }
    })
}

pub fn run(mut args: EditArgs) -> Result<()> {
    check_output(&args.out)?;
    let quiet = args.run.quiet;
    let mut cond = conditioning(&args.image, args.keep_size, quiet)?;
    let (w, h) = target_size(&args, &cond)?;
    // The planner sees both token sets: the target's and the conditioning image's.
    let model = args.run.load_planned(Planning {
        width: Some(w),
        height: Some(h),
        image_input: true,
        cond_size: Some((cond.width, cond.height)),
        redux: None,
        redux_images: 0,
        quant: Quant::Stored,
        attn_chunk: Some(fluxfit::model::attention::DEFAULT_CHUNK),
    })?;
    let req = args
        .run
        .request(&model, args.prompt.as_deref().unwrap_or_default(), w, h);
    if !args.interactive {
        req.validate(false)?;
        return edit_one(&model, &req, &args, &cond).map(|_| ());
    }
    let seed = args.run.seed;
    interactive_loop(LOOP_HELP, req, seed, |event| {
        match event {
            LoopEvent::Command { name, value, .. } => match name {
                "i" => {
                    let path = PathBuf::from(value);
                    cond = conditioning(&path, args.keep_size, quiet)?;
                    args.image = path;
                }
                "ar" => {
                    if value != "auto" {
                        let (w, h) = aspect_ratio_size(value)?;
                        errln!("{w}x{h} ({:.2} MP)", (w * h) as f64 / 1e6);
                    }
                    args.aspect_ratio = (value != "auto").then(|| value.to_string());
                    args.width = None;
                    args.height = None;
                }
                "w" | "h" => {
                    let side = match value {
                        "auto" => None,
                        v => loop_integer(name, v, "pixels")
                            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
                    };
                    args.aspect_ratio = None;
                    if name == "w" {
                        args.width = side;
                    } else {
                        args.height = side;
                    }
                }
                _ => return Ok(false),
            },
            LoopEvent::Run(req) => {
                let mut req = req.clone();
                (req.width, req.height) = target_size(&args, &cond)?;
                req.validate(false)?;
                edit_one(&model, &req, &args, &cond)?;
            }
        }
        Ok(true)
    })
}

const LOOP_HELP: &str = "Enter an edit instruction (empty: repeat the last one), or a command:
  /i <file>       the next image to edit
  /ar <W:H|auto>  output aspect ratio at about 1 MP (auto: the image's size)
  /w, /h <px|auto> output width, height (floored to a multiple of 16)
  /s <seed>       seed of the next image (otherwise random)
  /g <x>          guidance
  /n <steps>      steps
  /help           this text
  /q              quit";

/// One edit of `cond` for `req`, written with its metadata.
fn edit_one(model: &Model, req: &Request, args: &EditArgs, cond: &Rgb8) -> Result<PathBuf> {
    let (cw, ch) = (cond.width, cond.height);
    if !args.run.quiet {
        errln!(
            "{} | {}x{} from a {cw}x{ch} image | {} steps | guidance {} | seed {} | plan {}",
            model.name,
            req.width,
            req.height,
            req.steps,
            req.guidance,
            req.seed,
            model.plan().spec()
        );
    }
    let bar = progress(args.run.quiet);
    let out = model.kontext(req, &image_tensor(cond)?, None, &mut on_event(&bar))?;
    bar.finish_and_clear();
    let mut meta = fluxfit::pipeline::metadata::metadata(model, req);
    meta.push(("edit_image".into(), file_name(&args.image)));
    meta.push(("edit_image_size".into(), format!("{cw}x{ch}")));
    if let Some(ar) = &args.aspect_ratio {
        meta.push(("aspect_ratio".into(), ar.clone()));
    }
    let path = write_image(&out.image, &args.out, &meta, req)?;
    Ok(path)
}
