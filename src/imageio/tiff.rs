//! TIFF as nnU-Net reads it: a file of one 2D page is a picture (NaturalImage2DIO: spacing
//! (999, 1, 1), gray or RGB(A)); a stack of gray pages is a volume (Tiff3DIO), its spacing
//! from the JSON file nnU-Net puts beside it: CASE.json for CASE_0000.tif and for CASE.tif.

use super::{natural, Header, Volume, VoxelType};
use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use tiff::decoder::{Decoder, DecodingResult, Limits};
use tiff::encoder::{colortype, compression::DeflateLevel, Compression, TiffEncoder};
use tiff::ColorType;

fn samples(r: DecodingResult) -> Vec<f32> {
    match r {
        DecodingResult::U8(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::U16(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::U32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::U64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::F16(v) => v.into_iter().map(f32::from).collect(),
        DecodingResult::F32(v) => v,
        DecodingResult::F64(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I8(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I16(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I32(v) => v.into_iter().map(|x| x as f32).collect(),
        DecodingResult::I64(v) => v.into_iter().map(|x| x as f32).collect(),
    }
}

/// Refuses a page whose strip count the tiff crate (0.11) computes in u32 and overflows:
/// ((rows - 1) / rows_per_strip + 1) * planes, planes being the samples of a planar-separate
/// page. A release build wraps there and refuses the file; a build with overflow checks (the
/// fuzzer's) panics. Walks every page's directory, classic TIFF and BigTIFF; anything it cannot
/// follow is left to the crate to report.
pub fn check_strip_counts(r: &mut (impl Read + Seek)) -> Result<()> {
    let mut head = [0u8; 16];
    if r.read_exact(&mut head[..8]).is_err() {
        return Ok(());
    }
    let le = match &head[..2] {
        b"II" => true,
        b"MM" => false,
        _ => return Ok(()),
    };
    let int = |b: &[u8]| -> u64 {
        let mut v = 0u64;
        for i in 0..b.len() {
            v |= (b[if le { i } else { b.len() - 1 - i }] as u64) << (8 * i);
        }
        v
    };
    let big = match int(&head[2..4]) {
        42 => false,
        43 => true,
        _ => return Ok(()),
    };
    let mut next = if big {
        if r.read_exact(&mut head[8..16]).is_err() {
            return Ok(());
        }
        int(&head[8..16])
    } else {
        int(&head[4..8])
    };
    let (count_len, entry_len, value_at) = if big { (8, 20, 12) } else { (2, 12, 8) };
    let mut seen = std::collections::HashSet::new();
    while next != 0 && seen.len() < 1 << 16 && seen.insert(next) {
        let mut n = [0u8; 8];
        if r.seek(SeekFrom::Start(next)).is_err() || r.read_exact(&mut n[..count_len]).is_err() {
            return Ok(());
        }
        let entries = int(&n[..count_len]).min(1 << 12) as usize;
        let mut dir = vec![0u8; entries * entry_len];
        if r.read_exact(&mut dir).is_err() {
            return Ok(());
        }
        let (mut rows, mut per_strip, mut samples, mut planar, mut strips) = (None, None, 1, 1, false);
        for e in dir.chunks_exact(entry_len) {
            let v = &e[value_at..];
            let value = match int(&e[2..4]) {
                3 => int(&v[..2]),
                4 => int(&v[..4]),
                16 if big => int(&v[..8]),
                _ => continue,
            };
            match int(&e[..2]) {
                257 => rows = Some(value),
                273 => strips = true,
                277 => samples = value,
                278 => per_strip = Some(value),
                284 => planar = value,
                _ => {}
            }
        }
        if let (Some(rows), true, 2) = (rows, strips, planar) {
            let per_strip = per_strip.unwrap_or(rows);
            if per_strip > 0 {
                let count = (rows.saturating_sub(1) / per_strip + 1).saturating_mul(samples);
                ensure!(count <= u32::MAX as u64, "the page at byte {next} claims {rows} rows in strips of {per_strip}, {samples} planes: more strips than a TIFF can index");
            }
        }
        let mut link = [0u8; 8];
        let link_len = if big { 8 } else { 4 };
        if r.seek(SeekFrom::Start(next + (count_len + entries * entry_len) as u64)).is_err() || r.read_exact(&mut link[..link_len]).is_err() {
            return Ok(());
        }
        next = int(&link[..link_len]);
    }
    Ok(())
}

/// Reads a .tif/.tiff: one page is a 2D picture, several a 3D volume.
pub fn read(path: &Path) -> Result<Volume> {
    let bad = |e: tiff::TiffError| anyhow::anyhow!("{e}");
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file.metadata().map(|m| m.len() as usize).unwrap_or(0);
    check_strip_counts(&mut std::io::BufReader::new(&mut file)).with_context(|| format!("{}: not a readable TIFF", path.display()))?;
    file.seek(SeekFrom::Start(0)).with_context(|| format!("{}: cannot read", path.display()))?;
    // LZW expands at most ~4096:1; nothing the file cannot hold is allocated.
    let budget = len.saturating_mul(4096).saturating_add(1 << 16).min(super::MAX_VOXELS.saturating_mul(8));
    let mut limits = Limits::default();
    limits.decoding_buffer_size = budget;
    let mut dec = Decoder::new(std::io::BufReader::new(file)).map_err(bad).with_context(|| format!("{}: not a readable TIFF", path.display()))?.with_limits(limits);
    let mut pages: Vec<Vec<f32>> = Vec::new();
    let mut first: Option<((u32, u32), ColorType)> = None;
    let mut total = 0usize;
    // Samples stored plane after plane (PlanarConfiguration 2), as tifffile writes a 3- or
    // 4-slice stack: one page that tifffile, so nnU-Net, reads as (slices, rows, cols).
    let mut separate = false;
    loop {
        let dims = dec.dimensions().map_err(bad).with_context(|| format!("{}: page {}", path.display(), pages.len()))?;
        let color = dec.colortype().map_err(bad).with_context(|| format!("{}: page {}", path.display(), pages.len()))?;
        match first {
            None => first = Some((dims, color)),
            Some(f) => ensure!(f == (dims, color), "{}: page {} is {:?} {:?}, the first {:?} {:?}", path.display(), pages.len(), dims, color, f.0, f.1),
        }
        if pages.is_empty() {
            separate = dec.find_tag_unsigned::<u16>(tiff::tags::Tag::PlanarConfiguration).ok().flatten() == Some(2);
        }
        // What this page will take as f32 samples, counted before it is decoded.
        let per_pixel = match color {
            ColorType::RGB(_) => 3,
            ColorType::RGBA(_) => 4,
            _ => 1,
        };
        total = super::claimed_voxels(path, &[dims.0 as usize, dims.1 as usize, per_pixel]).ok().and_then(|n| total.checked_add(n * 4)).unwrap_or(usize::MAX);
        ensure!(total <= budget, "{}: its pages claim more pixels than the file could hold", path.display());
        let mut buf = DecodingResult::U8(Vec::new());
        let layout = dec.read_image_to_buffer(&mut buf).map_err(bad).with_context(|| format!("{}: page {} damaged", path.display(), pages.len()))?;
        ensure!(buf.as_buffer(0).as_bytes().len() >= layout.complete_len, "{}: page {} is larger than segk's limits", path.display(), pages.len());
        pages.push(samples(buf));
        if !dec.more_images() {
            break;
        }
        dec.next_image().map_err(bad).with_context(|| format!("{}: page {}", path.display(), pages.len()))?;
    }
    let ((w, h), color) = first.with_context(|| format!("{}: no pages", path.display()))?;
    let (w, h) = (w as usize, h as usize);
    let channels = match color {
        ColorType::Gray(_) => 1,
        ColorType::RGB(_) => 3,
        ColorType::RGBA(_) => 4,
        other => bail!("{}: colour type {other:?}; segk reads gray, RGB and RGBA TIFF", path.display()),
    };
    for (i, p) in pages.iter().enumerate() {
        ensure!(p.len() == w * h * channels, "{}: page {i} holds {} samples, {w}x{h}x{channels} expected", path.display(), p.len());
    }
    if pages.len() == 1 && separate && channels > 1 {
        return stack(path, [channels, h, w], pages.concat());
    }
    if pages.len() == 1 {
        let page = pages.pop().unwrap_or_default();
        return Ok(natural::picture(h, w, natural::planes(page, channels)));
    }
    ensure!(channels == 1, "{}: a stack of {} colour pages; nnU-Net's Tiff3DIO reads gray stacks", path.display(), pages.len());
    stack(path, [pages.len(), h, w], pages.concat())
}

/// A volume read from a TIFF stack, with the spacing of its JSON file.
fn stack(path: &Path, shape: [usize; 3], data: Vec<f32>) -> Result<Volume> {
    let spacing = spacing_beside(path)?;
    // No direction in the file: the axes as they are (RAS), so a stack stores the same
    // geometry as the NIfTI volume it was made from.
    let affine = [[spacing[2], 0.0, 0.0, 0.0], [0.0, spacing[1], 0.0, 0.0], [0.0, 0.0, spacing[0], 0.0]];
    Ok(Volume { shape, spacing, affine, data, header: Header::Tiff3d { spacing } })
}

/// nnU-Net's spacing file of a TIFF stack: CASE.json beside CASE_XXXX.tif (an image) or
/// CASE.tif (a label map). Without one the spacing is (1, 1, 1), as nnU-Net assumes (said once).
fn spacing_beside(path: &Path) -> Result<[f64; 3]> {
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let stem = name.rsplit_once('.').map_or(name.as_str(), |(s, _)| s);
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some((id, _)) = crate::dataset::split_channel(stem) {
        candidates.push(path.with_file_name(format!("{id}.json")));
    }
    candidates.push(path.with_file_name(format!("{stem}.json")));
    let Some(file) = candidates.into_iter().find(|p| p.is_file()) else {
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| eprintln!("warning: no spacing file beside {} (nnU-Net's CASE.json): spacing (1, 1, 1) assumed, as nnU-Net does", path.display()));
        return Ok([1.0; 3]);
    };
    let text = std::fs::read_to_string(&file).with_context(|| format!("{}: cannot read", file.display()))?;
    let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", file.display()))?;
    let sp: Option<Vec<f64>> = json.get("spacing").and_then(|s| s.as_array()).map(|a| a.iter().filter_map(|x| x.as_f64()).collect());
    match sp.as_deref() {
        Some(&[z, y, x]) if [z, y, x].iter().all(|v| v.is_finite() && *v > 0.0) => Ok([z, y, x]),
        _ => bail!("{}: \"spacing\" must be a list of 3 positive numbers (z, y, x)", file.display()),
    }
}

/// Writes `v` as TIFF: a picture as one page, a volume as a zlib-compressed stack with
/// CASE.json holding its spacing, as Tiff3DIO.write_seg does.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let bad = |e: tiff::TiffError| anyhow::anyhow!("{e}");
    let [depth, h, w] = v.shape;
    let picture = depth == 1 && matches!(v.header, Header::Natural);
    let file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut enc = TiffEncoder::new(file).map_err(bad)?.with_compression(Compression::Deflate(DeflateLevel::Balanced));
    let plane = h * w;
    macro_rules! pages {
        ($c:ty, $t:ty) => {
            for z in 0..depth {
                let page: Vec<$t> = v.data[z * plane..(z + 1) * plane].iter().map(|&x| x.round() as $t).collect();
                enc.write_image::<$c>(w as u32, h as u32, &page).map_err(bad)?;
            }
        };
    }
    match ty {
        VoxelType::U8 => pages!(colortype::Gray8, u8),
        VoxelType::I8 => pages!(colortype::GrayI8, i8),
        VoxelType::U16 => pages!(colortype::Gray16, u16),
        VoxelType::I16 => pages!(colortype::GrayI16, i16),
        VoxelType::U32 => pages!(colortype::Gray32, u32),
        VoxelType::I32 => pages!(colortype::GrayI32, i32),
        VoxelType::U64 => pages!(colortype::Gray64, u64),
        VoxelType::I64 => pages!(colortype::GrayI64, i64),
        VoxelType::F32 => {
            for z in 0..depth {
                enc.write_image::<colortype::Gray32Float>(w as u32, h as u32, &v.data[z * plane..(z + 1) * plane]).map_err(bad)?;
            }
        }
        VoxelType::F64 => {
            for z in 0..depth {
                let page: Vec<f64> = v.data[z * plane..(z + 1) * plane].iter().map(|&x| x as f64).collect();
                enc.write_image::<colortype::Gray64Float>(w as u32, h as u32, &page).map_err(bad)?;
            }
        }
    }
    drop(enc);
    if !picture {
        let json = serde_json::json!({ "spacing": v.spacing });
        let file = super::sibling(path, ".json");
        std::fs::write(&file, serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", file.display()))?;
    }
    Ok(())
}
