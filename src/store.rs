//! The preprocessed store: one folder per configuration, four files per case, all raw
//! little-endian so training maps them straight into memory:
//!
//! - `CASE.img`: the image, [z][y][x][channel] (NDHWC with N = 1), f32 or f16;
//! - `CASE.seg`: the label map [z][y][x], u8 (255 = outside the nonzero mask) when every
//!   label fits, else i16 (-1 = outside);
//! - `CASE.loc`: sampled foreground voxels per class, [z, y, x] as u32 triples;
//! - `CASE.json`: the header: shapes, dtypes, classes, and the geometry to undo at export.
//!
//! Every file is written under a temporary name and renamed into place, the header last, so a
//! case whose header exists and matches its files is complete: an interrupted run resumes.

use crate::preprocess::geometry::Geometry;
use anyhow::{bail, ensure, Context, Result};
use half::f16;
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageDtype {
    F32,
    F16,
}

impl ImageDtype {
    pub fn bytes(self) -> usize {
        match self {
            ImageDtype::F32 => 4,
            ImageDtype::F16 => 2,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LabelDtype {
    U8,
    I16,
}

/// The u8 code of nnU-Net's -1 ("outside the nonzero mask").
pub const U8_OUTSIDE: u8 = 255;

/// A stored u8 label as a label value (-1 outside the nonzero mask).
#[inline]
pub fn label_from_u8(v: u8) -> i16 {
    if v == U8_OUTSIDE { -1 } else { v as i16 }
}

impl LabelDtype {
    /// u8 when every label value fits below 255, else i16.
    pub fn for_labels(values: &[i64]) -> Result<LabelDtype> {
        if values.iter().all(|&v| (0..255).contains(&v)) {
            return Ok(LabelDtype::U8);
        }
        if let Some(v) = values.iter().find(|&&v| !(0..=i16::MAX as i64).contains(&v)) {
            bail!("label value {v} is outside 0..=32767");
        }
        Ok(LabelDtype::I16)
    }
    pub fn bytes(self) -> usize {
        match self {
            LabelDtype::U8 => 1,
            LabelDtype::I16 => 2,
        }
    }
}

/// Sampled voxels of one class (or region) for foreground oversampling.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ClassLocations {
    /// The label values the class covers (one, or a region's several).
    pub labels: Vec<i64>,
    /// Triples in the .loc file from `offset` on.
    pub offset: usize,
    pub count: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CaseHeader {
    pub id: String,
    /// Stored grid [z, y, x] (transposed, resampled).
    pub shape: [usize; 3],
    pub channels: usize,
    pub image_dtype: ImageDtype,
    pub label_dtype: LabelDtype,
    pub classes: Vec<ClassLocations>,
    pub geometry: Geometry,
    /// The preprocessing settings the case was made with (a change redoes the case).
    pub settings: String,
}

impl CaseHeader {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
    fn image_bytes(&self) -> usize {
        self.voxels() * self.channels * self.image_dtype.bytes()
    }
    fn label_bytes(&self) -> usize {
        self.voxels() * self.label_dtype.bytes()
    }
    fn loc_bytes(&self) -> usize {
        self.classes.iter().map(|c| c.count).sum::<usize>() * 12
    }
}

fn file(dir: &Path, id: &str, ext: &str) -> PathBuf {
    dir.join(format!("{id}.{ext}"))
}

/// Writes `bytes` to `path` through a temporary file and a rename.
fn refuse_folder(path: &Path) -> Result<()> {
    ensure!(!path.is_dir(), "{}: is a folder; name a file to write", path.display());
    Ok(())
}

/// Readies output file `path` before the work that fills it: refuses a folder, makes the
/// folder it goes in.
pub fn prepare_output_file(path: &Path) -> Result<()> {
    refuse_folder(path)?;
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display())),
        _ => Ok(()),
    }
}

/// A failed write leaves no temporary behind.
fn write_atomic(path: &Path, fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>) -> Result<()> {
    write_atomic_via(path, ".tmp", fill)
}

