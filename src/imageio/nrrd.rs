//! NRRD (.nrrd: header and data in one file; .nhdr: header naming a detached data file),
//! written against the NRRD0001-0005 specification: `field: value` lines up to a blank line,
//! voxels with the first axis fastest, raw, gzip or ASCII. ITK reads the world space as LPS:
//! a file in another anatomical space has its axes turned to LPS (what SimpleITK reports).

use super::itk::Geometry;
use super::{claimed_voxels, inflate_claimed, read_claimed, Volume, VoxelType};
use anyhow::{bail, ensure, Context, Result};
use std::io::{BufRead, Read, Seek, Write};
use std::path::Path;

/// Longest header segk reads.
const MAX_HEADER: u64 = 1 << 20;

fn type_of(name: &str) -> Option<VoxelType> {
    Some(match name {
        "signed char" | "int8" | "int8_t" => VoxelType::I8,
        "uchar" | "unsigned char" | "uint8" | "uint8_t" => VoxelType::U8,
        "short" | "short int" | "signed short" | "signed short int" | "int16" | "int16_t" => VoxelType::I16,
        "ushort" | "unsigned short" | "unsigned short int" | "uint16" | "uint16_t" => VoxelType::U16,
        "int" | "signed int" | "int32" | "int32_t" => VoxelType::I32,
        "uint" | "unsigned int" | "uint32" | "uint32_t" => VoxelType::U32,
        "longlong" | "long long" | "long long int" | "signed long long" | "signed long long int" | "int64" | "int64_t" => VoxelType::I64,
        "ulonglong" | "unsigned long long" | "unsigned long long int" | "uint64" | "uint64_t" => VoxelType::U64,
        "float" => VoxelType::F32,
        "double" => VoxelType::F64,
        _ => return None,
    })
}

fn type_name(ty: VoxelType) -> &'static str {
    match ty {
        VoxelType::U8 => "unsigned char",
        VoxelType::I8 => "signed char",
        VoxelType::U16 => "unsigned short",
        VoxelType::I16 => "short",
        VoxelType::U32 => "unsigned int",
        VoxelType::I32 => "int",
        VoxelType::U64 => "unsigned long long",
        VoxelType::I64 => "long long",
        VoxelType::F32 => "float",
        VoxelType::F64 => "double",
    }
}

/// Which world axes turn around to reach LPS, for NRRD's named 3D spaces.
fn to_lps(space: &str) -> Option<[f64; 3]> {
    let s = space.to_ascii_lowercase();
    Some(match s.as_str() {
        "left-posterior-superior" | "lps" | "scanner-xyz" | "3d-right-handed" | "3d-left-handed" => [1.0, 1.0, 1.0],
        "right-anterior-superior" | "ras" => [-1.0, -1.0, 1.0],
        "left-anterior-superior" | "las" => [1.0, -1.0, 1.0],
        _ => return None,
    })
}

/// "(1,0,0) (0,1,0) none": one vector per axis, `None` for a non-spatial axis.
fn vectors(text: &str, path: &Path) -> Result<Vec<Option<Vec<f64>>>> {
    let mut out = Vec::new();
    let mut rest = text.trim();
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("none") {
            out.push(None);
            rest = r.trim_start();
            continue;
        }
        let inner = rest.strip_prefix('(').and_then(|r| r.split_once(')')).with_context(|| format!("{}: {text:?} is not a list of (x,y,z) vectors", path.display()))?;
        let v: Option<Vec<f64>> = inner.0.split(',').map(|x| x.trim().parse().ok()).collect();
        let v = v.filter(|v| v.iter().all(|x: &f64| x.is_finite())).with_context(|| format!("{}: ({}) is not a vector of numbers", path.display(), inner.0))?;
        out.push(Some(v));
        rest = inner.1.trim_start();
    }
    Ok(out)
}

