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
    // A name is taken by anything there, a dangling link included (`exists` follows links).
    let taken = |p: &Path| p.symlink_metadata().is_ok();
    if !taken(path) {
        return path.to_path_buf();
    }
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
    let ext = path.extension().and_then(|s| s.to_str()).unwrap_or("png");
    (1..)
        .map(|i| path.with_file_name(format!("{stem}-{i}.{ext}")))
        .find(|p| !taken(p))
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

/// The encoded file of `img` in `format`: PNG gets one iTXt chunk per metadata pair.
pub fn encode(img: &Rgb8, format: Format, metadata: &[(String, String)]) -> Result<Vec<u8>> {
    let fail = |message: String| Error::InvalidRequest(format!("encoding the image: {message}"));
    let mut out = Vec::new();
    match format {
        Format::Png => {
            let mut enc = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
            enc.set_color(png::ColorType::Rgb);
            enc.set_depth(png::BitDepth::Eight);
            for (k, v) in metadata {
                enc.add_itxt_chunk(k.clone(), v.clone())
                    .map_err(|e| fail(format!("metadata `{k}`: {e}")))?;
            }
            let mut writer = enc.write_header().map_err(|e| fail(e.to_string()))?;
            writer
                .write_image_data(&img.data)
                .map_err(|e| fail(e.to_string()))?;
            writer.finish().map_err(|e| fail(e.to_string()))?;
        }
        Format::Jpeg => {
            let enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 95);
            image::ImageEncoder::write_image(
                enc,
                &img.data,
                img.width as u32,
                img.height as u32,
                image::ExtendedColorType::Rgb8,
            )
            .map_err(|e| fail(e.to_string()))?;
        }
    }
    Ok(out)
}

/// Writes `img` to `path`, which must not exist, with `metadata` (see [`encode`]): see
/// [`write_new`].
pub fn save(img: &Rgb8, path: &Path, metadata: &[(String, String)]) -> Result<()> {
    let format = Format::from_path(path)?;
    let bytes = encode(img, format, metadata).map_err(|e| Error::Output {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_new(path, &bytes)
}

/// Writes `bytes` to `path`, which must not exist, so that the name appears only once the file
/// is whole and never replaces another: the bytes go to a hidden temporary file beside it,
/// which is then hard-linked to `path` (failing if something took the name meanwhile) and
/// removed. A full disk or a crash leaves no file under `path`.
pub fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let out_err = |message: String| Error::Output {
        path: path.to_path_buf(),
        message,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| out_err("not a file name".into()))?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.partial", std::process::id()));
    let written = (|| -> std::io::Result<()> {
        let file = OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        let mut w = BufWriter::new(file);
        w.write_all(bytes)?;
        w.into_inner().map_err(|e| e.into_error())?.sync_all()
    })();
    let linked = written
        .map_err(|e| out_err(format!("cannot write (through {}): {e}", tmp.display())))
        .and_then(|()| match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(out_err("exists; fluxfit never replaces a file".into()))
            }
            // A file system without hard links: a rename, after checking the name is free
            // (a writer racing for the same name in between could lose its file).
            Err(_) if !path.exists() => {
                std::fs::rename(&tmp, path).map_err(|e| out_err(format!("cannot create: {e}")))
            }
            Err(e) => Err(out_err(format!("cannot create: {e}"))),
        });
    let _ = std::fs::remove_file(&tmp);
    linked
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

/// Largest side and decoded size a file image may have (the server sets its own, smaller).
pub const FILE_MAX_SIDE: u32 = 32768;
pub const FILE_MAX_BYTES: u64 = 4 << 30;

/// The bytes of an image file: a regular file only (a FIFO would block the read forever and a
/// device never ends), at most `FILE_MAX_BYTES`.
fn read_image_file(path: &Path) -> Result<Vec<u8>> {
    let bad = |m: String| Error::InvalidRequest(format!("cannot read {}: {m}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad(
            "not a regular file (a folder, FIFO or device); give an image file".into(),
        ));
    }
    if meta.len() > FILE_MAX_BYTES {
        return Err(bad(format!(
            "{} bytes is more than an image fluxfit reads ({} GiB)",
            meta.len(),
            FILE_MAX_BYTES >> 30
        )));
    }
    std::fs::read(path).map_err(|e| bad(e.to_string()))
}

/// Reads an image file (PNG or JPEG) as 8-bit RGB (alpha dropped, greyscale expanded), turned
/// upright as its EXIF orientation says, under the same checks as [`decode_bytes`].
pub fn read_rgb8(path: &Path) -> Result<Rgb8> {
    let bytes = read_image_file(path)?;
    let what = path.display().to_string();
    Ok(decode_bytes(&what, &bytes, FILE_MAX_SIDE, FILE_MAX_BYTES)?.rgb)
}

