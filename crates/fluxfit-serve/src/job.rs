//! What a client asks for ([`JobSpec`], the JSON of `POST /v1/jobs`) and what the runner is
//! handed once it is checked and its images decoded ([`Work`]): every mistake is found here,
//! at submission, and answered with a 400 naming the field, before the job takes a queue slot.

use base64::Engine as _;
use fluxfit::candle_core::Tensor;
use fluxfit::image::{decode_bytes, init_image, luma, resize_lanczos, Decoded, Rgb8};
use fluxfit::noise::NoiseKind;
use fluxfit::pipeline::control::canny_control;
use fluxfit::pipeline::fill::{fill_canvas, MaskFrom, Outpaint};
use fluxfit::pipeline::kontext::{aspect_ratio_size, conditioning_size, image_tensor};
use fluxfit::pipeline::regions::{region_grid, Rect};
use fluxfit::pipeline::request::{MAX_SIDE, MIN_SIDE};
use fluxfit::pipeline::{ImageInit, Request};
use fluxfit::variant::Variant;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// The generation modes of `POST /v1/jobs`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Text to image.
    #[default]
    Generate,
    /// From an init image at a strength.
    Img2img,
    /// Structural control (Canny or Depth model).
    Control,
    /// Inpainting with a mask, or the image's alpha (Fill model).
    Fill,
    /// Outpainting: borders or zoom-out (Fill model).
    Outpaint,
    /// Instruction editing (Kontext model).
    Edit,
    /// A canvas larger than one pass, region by region; with an image, that image enlarged
    /// and refined region by region.
    Regions,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Generate => "generate",
            Mode::Img2img => "img2img",
            Mode::Control => "control",
            Mode::Fill => "fill",
            Mode::Outpaint => "outpaint",
            Mode::Edit => "edit",
            Mode::Regions => "regions",
        }
    }

    /// The model variants that run this mode.
    fn runs_on(self, v: Variant) -> bool {
        match self {
            Mode::Generate | Mode::Img2img => v.in_channels() == 64 && v != Variant::DevKontext,
            Mode::Control => matches!(v, Variant::DevCanny | Variant::DevDepth),
            Mode::Fill | Mode::Outpaint => v == Variant::DevFill,
            Mode::Edit => v == Variant::DevKontext,
            Mode::Regions => {
                (v.in_channels() == 64 && v != Variant::DevKontext) || v == Variant::DevFill
            }
        }
    }

    fn needs_image(self) -> bool {
        !matches!(self, Mode::Generate | Mode::Regions)
    }
}

/// Outpainting borders as fractions of the image's sides (as `fluxfit fill --outpaint`).
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Borders {
    #[serde(default)]
    pub left: f64,
    #[serde(default)]
    pub right: f64,
    #[serde(default)]
    pub up: f64,
    #[serde(default)]
    pub down: f64,
    pub overlap: Option<f64>,
    /// Zoom out by this factor (1 to 4).
    pub zoom: Option<f64>,
}

impl Borders {
    /// The outpainting they ask for, each value in its range (as `fluxfit fill --outpaint`).
    fn checked(self) -> Result<Outpaint, ApiError> {
        for (name, v, max) in [
            ("outpaint.left", self.left, 4.0),
            ("outpaint.right", self.right, 4.0),
            ("outpaint.up", self.up, 4.0),
            ("outpaint.down", self.down, 4.0),
        ] {
            if !(0.0..=max).contains(&v) {
                return Err(bad(name, format!("{v}: expected 0 to {max}")));
            }
        }
        let mut o = Outpaint {
            left: self.left,
            right: self.right,
            up: self.up,
            down: self.down,
            ..Outpaint::default()
        };
        if let Some(v) = self.overlap {
            if !(0.0..=0.5).contains(&v) {
                return Err(bad("outpaint.overlap", format!("{v}: expected 0 to 0.5")));
            }
            o.overlap = v;
        }
        if let Some(z) = self.zoom {
            if !(1.0..=4.0).contains(&z) {
                return Err(bad("outpaint.zoom", format!("{z}: expected 1 to 4")));
            }
            o.zoom = z;
        }
        if o.left + o.right + o.up + o.down == 0.0 && o.zoom <= 1.0 {
            return Err(bad(
                "outpaint",
                "no border to paint: give left, right, up, down or zoom",
            ));
        }
        Ok(o)
    }
}

