//! `fluxfit regions`: a canvas larger than one pass, made region by region (the guide's region
//! generation), or an enlarged image refined region by region (`--from small.png --scale 2`).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use fluxfit::image::{read_rgb8, resize_lanczos};
use fluxfit::pipeline::regions::{region_grid, Canvas, RegionEvent, RegionMode};

use crate::generate::check_output;
use crate::run_args::{file_name, progress, write_image, RunArgs};

#[derive(Args, Debug)]
pub struct RegionsArgs {
    /// What to draw.
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Canvas width, floored to a multiple of 16 [default: --from's width × --scale].
    #[arg(long)]
    pub width: Option<usize>,
    /// Canvas height, floored to a multiple of 16 [default: --from's height × --scale].
    #[arg(long)]
    pub height: Option<usize>,
    /// Region side in pixels (a multiple of 16): device memory is that of one region of this
    /// size, whatever the canvas [default: 1024, 256 for tiny].
    #[arg(long)]
    pub tile: Option<usize>,
    /// Least overlap of neighbouring regions in pixels; also how deep new pixels fade into
    /// finished ones.
    #[arg(long, default_value_t = 128)]
    pub overlap: usize,
    /// Refine this image instead of starting from nothing: it is enlarged (Lanczos) to the
    /// canvas, then each region is an img2img pass over the canvas as it stands.
    #[arg(long, value_name = "FILE")]
    pub from: Option<PathBuf>,
    /// With --from: enlargement factor when no --width/--height is given.
    #[arg(long, default_value_t = 2.0, requires = "from")]
    pub scale: f64,
    /// With --from: img2img strength of each region (0 keeps the enlarged image, 1 ignores it).
    #[arg(long, default_value_t = 0.35, requires = "from")]
    pub strength: f64,
    #[command(flatten)]
    pub run: RunArgs,
    /// Allow canvas sides above 16384 pixels.
    #[arg(long)]
    pub allow_large: bool,
    /// After the run, print each region's peak device memory (measured on the CPU).
    #[arg(long)]
    pub report_memory: bool,
    /// Output file (.png, or .jpg/.jpeg); an existing file is never replaced.
    #[arg(long, default_value = "regions.png")]
    pub out: PathBuf,
}

pub fn run(args: RegionsArgs) -> Result<()> {
    check_output(&args.out)?;
    let quiet = args.run.quiet;
    let source = match &args.from {
        Some(p) => Some(read_rgb8(p).with_context(|| format!("--from {}", p.display()))?),
        None => None,
    };
    let (w, h) = match (&source, args.width, args.height) {
        (_, Some(w), Some(h)) => (w, h),
        (Some(s), w, h) => {
            if !(args.scale > 0.0 && args.scale <= 16.0) {
                bail!(
                    "--scale {}: expected a factor above 0, at most 16",
                    args.scale
                );
            }
            (
                w.unwrap_or((s.width as f64 * args.scale) as usize),
                h.unwrap_or((s.height as f64 * args.scale) as usize),
            )
        }
        (None, _, _) => bail!("give the canvas size with --width and --height (or --from FILE)"),
    };
    const MAX_CANVAS: usize = 16384;
    // Even with --allow-large: the canvas is held whole (12 bytes a pixel in f32), and 65536²
    // is 48 GiB of it.
    const MAX_CANVAS_LARGE: usize = 65536;
    /// Regions one run may have: beyond it, a typo in --tile or --overlap runs for days.
    const MAX_REGIONS: usize = 4096;
    let (what, hint) = match &source {
        Some(_) => ("--from image scaled by --scale", "a smaller --scale"),
        None => ("--width/--height", "smaller sides"),
    };
    if w < fluxfit::pipeline::request::MIN_SIDE || h < fluxfit::pipeline::request::MIN_SIDE {
        bail!("{what}: the canvas {w}x{h} is below 64 pixels a side; use {hint}, or larger");
    }
    let (w, h) = (w / 16 * 16, h / 16 * 16);
    if (w > MAX_CANVAS || h > MAX_CANVAS) && !args.allow_large {
        bail!(
            "{what}: the canvas {w}x{h} has a side above {MAX_CANVAS} pixels; pass --allow-large if you mean it"
        );
    }
    if w > MAX_CANVAS_LARGE || h > MAX_CANVAS_LARGE {
        bail!(
            "{what}: the canvas {w}x{h} has a side above {MAX_CANVAS_LARGE} pixels, the limit even with --allow-large ({} GiB as f32); use {hint}",
            (12 * w as u128 * h as u128) >> 30
        );
    }
    // The built-in tiny model's default region is smaller, as its default image is.
    let tiny = args.run.model.model == "tiny" && args.run.model.flow.is_none();
    let tile = args.tile.unwrap_or(if tiny { 256 } else { 1024 });
    let grid = region_grid(w, h, tile, args.overlap)?;
    if grid.len() > MAX_REGIONS {
        bail!(
            "the canvas {w}x{h} in regions of {tile} with an overlap of {} is {} regions; at most {MAX_REGIONS}: give a larger --tile or a smaller canvas",
            args.overlap,
            grid.len()
        );
    }
    let model = args.run.load((tile.min(w), tile.min(h)))?;
    let mode = model.region_mode(source.as_ref().map(|_| args.strength))?;
    let mut canvas = match &source {
        Some(s) => Canvas::from_rgb8(&resize_lanczos(s, w, h))?,
        None => Canvas::blank(w, h),
    };
    let req = args.run.request(&model, &args.prompt, w, h);
    if !quiet {
        errln!(
            "{} | canvas {w}x{h} in {} regions of {}x{} ({:?}) | {} steps | guidance {} | seeds {}..{} | plan {}",
            model.name,
            grid.len(),
            grid[0].w,
            grid[0].h,
            mode,
            req.steps,
            req.guidance,
            req.seed,
            req.seed + grid.len() as u64 - 1,
            model.plan().spec()
        );
    }
    let bar = progress(quiet);
    let runs = model.regions(
        &req,
        &mut canvas,
        &grid,
        mode,
        args.overlap,
        &mut |e| match e {
            RegionEvent::Region { index, count, .. } => {
                bar.set_message(format!("{}/{count}", index + 1))
            }
            RegionEvent::Run(fluxfit::pipeline::Event::Step { step, total }) => {
                bar.set_length(total as u64);
                bar.set_position(step as u64)
            }
            RegionEvent::Run(_) => {}
        },
    )?;
    bar.finish_and_clear();
    let mut meta = fluxfit::pipeline::metadata::metadata(&model, &req);
    meta.push((
        "regions".into(),
        format!(
            "{} regions of {}x{}, overlap {}, seeds {}..{}, {:?}",
            grid.len(),
            grid[0].w,
            grid[0].h,
            args.overlap,
            req.seed,
            req.seed + grid.len() as u64 - 1,
            mode
        ),
    ));
    if let (Some(p), RegionMode::Refine { strength }) = (&args.from, mode) {
        meta.push(("regions_from".into(), file_name(p)));
        meta.push(("strength".into(), strength.to_string()));
    }
    write_image(&canvas.image()?, &args.out, &meta, &req)?;
    crate::outln!(
        "{} regions of {}x{}, seeds {}..{}",
        grid.len(),
        grid[0].w,
        grid[0].h,
        req.seed,
        req.seed + grid.len() as u64 - 1
    )?;
    if args.report_memory {
        crate::outln!("region  x     y     w     h     peak MiB")?;
        for (i, r) in runs.iter().enumerate() {
            crate::outln!(
                "{:<7} {:<5} {:<5} {:<5} {:<5} {:.1}",
                i,
                r.rect.x,
                r.rect.y,
                r.rect.w,
                r.rect.h,
                r.memory.peak as f64 / (1 << 20) as f64
            )?;
        }
        let peak = runs.iter().map(|r| r.memory.peak).max().unwrap_or(0);
        crate::outln!(
            "largest region peak {:.1} MiB",
            peak as f64 / (1 << 20) as f64
        )?;
    }
    Ok(())
}
