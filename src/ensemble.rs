//! `segk ensemble`: nnU-Net's `nnUNetv2_ensemble` -- the probabilities (CASE.npz) of several
//! prediction folders averaged per case, turned into a label map (argmax, or for region nets
//! the regions over 0.5 in regions_class_order), written with the geometry of the first
//! folder's label map; optionally the averaged probabilities too.
//!
//! Streamed: the .npy inside each .npz is read in chunks, all folders in lockstep, one class
//! at a time (the array is (classes, z, y, x)), so memory is a running maximum and label per
//! voxel, never classes x voxels (nnU-Net holds every folder's whole array).

use crate::imageio::{self, VoxelType};
use crate::dataset::DatasetJson;
use crate::predict::export::Head;
use anyhow::{bail, ensure, Context, Result};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Values read per folder and step.
const CHUNK: usize = 1 << 16;

type Archive = zip::ZipArchive<std::fs::File>;

fn open_npz(npz: &Path) -> Result<Archive> {
    let file = std::fs::File::open(npz).with_context(|| format!("{}: cannot open", npz.display()))?;
    zip::ZipArchive::new(file).with_context(|| format!("{}: not a zip (.npz)", npz.display()))
}

/// The .npy stream of `probabilities` inside one CASE.npz, past its header.
struct NpyStream<'a> {
    path: PathBuf,
    reader: zip::read::ZipFile<'a, std::fs::File>,
    shape: Vec<usize>,
}

impl<'a> NpyStream<'a> {
    fn open(npz: &Path, archive: &'a mut Archive) -> Result<NpyStream<'a>> {
        let mut reader = archive.by_name("probabilities.npy").with_context(|| format!("{}: no probabilities array", npz.display()))?;
        let mut magic = [0u8; 10];
        reader.read_exact(&mut magic).with_context(|| format!("{}: truncated .npy header", npz.display()))?;
        ensure!(magic.starts_with(b"\x93NUMPY") && magic[6] == 1, "{}: not a version 1 .npy", npz.display());
        let mut dict = vec![0u8; u16::from_le_bytes([magic[8], magic[9]]) as usize];
        reader.read_exact(&mut dict).with_context(|| format!("{}: truncated .npy header", npz.display()))?;
        let dict = String::from_utf8_lossy(&dict).to_string();
        ensure!(dict.contains("'descr': '<f4'") && dict.contains("'fortran_order': False"), "{}: probabilities must be little-endian float32 in C order ({dict})", npz.display());
        let shape_text = dict.split("'shape': (").nth(1).and_then(|s| s.split(')').next()).with_context(|| format!("{}: no shape in {dict}", npz.display()))?;
        let shape: Vec<usize> = shape_text.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::parse).collect::<std::result::Result<_, _>>().with_context(|| format!("{}: bad shape {shape_text}", npz.display()))?;
        ensure!(shape.len() == 4, "{}: probabilities of shape {shape:?}, expected (classes, z, y, x)", npz.display());
        Ok(NpyStream { path: npz.to_path_buf(), reader, shape })
    }

    fn read(&mut self, out: &mut [f32]) -> Result<()> {
        self.reader.read_exact(bytemuck::cast_slice_mut(out)).with_context(|| format!("{}: probabilities end early", self.path.display()))
    }
}

/// The CASE.npz files every folder holds (nnU-Net requires all folders to hold the same).
pub fn common_cases(folders: &[PathBuf]) -> Result<Vec<String>> {
    let list = |d: &Path| crate::predict::names_in(d, |n| n.strip_suffix(".npz"));
    let first = list(&folders[0])?;
    ensure!(!first.is_empty(), "{}: no CASE.npz probability files (predict with --save-probabilities)", folders[0].display());
    for f in &folders[1..] {
        let other = list(f)?;
        ensure!(other == first, "{} and {} hold different cases ({} vs {} .npz files): ensemble folders predicted from the same images", folders[0].display(), f.display(), first.len(), other.len());
    }
    Ok(first)
}

