//! `fluxfit fill`: inpainting and outpainting with a FLUX.1 Fill model (spec §3 `prepare_fill`,
//! the fill demo's size rule and outpainting geometry, §4.3–4.4).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::image::{read_alpha_mask, read_mask, read_rgb8, resize_lanczos, resize_mask_lanczos};
use fluxfit::pipeline::fill::{
    fill_size, fill_tensors, outpaint_canvas, outpaint_geometry, Outpaint,
};

use crate::generate::{check_output, metadata};
use crate::run_args::{file_name, on_event, progress, write_image, RunArgs};

#[derive(Args, Debug)]
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
}

pub fn run(args: FillArgs) -> Result<()> {
    check_output(&args.out)?;
    let quiet = args.run.quiet;
    let src =
        read_rgb8(&args.image).with_context(|| format!("--image {}", args.image.display()))?;
    let (w, h) = if args.keep_size {
        if !src.width.is_multiple_of(32) || !src.height.is_multiple_of(32) {
            bail!(
                "--keep-size: {} is {}x{}; fill needs sides that are multiples of 32",
                args.image.display(),
                src.width,
                src.height
            );
        }
        (src.width, src.height)
    } else {
        fill_size(src.width, src.height)
    };
    let img = resize_lanczos(&src, w, h);
    if (w, h) != (src.width, src.height) && !quiet {
        eprintln!("image {}x{} resized to {w}x{h}", src.width, src.height);
    }
    let outpaint = match (&args.outpaint, args.zoom_out) {
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
    let (canvas, mask, mask_source) = if let Some(o) = &outpaint {
        let g = outpaint_geometry(w, h, o);
        let (c, m) = outpaint_canvas(&img, &g);
        let desc = format!(
            "outpaint left={},right={},up={},down={},overlap={},zoom={}; canvas {}x{}, image at {},{}",
            o.left, o.right, o.up, o.down, o.overlap, o.zoom, g.canvas.0, g.canvas.1, g.paste.0, g.paste.1
        );
        (c, m, desc)
    } else if let Some(path) = &args.mask {
        let (mw, mh, m) = read_mask(path).with_context(|| format!("--mask {}", path.display()))?;
        if (mw, mh) != (src.width, src.height) {
            bail!(
                "--mask {} is {mw}x{mh}, the image {}x{}: they must have the same size",
                path.display(),
                src.width,
                src.height
            );
        }
        (
            img,
            resize_mask_lanczos(&m, (mw, mh), (w, h)),
            file_name(path),
        )
    } else {
        let Some(m) = read_alpha_mask(&args.image)? else {
            bail!(
                "{} has no alpha channel: give a --mask, or --outpaint / --zoom-out",
                args.image.display()
            );
        };
        (
            img,
            resize_mask_lanczos(&m, (src.width, src.height), (w, h)),
            "alpha".to_string(),
        )
    };

    let model = args.run.load((canvas.width, canvas.height))?;
    let req = args
        .run
        .request(&model, &args.prompt, canvas.width, canvas.height);
    req.validate(false)?;
    if !quiet {
        eprintln!(
            "{} | {}x{} | {} steps | guidance {} | seed {} | mask: {mask_source}",
            model.name, req.width, req.height, req.steps, req.guidance, req.seed
        );
    }
    let (image, mask_t) = fill_tensors(&canvas, &mask)?;
    let bar = progress(quiet);
    let out = model.fill(&req, &image, &mask_t, None, &mut on_event(&bar))?;
    bar.finish_and_clear();
    let mut meta = metadata(&model, &req);
    meta.push(("fill_image".into(), file_name(&args.image)));
    meta.push(("fill_mask".into(), mask_source));
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