/// write_atomic through the temporary FILE`suffix`.
pub fn write_atomic_via(path: &Path, suffix: &str, fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> std::io::Result<()>) -> Result<()> {
    refuse_folder(path)?;
    let mut name = path.file_name().with_context(|| format!("{}: not a file name", path.display()))?.to_os_string();
    name.push(suffix);
    let tmp = path.with_file_name(name);
    let f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
    let written = fill(&mut w).and_then(|_| w.flush()).with_context(|| format!("writing {}", tmp.display()));
    drop(w);
    let done = written.and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display())));
    if done.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    done
}

/// Writes one case: channels (each [z][y][x] f32) interleaved into NDHWC, labels (-1 outside
/// the nonzero mask), sampled locations per class (in `header.classes` order), header last.
pub fn write_case(dir: &Path, header: &CaseHeader, channels: &[Vec<f32>], seg: &[i16], locations: &[Vec<[u32; 3]>]) -> Result<()> {
    let n = header.voxels();
    ensure!(channels.len() == header.channels && channels.iter().all(|c| c.len() == n), "case {}: channel sizes do not match the header", header.id);
    ensure!(seg.len() == n && locations.len() == header.classes.len(), "case {}: label map or locations do not match the header", header.id);
    if header.image_dtype == ImageDtype::F16 {
        if let Some(v) = channels.iter().flatten().find(|v| v.abs() > f16::MAX.to_f32()) {
            bail!("case {}: value {v} does not fit in f16 (max 65504): preprocess without --f16, or normalise this channel", header.id);
        }
    }
    // A redone case loses its old header first, so an interrupted redo reads as incomplete.
    match std::fs::remove_file(file(dir, &header.id, "json")) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).with_context(|| format!("removing the old header of case {}", header.id)),
        _ => {}
    }
    const CHUNK: usize = 1 << 16;
    write_atomic(&file(dir, &header.id, "img"), |w| {
        let mut buf = Vec::with_capacity(CHUNK * header.channels * 4);
        for start in (0..n).step_by(CHUNK) {
            buf.clear();
            for v in start..(start + CHUNK).min(n) {
                for c in channels {
                    match header.image_dtype {
                        ImageDtype::F32 => buf.extend_from_slice(&c[v].to_le_bytes()),
                        ImageDtype::F16 => buf.extend_from_slice(&f16::from_f32(c[v]).to_le_bytes()),
                    }
                }
            }
            w.write_all(&buf)?;
        }
        Ok(())
    })?;
    write_atomic(&file(dir, &header.id, "seg"), |w| match header.label_dtype {
        LabelDtype::U8 => w.write_all(&seg.iter().map(|&l| if l < 0 { U8_OUTSIDE } else { l as u8 }).collect::<Vec<u8>>()),
        LabelDtype::I16 => w.write_all(bytemuck::cast_slice(seg)),
    })?;
    write_atomic(&file(dir, &header.id, "loc"), |w| {
        for l in locations {
            w.write_all(bytemuck::cast_slice(l))?;
        }
        Ok(())
    })?;
    write_json_atomic(&file(dir, &header.id, "json"), header)
}

/// Writes `value` as pretty JSON through a temporary file and a rename.
pub fn write_json_atomic(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)?;
    // Several processes may write the same small file (the folds of one model started
    // together write its plans.json): each through its own temporary.
    write_atomic_via(path, &format!(".{}.tmp", std::process::id()), |w| w.write_all(text.as_bytes()))
}

/// The header of a complete case (header present and every file of the size it names).
pub fn complete_header(dir: &Path, id: &str) -> Option<CaseHeader> {
    let text = std::fs::read_to_string(file(dir, id, "json")).ok()?;
    let h: CaseHeader = serde_json::from_str(&text).ok()?;
    let size = |ext: &str| std::fs::metadata(file(dir, id, ext)).map(|m| m.len() as usize).ok();
    (size("img") == Some(h.image_bytes()) && size("seg") == Some(h.label_bytes()) && size("loc") == Some(h.loc_bytes())).then_some(h)
}