/// The body of `POST /v1/jobs`. Unset fields take the model variant's defaults, as the CLI's.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    #[serde(default = "default_mode")]
    pub mode: Mode,
    #[serde(default)]
    pub prompt: String,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    pub seed: Option<u64>,
    /// The input image: base64 of a PNG or JPEG, or a `data:` URL.
    #[serde(skip_serializing)]
    pub image: Option<String>,
    /// Fill: the mask (white = generate), the image's size; without it the image's alpha.
    #[serde(skip_serializing)]
    pub mask: Option<String>,
    /// img2img: how much of the schedule runs, 0 to 1.
    pub strength: Option<f64>,
    /// Control: the image is the control as is (not its Canny edges).
    #[serde(default)]
    pub control_raw: bool,
    /// Outpaint: the borders.
    pub outpaint: Option<Borders>,
    /// Fill and edit: keep the image's size instead of the reference's size rule.
    #[serde(default)]
    pub keep_size: bool,
    /// Edit: the output's aspect ratio `W:H` at about 1 MP.
    pub aspect_ratio: Option<String>,
    /// Regions: the side of one region [default: the model's default image side].
    pub tile: Option<usize>,
    /// Regions: the overlap between regions, in pixels (default 128).
    pub overlap: Option<usize>,
}

/// Largest side of a regions canvas (as `fluxfit regions`).
const MAX_CANVAS: usize = 16384;
/// Most regions one job may have: beyond it a job would run for days.
const MAX_REGIONS: usize = 256;

fn default_mode() -> Mode {
    Mode::Generate
}

/// What the server knows of its model when it checks a job.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub name: String,
    pub variant: Variant,
    pub default_size: (usize, usize),
    pub default_steps: usize,
    pub default_guidance: f32,
    pub t5_tokens: usize,
    /// Sides above this are refused.
    pub max_side: usize,
    /// The LoRAs the model was loaded with: file name, scale, short hash.
    pub loras: Vec<(String, f64, String)>,
}

impl ModelInfo {
    /// A loaded model as jobs are checked against it: `max_side` and the defaults of
    /// `--steps`/`--guidance` (else the variant's).
    pub fn of(
        model: &fluxfit::pipeline::Model,
        max_side: usize,
        default_steps: Option<usize>,
        default_guidance: Option<f32>,
    ) -> Self {
        let tiny = model.name.starts_with("tiny");
        let v = model.variant;
        ModelInfo {
            loras: model
                .loras
                .iter()
                .map(|l| {
                    let name = l.path.file_name().map_or_else(
                        || l.path.display().to_string(),
                        |n| n.to_string_lossy().into_owned(),
                    );
                    (name, l.scale, l.hash.clone())
                })
                .collect(),
            name: model.name.clone(),
            variant: v,
            default_size: if tiny { (256, 256) } else { (1024, 1024) },
            default_steps: default_steps.unwrap_or(v.default_steps()),
            default_guidance: default_guidance.unwrap_or(v.default_guidance()),
            t5_tokens: v.t5_tokens(),
            max_side,
        }
    }
}

/// Limits on uploaded images.
#[derive(Debug, Clone, Copy)]
pub struct ImageLimits {
    pub max_side: u32,
    pub max_decoded_bytes: u64,
}

/// A checked job: the request and its decoded inputs, ready to run.
pub struct Work {
    pub mode: Mode,
    pub req: Request,
    pub input: Input,
    /// Metadata beside the request's own (the input's name and size, the mask's source, …).
    pub meta: Vec<(String, String)>,
}

/// A job's images, as the model's methods take them.
pub enum Input {
    None,
    Init(ImageInit),
    Control(Tensor),
    /// Canvas `[1, 3, H, W]` and mask `[1, 1, H, W]`.
    Fill(Tensor, Tensor),
    Edit(Tensor),
    /// The canvas (blank, or the enlarged image to refine at `refine` strength), its regions and
    /// their feathering band.
    Regions {
        /// The image to enlarge (to the request's size) and refine; the canvas itself is made
        /// when the job runs, so a queued job holds only the upload.
        source: Option<Rgb8>,
        grid: Vec<Rect>,
        refine: Option<f64>,
        band: usize,
    },
}

