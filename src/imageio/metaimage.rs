//! MetaImage (.mha: header and data in one file; .mhd: header beside a .raw or .zraw), ITK's
//! own format, written against MetaIO's documented keys: `Key = Value` lines ending with
//! ElementDataFile, voxels x fastest, zlib-compressed when CompressedData is True.
//! TransformMatrix holds the direction's columns one after the other (MetaIO's convention,
//! what SimpleITK writes).

use super::itk::{self, Geometry};
use super::{claimed_voxels, inflate_claimed, read_claimed, Volume, VoxelType};
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, Read, Seek, Write};
use std::path::Path;

/// Longest header segk reads (SimpleITK's are under 1 KiB).
const MAX_HEADER: u64 = 1 << 20;

const TYPES: [(&str, VoxelType); 14] = [
    ("MET_UCHAR", VoxelType::U8),
    ("MET_CHAR", VoxelType::I8),
    ("MET_USHORT", VoxelType::U16),
    ("MET_SHORT", VoxelType::I16),
    ("MET_UINT", VoxelType::U32),
    ("MET_INT", VoxelType::I32),
    ("MET_ULONG", VoxelType::U32),
    ("MET_LONG", VoxelType::I32),
    ("MET_ULONG_LONG", VoxelType::U64),
    ("MET_LONG_LONG", VoxelType::I64),
    ("MET_FLOAT", VoxelType::F32),
    ("MET_DOUBLE", VoxelType::F64),
    ("MET_UINT8", VoxelType::U8),
    ("MET_INT16", VoxelType::I16),
];

fn type_name(ty: VoxelType) -> &'static str {
    match ty {
        VoxelType::U64 => "MET_ULONG_LONG",
        VoxelType::I64 => "MET_LONG_LONG",
        _ => TYPES.iter().find(|(_, t)| *t == ty).map_or("MET_FLOAT", |(n, _)| n),
    }
}

/// The header's key-value pairs, in order, and the reader left at the first data byte.
fn header<R: BufRead>(r: &mut R, path: &Path) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut limited = r.take(MAX_HEADER);
    let mut line = Vec::new();
    loop {
        line.clear();
        if limited.read_until(b'\n', &mut line).with_context(|| format!("{}: reading the header", path.display()))? == 0 {
            bail!("{}: the header ends without ElementDataFile (not a MetaImage, or cut short)", path.display());
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let Some((k, v)) = text.split_once('=') else { bail!("{}: header line {:?} is not `Key = Value`", path.display(), text.chars().take(60).collect::<String>()) };
        let (k, v) = (k.trim().to_string(), v.trim().to_string());
        let last = k.eq_ignore_ascii_case("ElementDataFile");
        out.push((k, v));
        if last {
            return Ok(out);
        }
    }
}

fn get<'a>(h: &'a [(String, String)], keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| h.iter().find(|(hk, _)| hk.eq_ignore_ascii_case(k)).map(|(_, v)| v.as_str()))
}

fn numbers<T: std::str::FromStr + Clone>(h: &[(String, String)], keys: &[&str], n: usize, path: &Path) -> Result<Option<Vec<T>>> {
    let Some(v) = get(h, keys) else { return Ok(None) };
    let parsed: Option<Vec<T>> = v.split_whitespace().map(|x| x.parse().ok()).collect();
    match parsed {
        Some(p) if p.len() >= n => Ok(Some(p[..n].to_vec())),
        _ => bail!("{}: {} = {v:?} must hold {n} numbers", path.display(), keys[0]),
    }
}

/// A MetaIO boolean: as MetaIO reads them, by the first character (T, t or 1 is true).
fn flag(h: &[(String, String)], keys: &[&str]) -> Option<bool> {
    get(h, keys).map(|v| matches!(v.bytes().next(), Some(b'T' | b't' | b'1')))
}

