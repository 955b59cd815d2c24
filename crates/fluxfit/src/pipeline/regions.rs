//! Region generation (the guide's fourth technique): a canvas larger than one pass allows,
//! made as overlapping regions, each generated in the context of its finished neighbours and
//! stitched with feathered blending. Device memory is that of one region whatever the canvas:
//! the canvas lives on the host, and each region is an ordinary run at the region's size.
//!
//! How a region sees its finished neighbours depends on the model:
//! * a Fill model inpaints the region with the finished pixels kept (mask 0);
//! * a text-to-image model holds the finished pixels' latent in place while the rest is
//!   denoised ([`sampling::hold_known`]);
//! * refining an enlarged image (`--from small.png --scale 2`), each region is an img2img pass
//!   over the canvas as it stands, so overlaps start from already refined pixels.

use candle_core::{DType, Device, Tensor};

use super::model::Model;
use super::text2image::{Cond, Event, Generated, ImageInit, Request, Start};
use crate::error::{Error, Result};
use crate::image::Rgb8;
use crate::memory::ledger::MemoryReport;
use crate::sampling;
use crate::variant::Variant;

/// A region of the canvas, in pixels (multiples of 16).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Rect {
    pub x: usize,
    pub y: usize,
    pub w: usize,
    pub h: usize,
}

/// Start positions of regions of `tile` pixels along an axis of `size`: as few as keep every
/// neighbour overlap at least `overlap` after snapping to 16, spread evenly, the last one
/// ending at `size`.
fn axis_starts(size: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if size <= tile {
        return vec![0];
    }
    let span = (size - tile) as f64;
    let mut n = (size - overlap).div_ceil(tile - overlap);
    loop {
        let starts: Vec<usize> = (0..n)
            .map(|i| (16.0 * (span * i as f64 / (n - 1) as f64 / 16.0).round()) as usize)
            .collect();
        if starts.windows(2).all(|p| p[0] + tile >= p[1] + overlap) {
            return starts;
        }
        n += 1;
    }
}

/// The regions of a `width` × `height` canvas, row by row: `tile` pixels a side (at most the
/// canvas), neighbours overlapping by at least `overlap`.
pub fn region_grid(width: usize, height: usize, tile: usize, overlap: usize) -> Result<Vec<Rect>> {
    let bad = |m: String| Err(Error::InvalidRequest(m));
    if !width.is_multiple_of(16) || !height.is_multiple_of(16) {
        return bad(format!(
            "the canvas {width}x{height} needs sides that are multiples of 16"
        ));
    }
    if tile < 64 || !tile.is_multiple_of(16) {
        return bad(format!(
            "region size {tile}: expected a multiple of 16, at least 64"
        ));
    }
    if overlap == 0 || overlap * 2 > tile {
        return bad(format!(
            "overlap {overlap}: expected more than 0 and at most half the region size ({})",
            tile / 2
        ));
    }
    let (tw, th) = (tile.min(width), tile.min(height));
    let mut out = Vec::new();
    for y in axis_starts(height, th, overlap) {
        for x in axis_starts(width, tw, overlap) {
            out.push(Rect { x, y, w: tw, h: th });
        }
    }
    Ok(out)
}

/// How a region is made.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub enum RegionMode {
    /// Fill model: finished pixels kept by the mask.
    Fill,
    /// Text-to-image model: finished pixels' latent held while the rest is denoised.
    Hold,
    /// img2img over an enlarged image at this strength.
    Refine { strength: f64 },
}

/// The canvas as it is being made: pixels in [−1, 1], channel-major, and which are finished.
pub struct Canvas {
    pub width: usize,
    pub height: usize,
    pixels: Vec<f32>,
    done: Vec<bool>,
}