impl Work {
    /// What the job asks of a worker's memory: its kind of input and its image tokens (a
    /// 16×16-pixel patch each; for an edit, the output's and the conditioning image's
    /// together; for regions, one region's), compared with what a worker advertises.
    pub fn demand(&self) -> (crate::wire::FitKind, usize) {
        use crate::wire::FitKind;
        let t = |w: usize, h: usize| (w / 16) * (h / 16);
        let out = t(self.req.width, self.req.height);
        match &self.input {
            Input::None => (FitKind::Text, out),
            Input::Regions { grid, refine, .. } => {
                let r = grid.first().map_or(out, |g| t(g.w, g.h));
                let kind = if refine.is_some() {
                    FitKind::Image
                } else {
                    FitKind::Text
                };
                (kind, r)
            }
            Input::Edit(c) => {
                let d = c.dims();
                (FitKind::Edit, out + t(d[3], d[2]))
            }
            _ => (FitKind::Image, out),
        }
    }

    /// Whether an image is encoded in the encode phase, and the conditioning image's size
    /// where it is not the output's: what the planner needs to know.
    pub fn shape(&self) -> (bool, Option<(usize, usize)>) {
        match &self.input {
            Input::None => (false, None),
            Input::Regions { refine, .. } => (refine.is_some(), None),
            Input::Edit(t) => {
                let d = t.dims();
                (true, Some((d[3], d[2])))
            }
            _ => (true, None),
        }
    }
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// The bytes of a base64 field (plain or a `data:` URL).
pub fn base64_field(param: &str, text: &str) -> Result<Vec<u8>, ApiError> {
    let data = match text.strip_prefix("data:") {
        Some(rest) => rest
            .split_once(',')
            .map(|(_, d)| d)
            .ok_or_else(|| bad(param, "a data: URL without a comma"))?,
        None => text,
    };
    base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| bad(param, format!("not valid base64: {e}")))
}

fn decode(param: &str, bytes: &[u8], limits: ImageLimits) -> Result<Decoded, ApiError> {
    decode_bytes(param, bytes, limits.max_side, limits.max_decoded_bytes)
        .map_err(|e| lib_error(param, e))
}

/// The library's refusal as a 400 for `param`, its message without repeating the field.
fn lib_error(param: &str, e: fluxfit::Error) -> ApiError {
    let text = match e {
        fluxfit::Error::InvalidRequest(m) => m,
        e => e.to_string(),
    };
    let text = text
        .strip_prefix(param)
        .and_then(|t| t.strip_prefix(": "))
        .map(str::to_string)
        .unwrap_or(text);
    bad(param, text)
}

/// Floors a side to a multiple of 16 and checks it against the limits.
fn side(param: &str, v: usize, max: usize) -> Result<usize, ApiError> {
    let f = v / 16 * 16;
    if f < MIN_SIDE {
        return Err(bad(
            param,
            format!("{v} is below the minimum of {MIN_SIDE} pixels"),
        ));
    }
    if f > max {
        return Err(bad(
            param,
            format!("{v} is above this server's {max} pixels"),
        ));
    }
    Ok(f)
}