/// An image decoded from bytes an untrusted client sent: RGB, and the alpha channel as a mask
/// (255 − alpha: transparent = generate) when the image has one.
pub struct Decoded {
    pub rgb: Rgb8,
    pub alpha_mask: Option<Vec<u8>>,
}

/// A JPEG must end in its end-of-image marker (FF D9, maybe followed by padding): decoders
/// fill a file cut short with grey rows without a word, which would silently change an input.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), String> {
    let end = bytes
        .iter()
        .rposition(|&b| b != 0 && b != b'\n' && b != b'\r' && b != b' ')
        .map_or(0, |i| i + 1);
    if end >= 2 && bytes[end - 2..end] == [0xFF, 0xD9] {
        Ok(())
    } else {
        Err(
            "the JPEG is truncated (no end-of-image marker): the file was cut short, \
             download or export it again"
                .into(),
        )
    }
}

/// Decodes a PNG or JPEG from memory under limits checked before pixels are allocated: at most
/// `max_side` pixels a side and `max_bytes` of decoder memory, so a small file that claims a
/// huge canvas (a "decompression bomb") is refused. A truncated JPEG is refused; the EXIF
/// orientation is applied (a phone photo comes out upright, as viewers show it). `what` names
/// the input in errors.
pub fn decode_bytes(what: &str, bytes: &[u8], max_side: u32, max_bytes: u64) -> Result<Decoded> {
    use ::image::ImageDecoder;
    let bad = |message: String| Error::InvalidRequest(format!("{what}: {message}"));
    let mut reader = ::image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| bad(e.to_string()))?;
    match reader.format() {
        Some(::image::ImageFormat::Png) => {}
        Some(::image::ImageFormat::Jpeg) => check_jpeg_complete(bytes).map_err(bad)?,
        _ => return Err(bad("not a PNG or JPEG image".into())),
    }
    let mut limits = ::image::Limits::default();
    limits.max_image_width = Some(max_side);
    limits.max_image_height = Some(max_side);
    limits.max_alloc = Some(max_bytes);
    reader.limits(limits);
    let decode_err = |e: ::image::ImageError| match e {
        ::image::ImageError::Limits(_) => bad(format!(
            "the image is larger than accepted here (at most {max_side} pixels a side and \
             {} MiB decoded); downscale it",
            max_bytes >> 20
        )),
        e => bad(format!("cannot decode as a PNG or JPEG image: {e}")),
    };
    let mut decoder = reader.into_decoder().map_err(decode_err)?;
    let orientation = decoder.orientation().map_err(decode_err)?;
    let mut img = ::image::DynamicImage::from_decoder(decoder).map_err(decode_err)?;
    img.apply_orientation(orientation);
    let alpha_mask = img
        .color()
        .has_alpha()
        .then(|| img.to_rgba8().pixels().map(|p| 255 - p.0[3]).collect());
    let rgb = img.to_rgb8();
    Ok(Decoded {
        rgb: Rgb8 {
            width: rgb.width() as usize,
            height: rgb.height() as usize,
            data: rgb.into_raw(),
        },
        alpha_mask,
    })
}

/// Greyscale as PIL's "L" conversion (`(19595·R + 38470·G + 7471·B + 2¹⁵) >> 16`): how the
/// reference reads a mask from an RGB file.
pub fn luma(rgb: &Rgb8) -> Vec<u8> {
    rgb.data
        .chunks_exact(3)
        .map(|p| {
            ((19595 * p[0] as u32 + 38470 * p[1] as u32 + 7471 * p[2] as u32 + 0x8000) >> 16) as u8
        })
        .collect()
}

/// img2img's size rule (demo_st.py): with a requested size, the image is resized to it
/// (torch's default `interpolate`, nearest: source index ⌊dst·in/out⌋); without one, it is
/// cropped from the top-left to sides that are multiples of 16. Returns the image as
/// `[1, 3, H, W]` f32 in [−1, 1] (`2·x/255 − 1`, as `ToTensor` then `2x − 1`).
pub fn init_image(img: &Rgb8, size: Option<(usize, usize)>) -> Result<Tensor> {
    let (w, h) = size.unwrap_or((img.width / 16 * 16, img.height / 16 * 16));
    if w == 0 || h == 0 {
        return Err(Error::InvalidRequest(format!(
            "the init image is {}x{}: smaller than 16 pixels a side",
            img.width, img.height
        )));
    }
    let index = |dst: usize, out: usize, inp: usize| -> usize {
        if size.is_none() {
            dst
        } else {
            let scale = inp as f32 / out as f32;
            ((dst as f32 * scale).floor() as usize).min(inp - 1)
        }
    };
    let mut v = vec![0f32; 3 * h * w];
    for y in 0..h {
        let sy = index(y, h, img.height);
        for x in 0..w {
            let sx = index(x, w, img.width);
            for c in 0..3 {
                let byte = img.data[(sy * img.width + sx) * 3 + c];
                v[(c * h + y) * w + x] = 2.0 * (byte as f32 / 255.0) - 1.0;
            }
        }
    }
    Ok(Tensor::from_vec(
        v,
        (1, 3, h, w),
        &candle_core::Device::Cpu,
    )?)
}