impl Canvas {
    /// A blank canvas (mid-grey, nothing finished).
    pub fn blank(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            pixels: vec![0.0; 3 * width * height],
            done: vec![false; width * height],
        }
    }

    /// A canvas holding an image (to be refined; nothing finished yet), pixels `b/127.5 − 1`.
    pub fn from_rgb8(img: &Rgb8) -> Result<Self> {
        Ok(Self {
            pixels: super::kontext::image_tensor(img)?
                .flatten_all()?
                .to_vec1::<f32>()?,
            ..Self::blank(img.width, img.height)
        })
    }

    /// The pixels of `r` as `[1, 3, h, w]`.
    pub fn crop(&self, r: &Rect) -> Result<Tensor> {
        let mut v = Vec::with_capacity(3 * r.w * r.h);
        for ch in 0..3 {
            let plane = &self.pixels[ch * self.width * self.height..];
            for y in r.y..r.y + r.h {
                v.extend_from_slice(&plane[y * self.width + r.x..][..r.w]);
            }
        }
        Ok(Tensor::from_vec(v, (1, 3, r.h, r.w), &Device::Cpu)?)
    }

    /// Which pixels of `r` are finished, row-major.
    pub fn done_in(&self, r: &Rect) -> Vec<bool> {
        (r.y..r.y + r.h)
            .flat_map(|y| self.done[y * self.width + r.x..][..r.w].iter().copied())
            .collect()
    }

    /// Puts a region's new pixels `[1, 3, h, w]` on the canvas: unfinished pixels take them;
    /// finished ones cross-fade from new (next to the unfinished part) to old (`band` pixels
    /// deep and beyond), so no seam shows. Marks the region finished.
    pub fn blend(&mut self, r: &Rect, new: &Tensor, band: usize) -> Result<()> {
        let new = new.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if new.len() != 3 * r.w * r.h {
            return Err(Error::InvalidRequest(format!(
                "a {}x{} region got {} values",
                r.w,
                r.h,
                new.len()
            )));
        }
        let weights = feather(&self.done_in(r), r.w, r.h, band);
        let plane = self.width * self.height;
        for y in 0..r.h {
            for x in 0..r.w {
                let i = y * r.w + x;
                let c = (r.y + y) * self.width + r.x + x;
                let wgt = weights[i];
                for ch in 0..3 {
                    let old = self.pixels[ch * plane + c];
                    let n = new[ch * r.w * r.h + i];
                    self.pixels[ch * plane + c] = wgt * n + (1.0 - wgt) * old;
                }
                self.done[c] = true;
            }
        }
        Ok(())
    }

    /// The canvas as `[1, 3, H, W]`.
    pub fn image(&self) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            self.pixels.clone(),
            (1, 3, self.height, self.width),
            &Device::Cpu,
        )?)
    }
}

/// Weight of the new pixels over a region: 1 where nothing was finished; over finished pixels
/// `1 − d/band`, clamped at 0, with d the (chamfer 3-4) distance to the nearest unfinished
/// pixel of the region.
pub fn feather(done: &[bool], w: usize, h: usize, band: usize) -> Vec<f32> {
    const FAR: u32 = u32::MAX / 4;
    let mut d: Vec<u32> = done.iter().map(|&f| if f { FAR } else { 0 }).collect();
    let at = |x: usize, y: usize| y * w + x;
    for y in 0..h {
        for x in 0..w {
            let mut v = d[at(x, y)];
            if x > 0 {
                v = v.min(d[at(x - 1, y)] + 3);
            }
            if y > 0 {
                v = v.min(d[at(x, y - 1)] + 3);
                if x > 0 {
                    v = v.min(d[at(x - 1, y - 1)] + 4);
                }
                if x + 1 < w {
                    v = v.min(d[at(x + 1, y - 1)] + 4);
                }
            }
            d[at(x, y)] = v;
        }
    }
    for y in (0..h).rev() {
        for x in (0..w).rev() {
            let mut v = d[at(x, y)];
            if x + 1 < w {
                v = v.min(d[at(x + 1, y)] + 3);
            }
            if y + 1 < h {
                v = v.min(d[at(x, y + 1)] + 3);
                if x + 1 < w {
                    v = v.min(d[at(x + 1, y + 1)] + 4);
                }
                if x > 0 {
                    v = v.min(d[at(x - 1, y + 1)] + 4);
                }
            }
            d[at(x, y)] = v;
        }
    }
    let band = band.max(1) as f32;
    d.iter()
        .map(|&v| (1.0 - (v as f32 / 3.0) / band).clamp(0.0, 1.0))
        .collect()
}

/// One finished region.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionRun {
    pub rect: Rect,
    pub seed: u64,
    /// What the region's run held on the compute device.
    pub memory: MemoryReport,
}

/// Progress of a region generation.
#[derive(Debug, Clone, Copy)]
pub enum RegionEvent<'a> {
    /// Region `index` of `count` begins.
    Region {
        index: usize,
        count: usize,
        rect: &'a Rect,
    },
    /// An event of the region's run.
    Run(Event),
}

