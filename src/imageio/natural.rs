//! PNG pictures as nnU-Net's NaturalImage2DIO reads them: one slice, shape [1, rows, cols],
//! spacing (999, 1, 1); an RGB(A) picture is 3 (4) channels. Palettes are expanded to RGB and
//! low bit depths to 8 bits, as the imaging libraries under skimage do.

use super::{Header, Volume, VoxelType};
use anyhow::{bail, ensure, Context, Result};
use std::path::Path;

/// The volume of a 2D picture: channel-major `data` of `rows` × `cols` pixels.
pub fn picture(rows: usize, cols: usize, data: Vec<f32>) -> Volume {
    // ITK's default geometry (identity direction in LPS) in segk's RAS terms, so that a picture
    // written as NIfTI, MetaImage or NRRD carries what SimpleITK would give it.
    let affine = [[-1.0, 0.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0], [0.0, 0.0, 999.0, 0.0]];
    Volume { shape: [1, rows, cols], spacing: [999.0, 1.0, 1.0], affine, data, header: Header::Natural }
}

/// Interleaved samples (pixel after pixel) to channel-major planes.
pub fn planes(samples: Vec<f32>, channels: usize) -> Vec<f32> {
    if channels == 1 {
        return samples;
    }
    let n = samples.len() / channels;
    (0..channels).flat_map(|c| samples.iter().skip(c).step_by(channels).take(n).copied().collect::<Vec<_>>()).collect()
}

pub fn read_png(path: &Path) -> Result<Volume> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let len = bytes.len();
    check_palette(&bytes).with_context(|| format!("{}: not a readable PNG", path.display()))?;
    // The decoder allocates the picture after the header; bound it by what the file's deflate
    // stream could expand to, and by segk's voxel limit.
    let limit = len.saturating_mul(super::MAX_INFLATE_RATIO).saturating_add(1 << 16).min(super::MAX_VOXELS.saturating_mul(8));
    let mut dec = png::Decoder::new_with_limits(std::io::Cursor::new(&bytes[..]), png::Limits { bytes: limit });
    dec.set_transformations(png::Transformations::EXPAND);
    let mut reader = dec.read_info().map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("{}: not a readable PNG", path.display()))?;
    let (color, depth) = reader.output_color_type();
    let stored = match color {
        png::ColorType::Grayscale => 1,
        png::ColorType::GrayscaleAlpha => 2,
        png::ColorType::Rgb => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::Indexed => bail!("{}: palette not expanded", path.display()),
    };
    // A transparency chunk becomes an alpha channel when expanded; the picture's own colour
    // type says whether it has one (a palette becomes RGB, as Pillow converts it).
    let channels = match reader.info().color_type {
        png::ColorType::Grayscale => 1,
        png::ColorType::Rgb | png::ColorType::Indexed => 3,
        png::ColorType::Rgba => 4,
        png::ColorType::GrayscaleAlpha => bail!("{}: gray with alpha (2 channels); nnU-Net reads gray, RGB or RGBA", path.display()),
    };
    let size = reader.output_buffer_size().with_context(|| format!("{}: the picture's size overflows", path.display()))?;
    let (w, h) = reader.info().size();
    super::claimed_voxels(path, &[w as usize, h as usize])?;
    ensure!(size <= limit, "{}: the header claims a {w}x{h} picture, more than the file's compressed data can hold", path.display());
    let mut buf = vec![0u8; size];
    let info = reader.next_frame(&mut buf).map_err(|e| anyhow::anyhow!("{e}")).with_context(|| format!("{}: damaged PNG data", path.display()))?;
    buf.truncate(info.buffer_size());
    let source_depth = reader.info().bit_depth;
    let samples = match depth {
        // Pillow keeps 16-bit gray as it is but brings 16-bit colour down to its high byte.
        png::BitDepth::Sixteen if channels == 1 => VoxelType::U16.decode(&buf, true),
        png::BitDepth::Sixteen => buf.chunks_exact(2).map(|b| b[0] as f32).collect(),
        // A 1-bit picture is a mask: skimage reads it as 0/1, the expansion made it 0/255.
        _ if source_depth == png::BitDepth::One && channels == 1 => buf.iter().map(|&b| (b > 0) as u8 as f32).collect(),
        _ => VoxelType::U8.decode(&buf, false),
    };
    ensure!(samples.len() == w as usize * h as usize * stored, "{}: decoded {} samples for {w}x{h}x{stored}", path.display(), samples.len());
    let samples: Vec<f32> = match stored > channels {
        true => samples.chunks_exact(stored).flat_map(|p| p[..channels].to_vec()).collect(),
        false => samples,
    };
    Ok(picture(h as usize, w as usize, planes(samples, channels)))
}

/// A palette chunk (PLTE) of whole RGB entries, at most 256: the png crate (0.18.1) panics on
/// another length instead of refusing it (found by fuzzing).
fn check_palette(bytes: &[u8]) -> Result<()> {
    let mut at = 8;
    while at + 8 <= bytes.len() {
        let n = u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        if &bytes[at + 4..at + 8] == b"PLTE" {
            ensure!(n % 3 == 0 && (3..=768).contains(&n), "its palette holds {n} bytes, not 1 to 256 RGB entries");
        }
        at = at.saturating_add(12).saturating_add(n);
    }
    Ok(())
}

/// Writes a one-slice label map as a grayscale PNG (8 bits, or 16 when `ty` needs them), as
/// NaturalImage2DIO.write_seg does.
pub fn write_png(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    ensure!(v.shape[0] == 1, "PNG holds one slice; this image has {}", v.shape[0]);
    let (rows, cols) = (v.shape[1] as u32, v.shape[2] as u32);
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = png::Encoder::new(file, cols, rows);
    enc.set_color(png::ColorType::Grayscale);
    let bytes: Vec<u8> = match ty {
        VoxelType::U8 => {
            enc.set_depth(png::BitDepth::Eight);
            v.data.iter().map(|&x| x.round().clamp(0.0, 255.0) as u8).collect()
        }
        _ => {
            enc.set_depth(png::BitDepth::Sixteen);
            v.data.iter().flat_map(|&x| (x.round().clamp(0.0, 65535.0) as u16).to_be_bytes()).collect()
        }
    };
    let mut w = enc.write_header()?;
    w.write_image_data(&bytes)?;
    w.finish()?;
    Ok(())
}
