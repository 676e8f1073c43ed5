//! `--save-probabilities`: the softmax (or, for region nets, the sigmoid) of the resampled
//! logits on the input's own grid, as nnU-Net saves it (CASE.npz holding `probabilities`,
//! float32, shape (classes, z, y, x) in SimpleITK's axis order; outside the crop background 1
//! for classes, every region 0). The exporter finishes slices in the
//! plan's axis order, which after untransposing lands anywhere in the volume, so the array is
//! a memory-mapped .npy beside the output (disk and page cache, not the heap), deflated into
//! the .npz at the end and removed.

use anyhow::{ensure, Context, Result};
use memmap2::MmapMut;
use std::path::{Path, PathBuf};

pub struct ProbFile {
    tmp: PathBuf,
    /// None once `finish` has unmapped it.
    map: Option<MmapMut>,
    data_offset: usize,
    voxels: usize,
    classes: usize,
    sigmoid: bool,
}

/// A case that fails (or a run that stops) before `finish` leaves no multi-GB temporary.
impl Drop for ProbFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Gives `file` its `len` bytes of disk now: writes through a mapping into a sparse file
/// would meet a full disk as SIGBUS.
fn reserve(file: &std::fs::File, len: usize, path: &Path) -> Result<()> {
    file.set_len(len as u64).with_context(|| format!("{}: cannot size to {len} bytes", path.display()))?;
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: a valid open descriptor, a range within i64.
        let rc = unsafe { libc::posix_fallocate(file.as_raw_fd(), 0, len as libc::off_t) };
        // EINVAL/EOPNOTSUPP: the filesystem cannot preallocate (tmpfs can); keep the sparse file.
        if rc != 0 && rc != libc::EINVAL && rc != libc::EOPNOTSUPP {
            anyhow::bail!("{}: cannot reserve {:.2} GiB for the probabilities ({}): free disk space or leave out --save-probabilities", path.display(), crate::sysinfo::gib(len as u64), std::io::Error::from_raw_os_error(rc));
        }
    }
    Ok(())
}

/// A .npy version 1.0 header for little-endian f32 of `shape`, padded so the data starts on a
/// 64-byte boundary (numpy's rule).
pub(crate) fn npy_header(shape: &[usize]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let mut dict = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}", dims.join(", ") + if shape.len() == 1 { "," } else { "" });
    let unpadded = 10 + dict.len() + 1;
    dict.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    dict.push('\n');
    let mut h = b"\x93NUMPY\x01\x00".to_vec();
    h.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    h.extend_from_slice(dict.as_bytes());
    h
}

impl ProbFile {
    /// Creates `tmp` for `classes` x `shape` voxels: class 0 (background) 1, the rest 0; or,
    /// for region nets (`sigmoid`), every region 0.
    pub fn create(tmp: &Path, classes: usize, shape: [usize; 3], sigmoid: bool) -> Result<ProbFile> {
        let header = npy_header(&[classes, shape[0], shape[1], shape[2]]);
        let voxels: usize = shape.iter().product();
        let len = header.len() + 4 * classes * voxels;
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let reserved = reserve(&file, len, tmp);
        if let Err(e) = reserved {
            let _ = std::fs::remove_file(tmp);
            return Err(e);
        }
        // SAFETY: the file was just created by this process and is not shared while mapped.
        let mut map = unsafe { MmapMut::map_mut(&file) }.with_context(|| format!("mapping {}", tmp.display()))?;
        map[..header.len()].copy_from_slice(&header);
        let mut p = ProbFile { tmp: tmp.to_path_buf(), map: Some(map), data_offset: header.len(), voxels, classes, sigmoid };
        if !sigmoid {
            p.probs()[..voxels].fill(1.0);
            p.release(0, voxels);
        }
        Ok(p)
    }

    fn probs(&mut self) -> &mut [f32] {
        let off = self.data_offset;
        bytemuck::cast_slice_mut(&mut self.map.as_mut().expect("mapped until finish")[off..])
    }