impl JobSpec {
    /// A field another mode takes is an error here, not silently ignored: the client meant
    /// something the image would not show.
    fn refuse_foreign_fields(&self) -> Result<(), ApiError> {
        use Mode::*;
        let m = self.mode;
        let given: [(&str, bool, &[Mode]); 9] = [
            (
                "image",
                self.image.is_some(),
                &[Img2img, Control, Fill, Outpaint, Edit, Regions],
            ),
            ("mask", self.mask.is_some(), &[Fill]),
            ("strength", self.strength.is_some(), &[Img2img, Regions]),
            ("control_raw", self.control_raw, &[Control]),
            ("outpaint", self.outpaint.is_some(), &[Outpaint]),
            ("keep_size", self.keep_size, &[Fill, Outpaint, Edit]),
            ("aspect_ratio", self.aspect_ratio.is_some(), &[Edit]),
            ("tile", self.tile.is_some(), &[Regions]),
            ("overlap", self.overlap.is_some(), &[Regions]),
        ];
        for (field, set, modes) in given {
            if set && !modes.contains(&m) {
                let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
                return Err(bad(
                    field,
                    format!(
                        "{} takes no {field} (it is for {})",
                        m.name(),
                        names.join(", ")
                    ),
                ));
            }
        }
        // Fill and outpaint sizes come from the image (the demo's size rule).
        if matches!(m, Fill | Outpaint) {
            for (field, v) in [("width", self.width), ("height", self.height)] {
                if v.is_some() {
                    return Err(bad(
                        field,
                        format!(
                            "{} takes its size from the image (keep_size keeps it as it is)",
                            m.name()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Fill and outpaint: the canvas and mask as the fill demo makes them (`fluxfit fill`).
    fn fill_input(
        &self,
        img: Decoded,
        mask: Option<Decoded>,
        max: usize,
        meta: &mut Vec<(String, String)>,
    ) -> Result<(usize, usize, Input), ApiError> {
        let mode = self.mode;
        let luma_mask;
        let from = if mode == Mode::Outpaint {
            let o = self.outpaint.unwrap_or_default().checked()?;
            // The canvas's size before it is made: borders up to 4× a side each.
            let base = if self.keep_size {
                (img.rgb.width, img.rgb.height)
            } else {
                fluxfit::pipeline::fill::fill_size(img.rgb.width, img.rgb.height)
            };
            let (cw, ch) = fluxfit::pipeline::fill::outpaint_geometry(base.0, base.1, &o).canvas;
            if cw.max(ch) > max {
                return Err(bad(
                    "outpaint",
                    format!("the canvas would be {cw}x{ch}, above this server's {max} pixels"),
                ));
            }
            MaskFrom::Outpaint(o)
        } else if let Some(m) = &mask {
            // A mask with transparency (OpenAI's convention): transparent = paint;
            // otherwise its grey levels, white = paint (the reference's).
            luma_mask = match &m.alpha_mask {
                Some(a) if a.iter().any(|&v| v > 0) => a.clone(),
                _ => luma(&m.rgb),
            };
            MaskFrom::Mask(&luma_mask, (m.rgb.width, m.rgb.height), "mask".into())
        } else if let Some(a) = &img.alpha_mask {
            MaskFrom::Alpha(a)
        } else {
            return Err(bad(
                "mask",
                "fill needs a mask, or an image with transparency where to paint",
            ));
        };
        let (canvas, m, desc) = fill_canvas(&img.rgb, from, self.keep_size)
            .map_err(|e| bad(if mask.is_some() { "mask" } else { "image" }, e.to_string()))?;
        if m.iter().all(|&v| v == 0) {
            return Err(bad(
                if mask.is_some() { "mask" } else { "image" },
                "the mask marks nothing to paint (white, or transparent, where to paint)",
            ));
        }
        if canvas.width.max(canvas.height) > max {
            return Err(bad(
                "image",
                format!(
                    "the canvas would be {}x{}, above this server's {max} pixels",
                    canvas.width, canvas.height
                ),
            ));
        }
        meta.push((
            "fill_image".into(),
            format!("{}x{}", img.rgb.width, img.rgb.height),
        ));
        meta.push(("fill_mask".into(), desc));
        let (ti, tm) = fluxfit::pipeline::fill::fill_tensors(&canvas, &m)
            .map_err(|e| bad("image", e.to_string()))?;
        Ok((canvas.width, canvas.height, Input::Fill(ti, tm)))
    }

    /// Regions: the canvas size, its grid and the image to refine, if any (`fluxfit regions`).
    fn regions_input(
        &self,
        info: &ModelInfo,
        src: Option<Rgb8>,
        max: usize,
        meta: &mut Vec<(String, String)>,
    ) -> Result<(usize, usize, Input), ApiError> {
        let (w, h) = match (&src, self.width, self.height) {
            (_, Some(w), Some(h)) => (w, h),
            (Some(s), w, h) => (w.unwrap_or(2 * s.width), h.unwrap_or(2 * s.height)),
            (None, _, _) => {
                return Err(bad(
                    if self.width.is_none() {
                        "width"
                    } else {
                        "height"
                    },
                    "regions needs the canvas size (or an image to enlarge)",
                ))
            }
        };
        let (w, h) = (
            side("width", w, MAX_CANVAS)?,
            side("height", h, MAX_CANVAS)?,
        );
        let tile = self
            .tile
            .unwrap_or(info.default_size.0.max(info.default_size.1));
        if !(MIN_SIDE..=max).contains(&tile) {
            return Err(bad("tile", format!("{tile}: expected {MIN_SIDE} to {max}")));
        }
        let overlap = self.overlap.unwrap_or(128);
        let grid = region_grid(w, h, tile, overlap).map_err(|e| bad("overlap", e.to_string()))?;
        let refine = match &src {
            Some(_) => {
                let s = self.strength.unwrap_or(0.35);
                if !(0.0..=1.0).contains(&s) {
                    return Err(bad("strength", format!("{s}: expected 0 to 1")));
                }
                if info.variant == Variant::DevFill {
                    return Err(bad(
                        "image",
                        "refining an image region by region needs a text-to-image model, not a Fill model",
                    ));
                }
                Some(s)
            }
            None => None,
        };
        if grid.len() > MAX_REGIONS {
            return Err(bad(
                "tile",
                format!(
                    "{w}x{h} in regions of {tile} with an overlap of {overlap} is {} regions; at most {MAX_REGIONS}: give a larger tile or a smaller canvas",
                    grid.len()
                ),
            ));
        }
        meta.push((
            "regions".into(),
            format!(
                "{} regions of {}x{}, overlap {overlap}",
                grid.len(),
                grid[0].w,
                grid[0].h
            ),
        ));
        if let (Some(s), Some(strength)) = (&src, refine) {
            meta.push(("regions_from".into(), format!("{}x{}", s.width, s.height)));
            meta.push(("strength".into(), strength.to_string()));
        }
        Ok((
            w,
            h,
            Input::Regions {
                source: src,
                grid,
                refine,
                band: overlap,
            },
        ))
    }

    /// Edit: the conditioning image at a Kontext resolution and the output size (`fluxfit edit`).
    fn edit_input(
        &self,
        src: Rgb8,
        max: usize,
        meta: &mut Vec<(String, String)>,
    ) -> Result<(usize, usize, Input), ApiError> {
        let (cw, ch) = if self.keep_size {
            (src.width / 16 * 16, src.height / 16 * 16)
        } else {
            conditioning_size(src.width, src.height)
        };
        if cw < 16 || ch < 16 {
            return Err(bad(
                "image",
                format!(
                    "{}x{}: smaller than 16 pixels a side",
                    src.width, src.height
                ),
            ));
        }
        let cond: Rgb8 = resize_lanczos(&src, cw, ch);
        let (w, h) = match &self.aspect_ratio {
            Some(ar) => {
                if self.width.is_some() || self.height.is_some() {
                    return Err(bad(
                        "aspect_ratio",
                        "give an aspect ratio or a size, not both",
                    ));
                }
                meta.push(("aspect_ratio".into(), ar.clone()));
                aspect_ratio_size(ar).map_err(|e| bad("aspect_ratio", e.to_string()))?
            }
            None => (self.width.unwrap_or(cw), self.height.unwrap_or(ch)),
        };
        let (w, h) = (side("width", w, max)?, side("height", h, max)?);
        meta.push(("edit_image_size".into(), format!("{cw}x{ch}")));
        let t = image_tensor(&cond).map_err(|e| bad("image", e.to_string()))?;
        Ok((w, h, Input::Edit(t)))
    }

    /// Checks the job against the model and decodes its images (`image`, `mask` as bytes when
    /// they came as multipart files). `random_seed` is used when no seed is given.
    pub fn prepare(
        &self,
        info: &ModelInfo,
        image: Option<Vec<u8>>,
        mask: Option<Vec<u8>>,
        limits: ImageLimits,
        random_seed: u64,
    ) -> Result<Work, ApiError> {
        let mode = self.mode;
        if !mode.runs_on(info.variant) {
            return Err(bad(
                "mode",
                format!(
                    "{} needs another model: this server runs {} ({})",
                    mode.name(),
                    info.name,
                    info.variant.name()
                ),
            ));
        }
        self.refuse_foreign_fields()?;
        let steps = self.steps.unwrap_or(info.default_steps);
        if steps == 0 || steps > 1000 {
            return Err(bad("steps", format!("{steps}: expected 1 to 1000")));
        }
        let guidance = self.guidance.unwrap_or(info.default_guidance);
        if !guidance.is_finite() || !(0.0..=100.0).contains(&guidance) {
            return Err(bad("guidance", format!("{guidance}: expected 0 to 100")));
        }
        if self.prompt.len() > 16 * 1024 {
            return Err(bad("prompt", "longer than 16 KiB"));
        }
        let image = match (image, &self.image) {
            (Some(bytes), _) => Some(decode("image", &bytes, limits)?),
            (None, Some(text)) => Some(decode("image", &base64_field("image", text)?, limits)?),
            (None, None) if mode.needs_image() => {
                return Err(bad(
                    "image",
                    format!("{} needs an input image", mode.name()),
                ))
            }
            (None, None) => None,
        };
        let mask = match (mask, &self.mask) {
            (Some(bytes), _) => Some(decode("mask", &bytes, limits)?),
            (None, Some(text)) => Some(decode("mask", &base64_field("mask", text)?, limits)?),
            (None, None) => None,
        };
        if mask.is_some() && mode != Mode::Fill {
            return Err(bad("mask", format!("{} takes no mask", mode.name())));
        }
        let max = info.max_side;
        let size = |w: Option<usize>, h: Option<usize>, default: (usize, usize)| {
            Ok::<_, ApiError>((
                side("width", w.unwrap_or(default.0), max)?,
                side("height", h.unwrap_or(default.1), max)?,
            ))
        };
        let mut meta = Vec::new();
        let (width, height, input) = match mode {
            Mode::Generate => {
                let (w, h) = size(self.width, self.height, info.default_size)?;
                (w, h, Input::None)
            }
            Mode::Img2img => {
                let img = image.expect("checked above").rgb;
                let strength = self.strength.unwrap_or(0.8);
                if !(0.0..=1.0).contains(&strength) {
                    return Err(bad("strength", format!("{strength}: expected 0 to 1")));
                }
                let asked = self.width.is_some() || self.height.is_some();
                let (w, h) = size(self.width, self.height, (img.width, img.height))?;
                let t = init_image(&img, asked.then_some((w, h)))
                    .map_err(|e| bad("image", e.to_string()))?;
                let d = t.dims().to_vec();
                meta.push(("init_image".into(), format!("{}x{}", img.width, img.height)));
                meta.push(("strength".into(), strength.to_string()));
                (d[3], d[2], Input::Init(ImageInit { image: t, strength }))
            }
            Mode::Control => {
                let img = image.expect("checked above").rgb;
                let (w, h) = size(self.width, self.height, (img.width, img.height))?;
                let rgb = resize_lanczos(&img, w, h);
                let (rgb, how) = if info.variant == Variant::DevCanny && !self.control_raw {
                    (canny_control(&rgb), "canny 50/200")
                } else if info.variant == Variant::DevDepth {
                    (rgb, "depth map as given")
                } else {
                    (rgb, "as given")
                };
                meta.push((
                    "control_image".into(),
                    format!("{}x{}", img.width, img.height),
                ));
                meta.push(("control".into(), how.into()));
                let t = image_tensor(&rgb).map_err(|e| bad("image", e.to_string()))?;
                (w, h, Input::Control(t))
            }
            Mode::Fill | Mode::Outpaint => {
                self.fill_input(image.expect("checked above"), mask, max, &mut meta)?
            }
            Mode::Regions => self.regions_input(info, image.map(|d| d.rgb), max, &mut meta)?,
            Mode::Edit => self.edit_input(image.expect("checked above").rgb, max, &mut meta)?,
        };
        if mode == Mode::Outpaint {
            meta.push(("mode".into(), "outpaint".into()));
        }
        // A regions job is planned (and its side limit checked) per region, not per canvas.
        let max = if mode == Mode::Regions {
            max.max(MAX_CANVAS)
        } else {
            max
        };
        let req = Request {
            prompt: self.prompt.clone(),
            width,
            height,
            steps,
            guidance,
            seed: self.seed.unwrap_or(random_seed),
            t5_tokens: info.t5_tokens,
            noise: NoiseKind::TorchBf16,
        };
        req.validate(max > MAX_SIDE)
            .map_err(|e| bad("width", e.to_string()))?;
        Ok(Work {
            mode,
            req,
            input,
            meta,
        })
    }
}