/// A mask file as `prepare_fill` reads it: PIL's "L" conversion of its RGB
/// (`(19595·R + 38470·G + 7471·B + 2¹⁵) >> 16`, i.e. 0.299/0.587/0.114), 255 = generate.
pub fn read_mask(path: &Path) -> Result<(usize, usize, Vec<u8>)> {
    let rgb = read_rgb8(path)?;
    Ok((rgb.width, rgb.height, luma(&rgb)))
}

/// The alpha channel of an image file as a mask (255 − alpha: transparent = generate), or
/// `None` when the file has no alpha channel.
pub fn read_alpha_mask(path: &Path) -> Result<Option<Vec<u8>>> {
    let bytes = read_image_file(path)?;
    let what = path.display().to_string();
    Ok(decode_bytes(&what, &bytes, FILE_MAX_SIDE, FILE_MAX_BYTES)?.alpha_mask)
}

/// Resizes as the reference's PIL `Image.resize((w, h), Image.LANCZOS)` does, byte for byte
/// (see [`crate::resample`]).
pub fn resize_lanczos(img: &Rgb8, w: usize, h: usize) -> Rgb8 {
    Rgb8 {
        width: w,
        height: h,
        data: crate::resample::lanczos_rgb8(&img.data, img.width, img.height, w, h),
    }
}

/// A one-byte-per-pixel mask resized as PIL's `Image.resize(to, Image.LANCZOS)` resizes an "L"
/// image, byte for byte (see [`crate::resample`]).
pub fn resize_mask_lanczos(mask: &[u8], from: (usize, usize), to: (usize, usize)) -> Vec<u8> {
    crate::resample::lanczos_l8(mask, from.0, from.1, to.0, to.1)
}

#[cfg(test)]
mod init_tests {
    use super::*;

    fn img(width: usize, height: usize) -> Rgb8 {
        Rgb8 {
            width,
            height,
            data: (0..width * height * 3).map(|i| (i % 251) as u8).collect(),
        }
    }

    #[test]
    fn without_a_size_the_image_is_cropped_to_multiples_of_16() {
        let src = img(50, 37);
        let t = init_image(&src, None).unwrap();
        assert_eq!(t.dims(), &[1, 3, 32, 48]);
        // Top-left crop: pixel (y 31, x 47), green.
        let v = t.get(0).unwrap().get(1).unwrap().to_vec2::<f32>().unwrap();
        let byte = src.data[(31 * 50 + 47) * 3 + 1];
        assert_eq!(v[31][47], 2.0 * (byte as f32 / 255.0) - 1.0);
        assert!(init_image(&img(15, 40), None).is_err());
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn with_a_size_the_image_is_resized_nearest() {
        let src = img(4, 2);
        let t = init_image(&src, Some((8, 4))).unwrap();
        assert_eq!(t.dims(), &[1, 3, 4, 8]);
        let r = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        // Doubling: each source pixel twice in each direction.
        for y in 0..4 {
            for x in 0..8 {
                let byte = src.data[((y / 2) * 4 + x / 2) * 3];
                assert_eq!(r[y][x], 2.0 * (byte as f32 / 255.0) - 1.0);
            }
        }
        // Shrinking 3 → 2: source indices ⌊0·1.5⌋ = 0 and ⌊1·1.5⌋ = 1.
        let t = init_image(&img(3, 1), Some((2, 1))).unwrap();
        let r = t.get(0).unwrap().get(0).unwrap().to_vec2::<f32>().unwrap();
        let s = img(3, 1);
        assert_eq!(r[0][1], 2.0 * (s.data[3] as f32 / 255.0) - 1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_new_never_replaces_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.png");
        write_new(&path, b"first").unwrap();
        let e = write_new(&path, b"second").unwrap_err();
        assert!(e.to_string().contains("never replaces"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["out.png"]);
        // A folder that is not there: the error names the output, nothing is left.
        let e = write_new(&dir.path().join("missing/x.png"), b"x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn decoding_from_memory_checks_the_format() {
        let img = Rgb8 {
            width: 1,
            height: 1,
            data: vec![1, 2, 3],
        };
        let ok = decode_bytes(
            "upload",
            &encode(&img, Format::Png, &[]).unwrap(),
            64,
            1 << 20,
        )
        .unwrap();
        assert_eq!(ok.rgb, img);
        assert!(ok.alpha_mask.is_none());
        let e = decode_bytes("upload", b"GIF89a....", 64, 1 << 20)
            .err()
            .unwrap();
        assert!(e.to_string().contains("upload: not a PNG or JPEG"), "{e}");
    }
}