    /// Drops the mapped pages wholly inside voxels [from, from + len) of class 0's array (and
    /// the same range of every class) from this process: the data stays in the page cache and
    /// goes to disk, so RSS does not keep what is finished.
    fn release(&self, from: usize, len: usize) {
        let Some(map) = self.map.as_ref() else { return };
        let page = 4096;
        for c in 0..self.classes {
            let a = self.data_offset + 4 * (c * self.voxels + from);
            let (lo, hi) = (a.next_multiple_of(page), (a + 4 * len) / page * page);
            if lo < hi {
                // SAFETY: a shared file mapping: MADV_DONTNEED only unmaps the pages, their
                // contents stay in the file (page cache), and a later access faults them back.
                // The range is within the map; no reference into it is alive across this call.
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, lo, hi - lo) };
            }
        }
    }

    /// Voxels [from, from + len) (a finished stretch of the volume, every class) will not be
    /// written again.
    pub fn finished(&self, from: usize, len: usize) {
        self.release(from, len);
    }

    /// Writes the probabilities of `logits` (one value per output) at `voxel`.
    pub fn set(&mut self, voxel: usize, logits: &[f32]) {
        let n = self.voxels;
        if self.sigmoid {
            let probs = self.probs();
            for (c, &z) in logits.iter().enumerate() {
                probs[c * n + voxel] = super::export::sigmoid(z);
            }
            return;
        }
        let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum: f32 = logits.iter().map(|&z| (z - m).exp()).sum();
        let probs = self.probs();
        for (c, &z) in logits.iter().enumerate() {
            probs[c * n + voxel] = (z - m).exp() / sum;
        }
    }

    /// The probabilities in memory (outputs x z x y x), the mapped file removed.
    pub fn into_vec(mut self) -> Result<Vec<f32>> {
        let v = self.probs().to_vec();
        drop(self.map.take());
        Ok(v)
    }

    /// Deflates the array into `npz` (as `probabilities.npy`; temp file and rename) and
    /// removes the mapped file.
    pub fn finish(mut self, npz: &Path) -> Result<()> {
        // Unmap, then read the file through the page cache (no flush needed: the same cache),
        // so the deflate pass does not map the whole array into this process.
        drop(self.map.take());
        let tmp = &self.tmp;
        let part = npz.with_extension("npz.tmp");
        let write = || -> Result<()> {
            let mut src = std::fs::File::open(tmp)?;
            let out = std::fs::File::create(&part)?;
            let mut zip = zip::ZipWriter::new(std::io::BufWriter::new(out));
            // Level 1: probability maps are mostly 0 and 1 and deflate well even at the fastest level.
            let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).compression_level(Some(1)).large_file(true);
            zip.start_file("probabilities.npy", opts)?;
            std::io::copy(&mut src, &mut zip)?;
            zip.finish()?.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            Ok(())
        };
        if let Err(e) = write().and_then(|()| std::fs::rename(&part, npz).map_err(Into::into)) {
            let _ = std::fs::remove_file(&part);
            return Err(e.context(format!("writing {} (from {})", npz.display(), tmp.display())));
        }
        Ok(())
    }
}

/// Reads `probabilities` back from an .npz written by `finish` (for tests and checks): shape
/// and values.
pub fn read_npz(npz: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    use std::io::Read;
    let file = std::fs::File::open(npz).with_context(|| format!("opening {}", npz.display()))?;
    let mut zip = zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip", npz.display()))?;
    let mut entry = zip.by_name("probabilities.npy").with_context(|| format!("{}: no probabilities.npy", npz.display()))?;
    let mut bytes = Vec::new();
    entry.read_to_end(&mut bytes)?;
    ensure!(bytes.starts_with(b"\x93NUMPY") && bytes.len() > 10, "{}: not a .npy", npz.display());
    let hl = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let dict = std::str::from_utf8(&bytes[10..10 + hl])?;
    let shape_text = dict.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).with_context(|| format!("{}: no shape in {dict}", npz.display()))?;
    let shape: Vec<usize> = shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(|s| s.parse()).collect::<std::result::Result<_, _>>()?;
    let data: Vec<f32> = bytes[10 + hl..].chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    ensure!(data.len() == shape.iter().product::<usize>(), "{}: {} values for shape {shape:?}", npz.display(), data.len());
    Ok((shape, data))
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unfinished_file_is_removed_and_a_finished_one_reads_back() {
        let dir = std::env::temp_dir().join(format!("segk-probs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tmp = dir.join("a.npy.tmp");
        drop(super::ProbFile::create(&tmp, 3, [2, 3, 4], false).unwrap());
        assert!(!tmp.exists(), "a case that fails leaves no temporary");
        let mut p = super::ProbFile::create(&tmp, 3, [2, 3, 4], false).unwrap();
        p.set(5, &[0.0, (2f32).ln(), 0.0]);
        p.finish(&dir.join("a.npz")).unwrap();
        assert!(!tmp.exists() && !dir.join("a.npz.tmp").exists());
        let (shape, v) = super::read_npz(&dir.join("a.npz")).unwrap();
        assert_eq!(shape, vec![3, 2, 3, 4]);
        assert_eq!((v[5], v[24 + 5], v[48 + 5]), (0.25, 0.5, 0.25));
        assert_eq!((v[0], v[24], v[48]), (1.0, 0.0, 0.0), "untouched voxels are background");
        let mut p = super::ProbFile::create(&tmp, 2, [2, 3, 4], true).unwrap();
        p.set(7, &[0.0, (3f32).ln()]);
        p.finish(&dir.join("b.npz")).unwrap();
        let (_, v) = super::read_npz(&dir.join("b.npz")).unwrap();
        assert!(v[7] == 0.5 && (v[24 + 7] - 0.75).abs() < 1e-6, "region probabilities are sigmoids: {} {}", v[7], v[24 + 7]);
        assert!(v[0] == 0.0 && v[24] == 0.0, "untouched voxels are in no region");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn npy_headers_are_aligned_and_name_the_shape() {
        for shape in [vec![3, 4, 5, 6], vec![33, 600, 512, 512], vec![7]] {
            let h = super::npy_header(&shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(*h.last().unwrap(), b'\n');
            let text = String::from_utf8_lossy(&h[10..]);
            assert!(text.contains("'descr': '<f4'") && text.contains("'fortran_order': False"), "{text}");
            let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
            assert!(text.contains(&format!("'shape': ({}", dims.join(", "))), "{text}");
        }
    }
}