impl Model {
    /// How this model makes regions (`refine`: an image is being refined at that strength).
    pub fn region_mode(&self, refine: Option<f64>) -> Result<RegionMode> {
        match (self.variant, refine) {
            (Variant::DevFill, Some(_)) => Err(Error::InvalidRequest(
                "refining an image region by region needs a text-to-image model (dev, schnell, krea), not a Fill model".into(),
            )),
            (Variant::DevFill, None) => Ok(RegionMode::Fill),
            (Variant::DevCanny | Variant::DevDepth | Variant::DevKontext, _) => {
                Err(Error::InvalidRequest(format!(
                    "region generation needs a text-to-image or Fill model; {} is {}",
                    self.name, self.variant
                )))
            }
            (_, Some(s)) if !(0.0..=1.0).contains(&s) => Err(Error::InvalidRequest(format!(
                "strength {s} is outside [0, 1]"
            ))),
            (_, Some(strength)) => Ok(RegionMode::Refine { strength }),
            (_, None) => Ok(RegionMode::Hold),
        }
    }

    /// Makes `canvas` region by region (`grid`, from [`region_grid`]), each region a run at its
    /// own size with seed `req.seed + index`; `req` gives the prompt and sampling settings
    /// (its size is the canvas's). The prompt is encoded once. `band`: the feathering depth.
    pub fn regions(
        &self,
        req: &Request,
        canvas: &mut Canvas,
        grid: &[Rect],
        mode: RegionMode,
        band: usize,
        on_event: &mut dyn FnMut(RegionEvent),
    ) -> Result<Vec<RegionRun>> {
        self.ledger().begin_run();
        use crate::component::Component::{Clip, T5};
        let encoded = super::run::phase(
            self,
            crate::component::Phase::Encode,
            &[T5, Clip],
            &mut |e| on_event(RegionEvent::Run(e)),
            |_| self.encode_text(&req.prompt, req.t5_tokens),
        );
        self.ledger().end_run();
        let (txt, vec) = encoded?;
        let mut runs = Vec::with_capacity(grid.len());
        for (index, rect) in grid.iter().enumerate() {
            on_event(RegionEvent::Region {
                index,
                count: grid.len(),
                rect,
            });
            // A watched run stops between regions too, not only between steps.
            if let Some(w) = self.watch() {
                if w.is_cancelled() {
                    return Err(Error::Cancelled {
                        step: index * req.steps,
                        total: grid.len() * req.steps,
                    });
                }
            }
            let sub = Request {
                width: rect.w,
                height: rect.h,
                seed: req.seed.wrapping_add(index as u64),
                ..req.clone()
            };
            sub.validate(false)?;
            let crop = canvas.crop(rect)?;
            let done = canvas.done_in(rect);
            let emb = Some((&txt, &vec));
            let on_run = &mut |e| on_event(RegionEvent::Run(e));
            let out = match mode {
                RegionMode::Fill => {
                    let mask: Vec<f32> = done.iter().map(|&d| if d { 0.0 } else { 1.0 }).collect();
                    let mask = Tensor::from_vec(mask, (1, 1, rect.h, rect.w), &Device::Cpu)?;
                    self.fill(&sub, &crop, &mask, emb, on_run)?
                }
                RegionMode::Hold => self.hold_known_pixels(&sub, &crop, &done, emb, on_run)?,
                RegionMode::Refine { strength } => {
                    let init = ImageInit {
                        image: crop,
                        strength,
                    };
                    self.image_to_image(&sub, &init, emb, on_run)?
                }
            };
            canvas.blend(rect, &out.image, band)?;
            runs.push(RegionRun {
                rect: *rect,
                seed: sub.seed,
                memory: out.memory,
            });
        }
        Ok(runs)
    }

