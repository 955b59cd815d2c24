//! `fluxfit edit`: instruction editing with FLUX.1 Kontext (spec §3 `prepare_kontext`, the
//! kontext CLI's sizes, §4.3).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::image::{read_rgb8, resize_lanczos};
use fluxfit::pipeline::kontext::{aspect_ratio_size, conditioning_size, image_tensor};

use crate::generate::{check_output, metadata};
use crate::plan::Quant;
use crate::run_args::{file_name, on_event, progress, write_image, Planning, RunArgs};

#[derive(Args, Debug)]
pub struct EditArgs {
    /// The image to edit (PNG or JPEG). It is resized (Lanczos) to the Kontext resolution of
    /// closest aspect ratio (17 sizes of about 1 MP), as the reference does.
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The edit, as an instruction: "replace the logo with the text 'fluxfit'".
    #[arg(long)]
    pub prompt: String,
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
}

pub fn run(args: EditArgs) -> Result<()> {
    check_output(&args.out)?;
    let quiet = args.run.quiet;
    let src =
        read_rgb8(&args.image).with_context(|| format!("--image {}", args.image.display()))?;
    let (cw, ch) = if args.keep_size {
        (src.width / 16 * 16, src.height / 16 * 16)
    } else {
        conditioning_size(src.width, src.height)
    };
    if cw < 16 || ch < 16 {
        bail!(
            "--image {} is {}x{}: smaller than 16 pixels a side",
            args.image.display(),
            src.width,
            src.height
        );
    }
    let cond = resize_lanczos(&src, cw, ch);
    if (cw, ch) != (src.width, src.height) && !quiet {
        eprintln!(
            "conditioning image {}x{} resized to {cw}x{ch}",
            src.width, src.height
        );
    }
    let (w, h) = match &args.aspect_ratio {
        Some(ar) => aspect_ratio_size(ar).with_context(|| format!("--aspect-ratio {ar}"))?,
        None => (
            args.width.unwrap_or(cw) / 16 * 16,
            args.height.unwrap_or(ch) / 16 * 16,
        ),
    };
    // The planner sees both token sets: the target's and the conditioning image's.
    let model = args.run.load_planned(Planning {
        width: Some(w),
        height: Some(h),
        image_input: true,
        cond_size: Some((cw, ch)),
        quant: Quant::Auto,
        attn_chunk: Some(fluxfit::model::attention::DEFAULT_CHUNK),
    })?;
    let req = args.run.request(&model, &args.prompt, w, h);
    req.validate(false)?;
    if !quiet {
        eprintln!(
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
    let bar = progress(quiet);
    let out = model.kontext(&req, &image_tensor(&cond)?, None, &mut on_event(&bar))?;
    bar.finish_and_clear();
    let mut meta = metadata(&model, &req);
    meta.push(("edit_image".into(), file_name(&args.image)));
    meta.push(("edit_image_size".into(), format!("{cw}x{ch}")));
    if let Some(ar) = &args.aspect_ratio {
        meta.push(("aspect_ratio".into(), ar.clone()));
    }
    let path = write_image(&out.image, &args.out, &meta)?;
    println!(
        "wrote {} ({}x{}, seed {})",
        path.display(),
        req.width,
        req.height,
        req.seed
    );
    Ok(())
}