/// Reads a .mha or .mhd image.
pub fn read(path: &Path) -> Result<Volume> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = std::io::BufReader::new(file);
    let h = header(&mut r, path)?;
    let dims: usize = get(&h, &["NDims"]).and_then(|v| v.parse().ok()).with_context(|| format!("{}: NDims missing or not a number", path.display()))?;
    let sizes: Vec<usize> = numbers(&h, &["DimSize"], dims, path)?.with_context(|| format!("{}: DimSize missing", path.display()))?;
    // A trailing axis of size 1 (a 3D file holding one slice, a 4D one holding one frame) is
    // dropped, as SimpleITK's array keeps it but nnU-Net's image does not need it.
    let kept = match dims {
        2 | 3 => dims,
        4 if sizes[3] == 1 => 3,
        _ => bail!("{}: a {dims}D image with sizes {sizes:?}; segk reads 2D and 3D images", path.display()),
    };
    let channels: usize = get(&h, &["ElementNumberOfChannels"]).map_or(Ok(1), |v| v.parse()).with_context(|| format!("{}: ElementNumberOfChannels is not a number", path.display()))?;
    ensure!(channels == 1, "{}: {channels} values per voxel (a vector image); nnU-Net expects one file per channel", path.display());
    let ty_name = get(&h, &["ElementType"]).with_context(|| format!("{}: ElementType missing", path.display()))?;
    let ty = TYPES.iter().find(|(n, _)| n.eq_ignore_ascii_case(ty_name)).map(|(_, t)| *t).with_context(|| format!("{}: ElementType {ty_name} is not supported", path.display()))?;
    let spacing: Vec<f64> = numbers(&h, &["ElementSpacing", "ElementSize"], dims, path)?.unwrap_or_else(|| vec![1.0; dims]);
    let origin: Vec<f64> = numbers(&h, &["Offset", "Origin", "Position"], dims, path)?.unwrap_or_else(|| vec![0.0; dims]);
    let matrix: Vec<f64> = numbers(&h, &["TransformMatrix", "Rotation", "Orientation"], dims * dims, path)?.unwrap_or_else(|| (0..dims * dims).map(|i| (i % (dims + 1) == 0) as u8 as f64).collect());
    ensure!(spacing.iter().chain(&origin).chain(&matrix).all(|x| x.is_finite()), "{}: a geometry value is not finite", path.display());
    let columns: Vec<Vec<f64>> = (0..kept).map(|c| (0..kept).map(|r| matrix[c * dims + r]).collect()).collect();
    let voxels = claimed_voxels(path, &sizes)?;
    let bytes = voxels * ty.bytes();
    let big_endian = flag(&h, &["BinaryDataByteOrderMSB", "ElementByteOrderMSB"]).unwrap_or(false);
    let compressed = flag(&h, &["CompressedData"]).unwrap_or(false);
    ensure!(flag(&h, &["BinaryData"]) != Some(false), "{}: BinaryData = False (voxels as text) is not supported", path.display());
    let header_size: Option<i64> = get(&h, &["HeaderSize"]).and_then(|v| v.parse().ok());
    let data_file = get(&h, &["ElementDataFile"]).unwrap_or("LOCAL").to_string();
    // The data's start: after the header (LOCAL) or at the data file's start; HeaderSize
    // moves it (to an offset, or with -1 to the last bytes of an uncompressed file).
    let (mut f, len, data_path, start) = if data_file.eq_ignore_ascii_case("LOCAL") {
        let at = r.stream_position().unwrap_or(0);
        (r.into_inner(), file_len, path.to_path_buf(), at)
    } else {
        ensure!(!data_file.eq_ignore_ascii_case("LIST") && !data_file.contains('%'), "{}: ElementDataFile {data_file} (one file per slice) is not supported", path.display());
        let (f, len, data_path) = super::open_data_file(path, &data_file)?;
        (f, len, data_path, 0)
    };
    let start = match header_size {
        Some(-1) if !compressed => len.saturating_sub(bytes as u64),
        Some(n) if n > 0 => n as u64,
        _ => start,
    };
    ensure!(start <= len, "{}: HeaderSize {start} is past the file's end", data_path.display());
    f.seek(std::io::SeekFrom::Start(start)).with_context(|| format!("{}: seeking", data_path.display()))?;
    let raw = match compressed {
        true => inflate_claimed(f, len - start, bytes, &data_path)?,
        false => {
            ensure!(bytes as u64 <= len - start, "{}: the header claims {bytes} bytes of voxel data, the file holds {}", data_path.display(), len - start);
            read_claimed(f, bytes, &data_path)?
        }
    };
    let (shape, g) = Geometry::from_axes(&sizes[..kept], &spacing, &origin, &columns);
    Ok(g.volume(shape, ty.decode(&raw, big_endian)))
}

/// Writes `v` as .mha (compressed, as SimpleITK writes nnU-Net's predictions) or as .mhd
/// beside a compressed .zraw.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let g = Geometry::of(v);
    ensure!(g.dims == 3 || v.shape[0] == 1, "a 2D geometry for a {:?} volume", v.shape);
    let n = g.dims;
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&ty.encode(&v.data))?;
    let data = enc.finish()?;
    let matrix: Vec<f64> = (0..n).flat_map(|c| (0..n).map(move |r| (c, r))).map(|(c, r)| g.direction[r][c]).collect();
    let detached = path.to_string_lossy().to_ascii_lowercase().ends_with(".mhd");
    let data_file = super::sibling(path, ".zraw");
    let identity = (0..n).all(|i| (0..n).all(|j| g.direction[i][j] == (i == j) as u8 as f64));
    let mut head = String::new();
    let mut put = |k: &str, val: String| head.push_str(&format!("{k} = {val}\n"));
    put("ObjectType", "Image".into());
    put("NDims", n.to_string());
    put("BinaryData", "True".into());
    put("BinaryDataByteOrderMSB", "False".into());
    put("CompressedData", "True".into());
    put("CompressedDataSize", data.len().to_string());
    put("TransformMatrix", itk::join(matrix));
    put("Offset", itk::join(g.origin[..n].iter().copied()));
    put("CenterOfRotation", itk::join(vec![0.0; n]));
    put("AnatomicalOrientation", if identity { "RAI" } else { "???" }[..n].to_string());
    put("ElementSpacing", itk::join(g.spacing[..n].iter().copied()));
    put("DimSize", g.sizes(v.shape).iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" "));
    put("ElementType", type_name(ty).into());
    let name = data_file.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    put("ElementDataFile", if detached { name } else { "LOCAL".into() });
    super::write_header_and_data(path, &head, b"", &data, detached.then_some(data_file.as_path()))
}
