//! Images in and out: tensor ↔ 8-bit RGB, PNG with text metadata, JPEG, and output names that
//! never overwrite an existing file.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// An 8-bit RGB image, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub data: Vec<u8>,
}

/// `[1, 3, H, W]` in [−1, 1] → 8-bit RGB the way the reference saves it: clamp, then
/// 127.5·(x + 1) truncated (not rounded).
pub fn to_rgb8(image: &Tensor) -> Result<Rgb8> {
    let (_, c, height, width) = image.dims4()?;
    if c != 3 {
        return Err(Error::InvalidRequest(format!(
            "expected 3 channels, got {c}"
        )));
    }
    let hwc = image
        .get(0)?
        .to_dtype(DType::F32)?
        .clamp(-1f32, 1f32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let data = hwc.iter().map(|&x| (127.5 * (x + 1.0)) as u8).collect();
    Ok(Rgb8 {
        width,
        height,
        data,
    })
}

/// `path` if free, else `stem-1.ext`, `stem-2.ext`, ...: outputs never replace a file.
pub fn next_free_path(path: &Path) -> PathBuf {
    if !path.exists() {
        return path.to_path_buf();
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (1..)
        .map(|i| path.with_file_name(format!("{stem}-{i}.{ext}")))
        .find(|p| !p.exists())
        .expect("an unbounded range finds a free name")
}

/// Output formats, by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Jpeg,
}

impl Format {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .as_deref()
        {
            Some("png") | None => Ok(Format::Png),
            Some("jpg") | Some("jpeg") => Ok(Format::Jpeg),
            Some(other) => Err(Error::Output {
                path: path.to_path_buf(),
                message: format!("unknown image extension `.{other}`; use .png, .jpg or .jpeg"),
            }),
        }
    }
}

/// Writes `img` to `path`, which must not exist (created exclusively, so a race cannot
/// overwrite either). PNG gets one tEXt chunk per metadata pair.
pub fn save(img: &Rgb8, path: &Path, metadata: &[(String, String)]) -> Result<()> {
    let format = Format::from_path(path)?;
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| out_err(format!("cannot create: {e}")))?;
    let mut w = BufWriter::new(file);
    match format {
        Format::Png => {
            let mut enc = png::Encoder::new(&mut w, img.width as u32, img.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in metadata {
                enc.add_itxt_chunk(k.clone(), v.clone())
                    .map_err(|e| out_err(format!("metadata `{k}`: {e}")))?;
            }
            let mut writer = enc.write_header().map_err(|e| out_err(e.to_string()))?;
            writer
                .write_image_data(&img.data)
                .map_err(|e| out_err(e.to_string()))?;
            writer.finish().map_err(|e| out_err(e.to_string()))?;
        }
        Format::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut w, 95);
            image::ImageEncoder::write_image(
                enc,
                &img.data,
                img.width as u32,
                img.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| out_err(e.to_string()))?;
        }
    }
    w.flush().map_err(|e| out_err(e.to_string()))?;
    Ok(())
}

/// Reads the text chunks of a PNG (tEXt, zTXt and iTXt), for tests and `fluxfit inspect`.
pub fn png_text(path: &Path) -> Result<Vec<(String, String)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let reader = dec.read_info().map_err(|e| Error::Output {
        path: path.to_path_buf(),
        message: format!("not a PNG: {e}"),
    })?;
    let info = reader.info();
    let mut out: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &info.utf8_text {
        if let Ok(text) = t.get_text() {
            out.push((t.keyword.clone(), text));
        }
    }
    Ok(out)
}