/// Reads a .nrrd or .nhdr image.
pub fn read(path: &Path) -> Result<Volume> {
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut r = std::io::BufReader::new(file);
    let mut fields: Vec<(String, String)> = Vec::new();
    {
        let mut limited = (&mut r).take(MAX_HEADER);
        let mut line = Vec::new();
        let mut first = true;
        loop {
            line.clear();
            if limited.read_until(b'\n', &mut line).with_context(|| format!("{}: reading the header", path.display()))? == 0 {
                ensure!(limited.limit() > 0, "{}: the header is longer than {MAX_HEADER} bytes", path.display());
                break; // a detached header may end without a blank line
            }
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end_matches(['\n', '\r']);
            if first {
                ensure!(text.starts_with("NRRD000"), "{}: not a NRRD file (no NRRD000X magic)", path.display());
                first = false;
                continue;
            }
            if text.is_empty() {
                break;
            }
            if text.starts_with('#') || text.contains(":=") {
                continue; // comments and key/value pairs carry nothing the image needs
            }
            let (k, v) = text.split_once(':').with_context(|| format!("{}: header line {:?} is not `field: value`", path.display(), text.chars().take(60).collect::<String>()))?;
            fields.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        ensure!(!first, "{}: empty file", path.display());
    }
    let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
    let need = |k: &str| get(k).with_context(|| format!("{}: the header has no `{k}` field", path.display()));
    let dims: usize = need("dimension")?.parse().with_context(|| format!("{}: dimension is not a number", path.display()))?;
    let ty_name = need("type")?;
    let ty = type_of(ty_name).with_context(|| format!("{}: type {ty_name:?} is not supported", path.display()))?;
    let sizes: Vec<usize> = need("sizes")?.split_whitespace().map(|s| s.parse().ok()).collect::<Option<_>>().filter(|s: &Vec<usize>| s.len() == dims).with_context(|| format!("{}: sizes must hold {dims} numbers", path.display()))?;
    let kept = match dims {
        2 | 3 => dims,
        4 if sizes[3] == 1 => 3,
        _ => bail!("{}: a {dims}D image with sizes {sizes:?}; segk reads 2D and 3D images", path.display()),
    };
    let encoding = need("encoding")?.to_ascii_lowercase();
    // A colour or vector axis (kinds RGB-color, vector, ...) is not a spatial one.
    if let Some(kinds) = get("kinds") {
        let spatial = ["domain", "space", "time", "???", "none"];
        if let Some(k) = kinds.split_whitespace().find(|k| !spatial.contains(&k.to_ascii_lowercase().as_str())) {
            bail!("{}: an axis of kind {k:?}: segk reads scalar images (one value per voxel)", path.display());
        }
    }
    let big_endian = get("endian").is_some_and(|e| e.eq_ignore_ascii_case("big"));
    // Geometry: space directions (with an origin) when there is a world space, else spacings.
    let flip = match get("space") {
        Some(s) => to_lps(s).with_context(|| format!("{}: space {s:?} is not one segk knows", path.display()))?,
        None => [1.0; 3],
    };
    let (spacing, origin, columns) = match get("space directions") {
        Some(text) => {
            let vs = vectors(text, path)?;
            ensure!(vs.len() == dims, "{}: space directions lists {} axes, dimension is {dims}", path.display(), vs.len());
            let mut spacing = Vec::new();
            let mut columns = Vec::new();
            for v in vs.iter().take(kept) {
                let v = v.as_ref().with_context(|| format!("{}: a spatial axis has no direction (`none`)", path.display()))?;
                let v: Vec<f64> = v.iter().zip(flip).map(|(x, f)| x * f).collect();
                let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                ensure!(n > 0.0, "{}: a space direction is the zero vector", path.display());
                spacing.push(n);
                columns.push(v.iter().map(|x| x / n).collect());
            }
            let origin = match get("space origin") {
                Some(o) => vectors(o, path)?.into_iter().next().flatten().unwrap_or_default().iter().zip(flip).map(|(x, f)| x * f).collect(),
                None => Vec::new(),
            };
            (spacing, origin, columns)
        }
        None => {
            let list = |k: &str| -> Vec<f64> { get(k).map(|s| s.split_whitespace().map(|x| x.parse().unwrap_or(f64::NAN)).collect()).unwrap_or_default() };
            let sp: Vec<f64> = list("spacings").into_iter().map(|x| if x.is_finite() { x } else { 1.0 }).collect();
            // As ITK: the origin from the axis mins, moved half a voxel in for cell centering
            // (NRRD's default).
            let node: Vec<bool> = get("centerings").map(|c| c.split_whitespace().map(|c| c.eq_ignore_ascii_case("node")).collect()).unwrap_or_default();
            let origin: Vec<f64> = list("axis mins").iter().enumerate().map(|(a, &m)| if m.is_finite() { m + if node.get(a) == Some(&true) { 0.0 } else { sp.get(a).copied().unwrap_or(1.0) / 2.0 } } else { 0.0 }).collect();
            (sp, origin, Vec::new())
        }
    };
    let voxels = claimed_voxels(path, &sizes)?;
    let bytes = voxels * ty.bytes();
    let data_name = get("data file").or(get("datafile")).map(str::to_string);
    let line_skip: usize = get("line skip").or(get("lineskip")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let byte_skip: i64 = get("byte skip").or(get("byteskip")).and_then(|v| v.parse().ok()).unwrap_or(0);
    let data = match data_name {
        None => {
            let at = r.stream_position().unwrap_or(0);
            decode(r, file_len.saturating_sub(at), &encoding, ty, bytes, big_endian, line_skip, byte_skip, path)?
        }
        Some(name) => {
            ensure!(!name.starts_with("LIST") && !name.contains('%') && !name.contains(' '), "{}: data file {name} (several data files) is not supported", path.display());
            let (f, len, data_path) = super::open_data_file(path, &name)?;
            decode(std::io::BufReader::new(f), len, &encoding, ty, bytes, big_endian, line_skip, byte_skip, &data_path)?
        }
    };
    let (shape, g) = Geometry::from_axes(&sizes[..kept], &spacing, &origin, &columns);
    Ok(g.volume(shape, data))
}

/// The voxels from `r` (at the data's start, `len` bytes left) in the given encoding.
#[allow(clippy::too_many_arguments)]
fn decode<R: BufRead + Seek>(mut r: R, mut len: u64, encoding: &str, ty: VoxelType, bytes: usize, big_endian: bool, line_skip: usize, byte_skip: i64, path: &Path) -> Result<Vec<f32>> {
    let mut line = Vec::new();
    for _ in 0..line_skip {
        line.clear();
        let n = (&mut r).take(MAX_HEADER).read_until(b'\n', &mut line)? as u64;
        ensure!(n > 0, "{}: line skip {line_skip} is past the data's end", path.display());
        len = len.saturating_sub(n);
    }
    match encoding {
        "raw" => {
            if byte_skip < 0 {
                let end = r.seek(std::io::SeekFrom::End(0))?;
                r.seek(std::io::SeekFrom::Start(end.saturating_sub(bytes as u64)))?;
            } else {
                ensure!(byte_skip as u64 <= len, "{}: byte skip {byte_skip} is past the data's end", path.display());
                std::io::copy(&mut (&mut r).take(byte_skip as u64), &mut std::io::sink())?;
                len -= byte_skip as u64;
                ensure!(bytes as u64 <= len, "{}: the header claims {bytes} bytes of voxel data, the file holds {len}", path.display());
            }
            Ok(ty.decode(&read_claimed(r, bytes, path)?, big_endian))
        }
        "hex" => {
            ensure!(byte_skip >= 0, "{}: byte skip -1 is only allowed with raw encoding", path.display());
            ensure!(bytes as u64 <= len / 2, "{}: the header claims {bytes} bytes of voxel data, more than {len} hex digits hold", path.display());
            let mut text = Vec::new();
            r.take(len).read_to_end(&mut text)?;
            let digits: Vec<u8> = text.iter().filter(|c| !c.is_ascii_whitespace()).map(|&c| (c as char).to_digit(16).map(|d| d as u8)).collect::<Option<_>>().with_context(|| format!("{}: hex data holds a character that is not a hex digit", path.display()))?;
            let raw: Vec<u8> = digits.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect();
            let raw = raw.get(byte_skip as usize..).unwrap_or_default();
            ensure!(raw.len() >= bytes, "{}: the header claims {bytes} bytes of voxel data, the hex data holds {}", path.display(), raw.len());
            Ok(ty.decode(&raw[..bytes], big_endian))
        }
        "gzip" | "gz" => {
            // Skipped bytes are counted in the decompressed stream, as the specification says.
            ensure!((0..1 << 20).contains(&byte_skip), "{}: byte skip {byte_skip} with gzip encoding is not supported", path.display());
            let raw = inflate_claimed(r, len, bytes + byte_skip as usize, path)?;
            Ok(ty.decode(&raw[byte_skip as usize..], big_endian))
        }
        "ascii" | "text" | "txt" => {
            let voxels = bytes / ty.bytes();
            // Each value takes at least two bytes (a digit and a separator).
            ensure!(voxels as u64 <= len / 2 + 1, "{}: the header claims {voxels} values, more than the file's {len} bytes hold", path.display());
            let mut text = String::new();
            r.take(len).read_to_string(&mut text).with_context(|| format!("{}: ASCII data is not text", path.display()))?;
            let v: Vec<f32> = text.split(|c: char| c.is_whitespace() || c == ',').filter(|s| !s.is_empty()).take(voxels).map(|s| s.parse::<f64>().map(|x| x as f32)).collect::<Result<_, _>>().with_context(|| format!("{}: ASCII data holds a value that is not a number", path.display()))?;
            ensure!(v.len() == voxels, "{}: the header claims {voxels} values, the data holds {}", path.display(), v.len());
            Ok(v)
        }
        other => bail!("{}: encoding {other:?} is not supported (raw, gzip, ascii and hex are)", path.display()),
    }
}

/// Writes `v` as .nrrd (gzip, LPS, as SimpleITK writes with compression) or as .nhdr beside
/// a .raw.gz.
pub fn write(path: &Path, v: &Volume, ty: VoxelType) -> Result<()> {
    let g = Geometry::of(v);
    ensure!(g.dims == 3 || v.shape[0] == 1, "a 2D geometry for a {:?} volume", v.shape);
    let n = g.dims;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(&ty.encode(&v.data))?;
    let data = enc.finish()?;
    let vector = |x: &[f64]| format!("({})", x.iter().map(|v| format!("{v}")).collect::<Vec<_>>().join(","));
    let dirs: Vec<String> = (0..n).map(|c| vector(&(0..n).map(|r| g.direction[r][c] * g.spacing[c]).collect::<Vec<_>>())).collect();
    let detached = path.to_string_lossy().to_ascii_lowercase().ends_with(".nhdr");
    let data_file = super::sibling(path, ".raw.gz");
    let mut head = String::from("NRRD0004\n# Complete NRRD file format specification at:\n# http://teem.sourceforge.net/nrrd/format.html\n");
    let mut put = |k: &str, val: String| head.push_str(&format!("{k}: {val}\n"));
    put("type", type_name(ty).into());
    put("dimension", n.to_string());
    // NRRD names 3D spaces only: a 2D image gets a space dimension, as SimpleITK writes it.
    match n {
        3 => put("space", "left-posterior-superior".into()),
        _ => put("space dimension", n.to_string()),
    }
    put("sizes", g.sizes(v.shape).iter().map(|s| s.to_string()).collect::<Vec<_>>().join(" "));
    put("space directions", dirs.join(" "));
    put("kinds", vec!["domain"; n].join(" "));
    put("endian", "little".into());
    put("encoding", "gzip".into());
    put("space origin", vector(&g.origin[..n]));
    if detached {
        put("data file", data_file.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default());
    }
    super::write_header_and_data(path, &head, b"\n", &data, detached.then_some(data_file.as_path()))
}