/// Identifiers of the complete cases in a store folder, sorted.
pub fn case_ids(dir: &Path) -> Result<Vec<String>> {
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}: cannot list the store", dir.display()))?;
    let mut ids: Vec<String> = rd.filter_map(|e| e.ok()).filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_suffix(".json")).map(str::to_string)).collect();
    ids.sort();
    Ok(ids.into_iter().filter(|id| complete_header(dir, id).is_some()).collect())
}

/// A stored case mapped into memory.
pub struct StoredCase {
    pub header: CaseHeader,
    img: Mmap,
    seg: Mmap,
    loc: Mmap,
}

pub(crate) fn map(path: &Path) -> Result<Mmap> {
    let f = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    // SAFETY: store files are written once under a temporary name and renamed into place;
    // nothing writes to them while they are mapped.
    unsafe { Mmap::map(&f) }.with_context(|| format!("{}: cannot map", path.display()))
}

/// Labels as stored.
pub enum Labels<'a> {
    U8(&'a [u8]),
    I16(&'a [i16]),
}

impl Labels<'_> {
    /// Label of voxel `i`, -1 outside the nonzero mask.
    pub fn get(&self, i: usize) -> i16 {
        match self {
            Labels::U8(v) => label_from_u8(v[i]),
            Labels::I16(v) => v[i],
        }
    }
    pub fn to_i16(&self) -> Vec<i16> {
        match self {
            Labels::U8(v) => v.iter().map(|&l| label_from_u8(l)).collect(),
            Labels::I16(v) => v.to_vec(),
        }
    }
}

impl StoredCase {
    pub fn open(dir: &Path, id: &str) -> Result<StoredCase> {
        let header = complete_header(dir, id).with_context(|| format!("{}: case {id} is missing or incomplete (run `segk preprocess` again to finish it)", dir.display()))?;
        Ok(StoredCase { img: map(&file(dir, id, "img"))?, seg: map(&file(dir, id, "seg"))?, loc: map(&file(dir, id, "loc"))?, header })
    }
    pub fn image_f32(&self) -> Option<&[f32]> {
        (self.header.image_dtype == ImageDtype::F32).then(|| bytemuck::cast_slice(&self.img[..]))
    }
    pub fn image_f16(&self) -> Option<&[f16]> {
        (self.header.image_dtype == ImageDtype::F16).then(|| bytemuck::cast_slice(&self.img[..]))
    }
    /// Channel `c` as f32 [z][y][x] (a copy).
    pub fn channel(&self, c: usize) -> Vec<f32> {
        let ch = self.header.channels;
        match (self.image_f32(), self.image_f16()) {
            (Some(v), _) => v.iter().skip(c).step_by(ch).copied().collect(),
            (_, Some(v)) => v.iter().skip(c).step_by(ch).map(|x| x.to_f32()).collect(),
            _ => unreachable!("an image is f32 or f16"),
        }
    }
    pub fn labels(&self) -> Labels<'_> {
        match self.header.label_dtype {
            LabelDtype::U8 => Labels::U8(&self.seg[..]),
            LabelDtype::I16 => Labels::I16(bytemuck::cast_slice(&self.seg[..])),
        }
    }
    /// Sampled voxels of class `k` (index into `header.classes`).
    pub fn locations(&self, k: usize) -> &[[u32; 3]] {
        let c = &self.header.classes[k];
        let all: &[[u32; 3]] = bytemuck::cast_slice(&self.loc[..]);
        &all[c.offset..c.offset + c.count]
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn atomic_writes_name_their_temporary_after_the_file_and_leave_none_behind() {
        let dir = std::env::temp_dir().join(format!("segk-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("a_folder")).unwrap();
        super::write_json_atomic(&dir.join("noext"), &[1, 2]).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("noext")).unwrap().split_whitespace().collect::<String>(), "[1,2]");
        let e = super::write_json_atomic(&dir.join("a_folder"), &[1]).unwrap_err().to_string();
        assert!(e.contains("a_folder: is a folder"), "{e}");
        let e = super::write_atomic(&dir.join("x.json"), |_| Err(std::io::Error::other("disk full"))).unwrap_err();
        assert!(format!("{e:#}").contains("disk full"), "{e:#}");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 2, "only noext and a_folder: {left:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