/// Averages one case's probabilities over `folders` and writes its label map (with the first
/// folder's label map's header) and, when asked, the average as CASE.npz.
pub fn merge_case(folders: &[PathBuf], case: &str, ending: &str, head: &Head, output: &Path, save_probabilities: bool) -> Result<()> {
    let paths: Vec<PathBuf> = folders.iter().map(|f| f.join(format!("{case}.npz"))).collect();
    let mut archives = paths.iter().map(|p| open_npz(p)).collect::<Result<Vec<_>>>()?;
    let mut streams = paths.iter().zip(archives.iter_mut()).map(|(p, a)| NpyStream::open(p, a)).collect::<Result<Vec<_>>>()?;
    let shape = streams[0].shape.clone();
    for s in &streams[1..] {
        ensure!(s.shape == shape, "{}: probabilities of shape {:?}, {} has {shape:?}", s.path.display(), s.shape, streams[0].path.display());
    }
    let (classes, voxels) = (shape[0], shape[1] * shape[2] * shape[3]);
    ensure!(classes == head.outputs(), "{}: {classes} probability channels, the dataset.json has {}", streams[0].path.display(), head.outputs());
    let reference = folders[0].join(format!("{case}{ending}"));
    let vol = imageio::read(&reference).with_context(|| format!("{}: the first folder's label map gives the output's geometry", reference.display()))?;
    ensure!(vol.shape == [shape[1], shape[2], shape[3]], "{}: shape {:?}, its probabilities {:?}", reference.display(), vol.shape, &shape[1..]);

    let mut probs_out = match save_probabilities {
        true => Some(NpzWriter::create(&output.join(format!("{case}.npz")), &shape)?),
        false => None,
    };
    let (values, regions) = match head {
        Head::Softmax(v) => (v.clone(), false),
        Head::Regions(order) => (order.clone(), true),
    };
    let mut best = vec![f32::NEG_INFINITY; if regions { 0 } else { voxels }];
    let mut label = vec![0i16; voxels];
    let (mut sum, mut buf) = (vec![0.0f32; CHUNK], vec![0.0f32; CHUNK]);
    let count = folders.len() as f32;
    for c in 0..classes {
        let mut at = 0;
        while at < voxels {
            let n = CHUNK.min(voxels - at);
            sum[..n].fill(0.0);
            for s in &mut streams {
                s.read(&mut buf[..n])?;
                sum[..n].iter_mut().zip(&buf[..n]).for_each(|(a, b)| *a += b);
            }
            // Divided, as nnU-Net's `avg /= n` (a product by 1/n can differ by an ulp).
            sum[..n].iter_mut().for_each(|v| *v /= count);
            for (i, &p) in sum[..n].iter().enumerate() {
                let v = at + i;
                if regions {
                    if p > 0.5 {
                        label[v] = values[c];
                    }
                } else if p > best[v] {
                    // Strictly greater: the first of equal classes wins, as numpy's argmax.
                    (best[v], label[v]) = (p, values[c]);
                }
            }
            if let Some(w) = &mut probs_out {
                w.write(&sum[..n])?;
            }
            at += n;
        }
    }
    if let Some(w) = probs_out {
        w.finish()?;
    }
    let ty = VoxelType::for_labels(values.iter().copied().max().unwrap_or(0) as i64);
    let vol = vol.labels_like(label.iter().map(|&l| l as f32).collect());
    imageio::write_atomic(&output.join(format!("{case}{ending}")), &vol, ty)
}

/// A CASE.npz written as it streams in (temporary name, renamed when complete; removed if
/// the case fails before that).
struct NpzWriter {
    zip: Option<zip::ZipWriter<std::io::BufWriter<std::fs::File>>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl NpzWriter {
    fn create(path: &Path, shape: &[usize]) -> Result<NpzWriter> {
        let tmp = path.with_extension("npz.tmp");
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = NpzWriter { zip: Some(zip::ZipWriter::new(std::io::BufWriter::new(file))), tmp, path: path.to_path_buf() };
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated).compression_level(Some(1)).large_file(true);
        let zip = w.zip.as_mut().expect("just made");
        zip.start_file("probabilities.npy", opts).with_context(|| format!("writing {}", w.tmp.display()))?;
        zip.write_all(&crate::predict::probs::npy_header(shape)).with_context(|| format!("writing {}", w.tmp.display()))?;
        Ok(w)
    }
    fn write(&mut self, v: &[f32]) -> Result<()> {
        let zip = self.zip.as_mut().expect("written before finish");
        zip.write_all(bytemuck::cast_slice(v)).with_context(|| format!("writing {}", self.tmp.display()))
    }
    fn finish(mut self) -> Result<()> {
        let zip = self.zip.take().expect("finished once");
        zip.finish().map_err(anyhow::Error::from).and_then(|b| b.into_inner().map_err(|e| e.into_error().into())).and_then(|f| f.sync_all().map_err(Into::into)).with_context(|| format!("writing {}", self.tmp.display()))?;
        std::fs::rename(&self.tmp, &self.path).with_context(|| format!("renaming {} to {}", self.tmp.display(), self.path.display()))?;
        self.tmp = PathBuf::new();
        Ok(())
    }
}

/// A case that fails part way leaves no temporary behind.
impl Drop for NpzWriter {
    fn drop(&mut self) {
        if !self.tmp.as_os_str().is_empty() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// `segk ensemble -i F1 F2 .. -o OUT [--save-probabilities] [--dataset-json FILE]`.
pub fn command(folders: &[PathBuf], output: &Path, save_probabilities: bool, dataset_json: Option<&Path>) -> Result<()> {
    if folders.len() < 2 {
        bail!("ensemble needs at least two prediction folders (-i F1 F2 ..)");
    }
    let json_path = dataset_json.map(Path::to_path_buf).unwrap_or_else(|| folders[0].join("dataset.json"));
    ensure!(json_path.is_file(), "{}: no dataset.json (segk and nnU-Net write it into each prediction folder; or give --dataset-json)", json_path.display());
    let json: DatasetJson = crate::dataset::read_json_file(&json_path)?;
    let json_bytes = std::fs::read(&json_path).with_context(|| format!("{}: cannot read", json_path.display()))?;
    let head = Head::of(&json)?;
    let cases = common_cases(folders)?;
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    // Written from memory: -o may be one of the inputs.
    std::fs::write(output.join("dataset.json"), &json_bytes).with_context(|| format!("writing {}", output.join("dataset.json").display()))?;
    let t0 = std::time::Instant::now();
    for (k, case) in cases.iter().enumerate() {
        merge_case(folders, case, &json.file_ending, &head, output, save_probabilities).with_context(|| format!("case {case}"))?;
        println!("  {case} done ({}/{})", k + 1, cases.len());
    }
    println!("ensembled {} folders into {}: {} in {:.1} s", folders.len(), output.display(), crate::sysinfo::count(cases.len(), "case"), t0.elapsed().as_secs_f64());
    Ok(())
}