    /// Generates `image` `[1, 3, H, W]` anew except where `done` (row-major, per pixel) holds:
    /// there the encoded pixels are held ([`Start::Hold`]) for every 16×16 token entirely done.
    fn hold_known_pixels(
        &self,
        req: &Request,
        image: &Tensor,
        done: &[bool],
        embeddings: Option<(&Tensor, &Tensor)>,
        on_event: &mut dyn FnMut(Event),
    ) -> Result<Generated> {
        let (w, h) = (req.width, req.height);
        let (tw, th) = (w / 16, h / 16);
        let mask: Vec<f32> = (0..th * tw)
            .map(|t| {
                let (ty, tx) = (t / tw, t % tw);
                let all =
                    (0..16).all(|dy| (0..16).all(|dx| done[(ty * 16 + dy) * w + tx * 16 + dx]));
                if all {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        if mask.iter().all(|&m| m == 0.0) {
            // Nothing to hold: plain text to image.
            let (txt, vec) = match embeddings {
                Some((t, v)) => (t.clone(), v.clone()),
                None => self.encode_text(&req.prompt, req.t5_tokens)?,
            };
            return self.image_from_embeddings(req, &txt, &vec, on_event);
        }
        let mask = Tensor::from_vec(mask, (1, th * tw, 1), &Device::Cpu)?;
        self.conditioned(
            req,
            embeddings,
            on_event,
            || sampling::pack(&self.encode_image(image)?),
            |txt, vec, known, on_event| {
                let start = Start::Hold(known, &mask);
                self.denoise_decode(req, txt, vec, start, Cond::None, on_event)
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_cover_the_canvas_with_the_overlap() {
        let g = region_grid(3072, 1024, 1024, 128).unwrap();
        let xs: Vec<usize> = g.iter().map(|r| r.x).collect();
        // ⌈(3072 − 128)/(1024 − 128)⌉ = 4 columns, spread evenly: step 682.7 → 688, 1360, 2048.
        assert_eq!(xs, vec![0, 688, 1360, 2048]);
        assert!(g.iter().all(|r| r.y == 0 && r.w == 1024 && r.h == 1024));
        let g = region_grid(2048, 2048, 1024, 128).unwrap();
        assert_eq!(g.len(), 9);
        for w in g.windows(2).filter(|w| w[0].y == w[1].y) {
            assert!(w[0].x + w[0].w >= w[1].x + 128, "{w:?}");
        }
        assert_eq!(g.last().unwrap().x + 1024, 2048);
        // A canvas smaller than a region is one region of the canvas's size.
        assert_eq!(
            region_grid(512, 256, 1024, 128).unwrap(),
            vec![Rect {
                x: 0,
                y: 0,
                w: 512,
                h: 256
            }]
        );
        for (w, h, t, o) in [
            (1000, 512, 512, 64),
            (1024, 1024, 60, 16),
            (1024, 1024, 512, 0),
            (1024, 1024, 512, 300),
        ] {
            assert!(region_grid(w, h, t, o).is_err(), "{w} {h} {t} {o}");
        }
    }

    #[test]
    fn feathering_fades_into_finished_pixels() {
        // 8 wide, 1 high: the left 5 pixels are finished.
        let done = [true, true, true, true, true, false, false, false];
        let f = feather(&done, 8, 1, 4);
        assert_eq!(&f[5..], &[1.0, 1.0, 1.0]);
        // Distances 5, 4, 3, 2, 1 pixels from the unfinished part: 1 − d/4.
        assert_eq!(&f[..5], &[0.0, 0.0, 0.25, 0.5, 0.75]);
        // Nothing unfinished: the old pixels stay.
        assert!(feather(&[true; 4], 2, 2, 4).iter().all(|&v| v == 0.0));
    }

    #[test]
    fn blending_keeps_old_pixels_deep_in_the_finished_part() {
        let mut c = Canvas::blank(32, 16);
        let left = Rect {
            x: 0,
            y: 0,
            w: 16,
            h: 16,
        };
        c.blend(
            &left,
            &Tensor::ones((1, 3, 16, 16), DType::F32, &Device::Cpu).unwrap(),
            4,
        )
        .unwrap();
        let right = Rect {
            x: 8,
            y: 0,
            w: 24,
            h: 16,
        };
        let minus = Tensor::ones((1, 3, 16, 24), DType::F32, &Device::Cpu)
            .unwrap()
            .neg()
            .unwrap();
        c.blend(&right, &minus, 4).unwrap();
        let row: Vec<f32> = c
            .image()
            .unwrap()
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .get(5)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(row[..12], [1.0; 12]);
        assert!(row[13] < 1.0 && row[13] > -1.0, "{row:?}");
        assert_eq!(row[16..], [-1.0; 16]);
    }
}
