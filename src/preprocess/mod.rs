//! `segk preprocess`: each raw case cropped to its nonzero region, transposed, normalised,
//! resampled to the plan's spacing, its foreground voxels sampled per class, and written to
//! the store (see [`crate::store`]). Cases run on N worker threads, each case on one thread
//! from start to end, so memory is bounded by N cases in flight; f32 throughout.

pub mod geometry;
pub mod normalize;
pub mod resample;
pub mod splits;

use crate::imageio;
use crate::dataset::{Case, Dataset, DatasetJson};
use crate::plan::fingerprint::{bounding_box, nonzero_mask, IntensityStats};
use crate::plan::plans_json::PlansJson;
use crate::store::{self, CaseHeader, ClassLocations, ImageDtype, LabelDtype};
use anyhow::{bail, ensure, Context, Result};
use geometry::{crop, transpose, Geometry};
use normalize::Scheme;
use rand::SeedableRng;
use rand_pcg::Pcg64;
use resample::{axis_kernels, new_shape, resample_image, resample_labels, Kernel};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

/// nnU-Net's foreground sampling: at least this many voxels per class...
pub const LOCATION_SAMPLES: usize = 10_000;
/// ...or this share of the class, whichever is more.
pub const LOCATION_COVERAGE: f64 = 0.01;
pub const LOCATION_SEED: u64 = 1234;

/// The classes foreground oversampling draws from: every foreground label (or region), and
/// with an ignore label also "any annotated voxel" (nnU-Net's extra class for sparse labels).
pub fn sampling_classes(json: &DatasetJson) -> Vec<Vec<i64>> {
    let ignore = json.ignore_label();
    let mut classes: Vec<Vec<i64>> = json
        .labels
        .iter()
        .filter(|(name, _)| *name != "background" && *name != "ignore")
        .map(|(_, v)| crate::dataset::values_of(v))
        .collect();
    classes.sort();
    if ignore.is_some() {
        let mut annotated: Vec<i64> = std::iter::once(-1).chain(json.label_values().into_iter().filter(|v| Some(*v) != ignore)).collect();
        annotated.dedup();
        classes.push(annotated);
    }
    classes
}

/// Everything a case needs from a configuration of a plans file and the dataset.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Target spacing in the transposed axis order; with two values (2d) the first axis keeps
    /// each case's own spacing, as nnU-Net's preprocessor does.
    pub spacing: Vec<f64>,
    pub transpose_forward: [usize; 3],
    /// Per channel, nnU-Net's scheme name.
    pub normalization: Vec<String>,
    pub use_mask_for_norm: Vec<bool>,
    pub stats: Vec<IntensityStats>,
    pub schemes: Vec<Scheme>,
    pub classes: Vec<Vec<i64>>,
    pub label_dtype: LabelDtype,
    pub image_dtype: ImageDtype,
}

impl Settings {
    pub fn new(json: &DatasetJson, plans: &PlansJson, configuration: &str, image_dtype: ImageDtype) -> Result<Settings> {
        let c = crate::plan::nnunet::resolve(plans, configuration)?;
        let what = format!("configuration {configuration} of {}", plans.plans_name);
        let missing = |key: &str| anyhow::anyhow!("{what} has no {key}");
        let spacing = c.spacing.clone().ok_or_else(|| missing("spacing"))?;
        ensure!(spacing.len() == 2 || spacing.len() == 3, "{what}: spacing {spacing:?} is neither 2d nor 3d");
        ensure!(spacing.iter().all(|s| s.is_finite() && *s > 0.0), "{what}: spacing {spacing:?} must be positive");
        let transpose_forward: [usize; 3] = plans.transpose_forward.as_slice().try_into().map_err(|_| anyhow::anyhow!("{}: transpose_forward {:?} is not 3 axes", plans.plans_name, plans.transpose_forward))?;
        let normalization = c.normalization_schemes.clone().ok_or_else(|| missing("normalization_schemes"))?;
        let use_mask_for_norm = c.use_mask_for_norm.clone().ok_or_else(|| missing("use_mask_for_norm"))?;
        let schemes = normalization.iter().map(|n| Scheme::from_name(n)).collect::<Result<Vec<_>>>()?;
        let stats = crate::plan::plans::intensity_stats(plans)?;
        ensure!(schemes.len() == json.channels() && use_mask_for_norm.len() == json.channels(), "{what} normalises {} channels, dataset.json declares {}", schemes.len(), json.channels());
        ensure!(stats.len() == json.channels(), "{} has intensity statistics for {} channels, dataset.json declares {}", plans.plans_name, stats.len(), json.channels());
        Ok(Settings { spacing, transpose_forward, normalization, use_mask_for_norm, stats, schemes, classes: sampling_classes(json), label_dtype: LabelDtype::for_labels(&json.label_values())?, image_dtype })
    }

    /// The spacing a case at `spacing` (transposed) is resampled to.
    pub fn target_spacing(&self, spacing: [f64; 3]) -> [f64; 3] {
        match self.spacing.as_slice() {
            &[a, b] => [spacing[0], a, b],
            s => [s[0], s[1], s[2]],
        }
    }
}

/// One preprocessed case, in memory.
pub struct Preprocessed {
    pub header: CaseHeader,
    pub channels: Vec<Vec<f32>>,
    pub seg: Vec<i16>,
    pub locations: Vec<Vec<[u32; 3]>>,
}

/// Integer labels of a label map read as f32, checked.
pub fn labels_of(v: &imageio::Volume, path: &Path) -> Result<Vec<i16>> {
    v.data
        .iter()
        .map(|&x| {
            if x.fract() != 0.0 || !(0.0..=i16::MAX as f32).contains(&x) {
                bail!("{}: label value {x} is not an integer in 0..=32767", path.display());
            }
            Ok(x as i16)
        })
        .collect()
}

/// Up to nnU-Net's quota of distinct voxels per class, drawn uniformly without replacement
/// (seeded), in two passes over the label map so memory stays at the quota.
pub fn sample_locations(seg: &[i16], shape: [usize; 3], classes: &[Vec<i64>], seed: u64) -> Vec<Vec<[u32; 3]>> {
    const OFF: i64 = 32768;
    let mut count = vec![0usize; 65536];
    seg.iter().for_each(|&l| count[(l as i64 + OFF) as usize] += 1);
    let mut classes_of: Vec<Vec<usize>> = vec![Vec::new(); 65536];
    for (k, c) in classes.iter().enumerate() {
        for &l in c {
            if (i16::MIN as i64..=i16::MAX as i64).contains(&l) {
                classes_of[(l + OFF) as usize].push(k);
            }
        }
    }
    let mut rng = Pcg64::seed_from_u64(seed);
    // Sorted ranks (among the class's voxels, in memory order) to keep.
    let picks: Vec<Vec<usize>> = classes
        .iter()
        .map(|c| {
            let total: usize = c.iter().filter(|&&l| (i16::MIN as i64..=i16::MAX as i64).contains(&l)).map(|&l| count[(l + OFF) as usize]).sum();
            let want = LOCATION_SAMPLES.min(total).max((total as f64 * LOCATION_COVERAGE).ceil() as usize);
            let mut r = rand::seq::index::sample(&mut rng, total, want).into_vec();
            r.sort_unstable();
            r
        })
        .collect();
    let mut seen = vec![0usize; classes.len()];
    let mut next = vec![0usize; classes.len()];
    let mut out: Vec<Vec<[u32; 3]>> = picks.iter().map(|p| Vec::with_capacity(p.len())).collect();
    let [_, h, w] = shape;
    for (i, &l) in seg.iter().enumerate() {
        for &k in &classes_of[(l as i64 + OFF) as usize] {
            if next[k] < picks[k].len() && picks[k][next[k]] == seen[k] {
                out[k].push([(i / (h * w)) as u32, ((i / w) % h) as u32, (i % w) as u32]);
                next[k] += 1;
            }
            seen[k] += 1;
        }
    }
    out
}

/// Settings that change what a stored case holds; a stored case made with others is redone.
fn settings_key(s: &Settings) -> String {
    serde_json::json!([s.spacing, s.transpose_forward, s.normalization, s.use_mask_for_norm, s.image_dtype, s.classes, s.stats]).to_string()
}

/// Channel images of one case, checked against `shape` (when given) and for non-finite voxels.
fn read_images(paths: &[PathBuf], shape: Option<[usize; 3]>) -> Result<(Vec<Vec<f32>>, imageio::Volume)> {
    let (images, first) = imageio::read_case(paths, shape)?;
    for (c, img) in images.iter().enumerate() {
        if let Some(bad) = img.iter().find(|x| !x.is_finite()) {
            bail!("{}: contains a non-finite voxel ({bad})", file_of_channel(paths, images.len(), c).display());
        }
    }
    Ok((images, first))
}

/// The file channel `c` of `channels` came from: its own, or the case's RGB(A) picture.
fn file_of_channel(paths: &[PathBuf], channels: usize, c: usize) -> &Path {
    match paths.len() == channels {
        true => &paths[c],
        false => &paths[0],
    }
}

/// Crop, transpose, normalise and resample channel images of `shape` (raw axis order) at
/// `spacing`, with their label map if any (without one, voxels outside the nonzero mask are
/// still marked -1 for the masked z-score). Returns channels, labels and the geometry.
fn prepare(images: Vec<Vec<f32>>, seg: Option<Vec<i16>>, raw: &imageio::Volume, paths: &[PathBuf], s: &Settings) -> Result<(Vec<Vec<f32>>, Vec<i16>, Geometry)> {
    let shape = raw.shape;
    // Crop to the nonzero region; label voxels outside it become -1 (background there).
    let mask = nonzero_mask(&images.iter().map(|v| v.as_slice()).collect::<Vec<_>>(), shape);
    let bbox = bounding_box(&mask, shape);
    let crop_shape: [usize; 3] = std::array::from_fn(|a| bbox[a][1] - bbox[a][0]);
    let mask = crop(&mask, shape, bbox);
    let mut seg = match seg {
        Some(l) => crop(&l, shape, bbox),
        None => vec![0; mask.len()],
    };
    seg.iter_mut().zip(&mask).filter(|(l, &m)| **l == 0 && !m).for_each(|(l, _)| *l = -1);
    drop(mask);
    let order = s.transpose_forward;
    let (seg, shape_t) = transpose(&seg, crop_shape, order);
    let spacing_t = order.map(|a| raw.spacing[a]);
    let target = s.target_spacing(spacing_t);
    let out_shape = new_shape(shape_t, spacing_t, target);
    crate::imageio::claimed_voxels(&paths[0], &out_shape).with_context(|| format!("resampling spacing {spacing_t:?} to {target:?} makes a grid of {out_shape:?}"))?;
    let mut channels = Vec::with_capacity(images.len());
    for (c, img) in images.into_iter().enumerate() {
        let (mut v, _) = transpose(&crop(&img, shape, bbox), crop_shape, order);
        drop(img);
        normalize::normalize(&mut v, s.schemes[c], s.use_mask_for_norm[c], &seg, &s.stats[c]).with_context(|| format!("{}", file_of_channel(paths, s.schemes.len(), c).display()))?;
        channels.push(resample_image(&v, shape_t, out_shape, axis_kernels(spacing_t, target, Kernel::Cubic)));
    }
    let seg = resample_labels(&seg, shape_t, out_shape, axis_kernels(spacing_t, target, Kernel::Linear));
    let geometry = Geometry { original_shape: shape, original_spacing: raw.spacing, bbox, transpose_forward: order, spacing: target, shape: out_shape, affine: raw.affine };
    Ok((channels, seg, geometry))
}

/// Preprocesses the channel images of a case to predict: channels on the plan's grid and the
/// geometry to map predictions back; also the first channel's volume (its header and grid).
pub fn preprocess_images(paths: &[PathBuf], s: &Settings) -> Result<(Vec<Vec<f32>>, Geometry, imageio::Volume)> {
    let (images, raw) = read_images(paths, None)?;
    ensure!(images.len() == s.schemes.len(), "{} channels read from {} file(s), the plan has {}", images.len(), paths.len(), s.schemes.len());
    let (channels, _, geometry) = prepare(images, None, &raw, paths, s)?;
    Ok((channels, geometry, raw))
}

/// Preprocesses the channels of a case given as arrays on a grid of `shape` ([z, y, x]) and
/// `spacing`, as `preprocess_images` does its files.
pub fn preprocess_arrays(images: Vec<Vec<f32>>, shape: [usize; 3], spacing: [f64; 3], s: &Settings) -> Result<(Vec<Vec<f32>>, Geometry)> {
    ensure!(images.len() == s.schemes.len(), "{} channels given, the plan has {}", images.len(), s.schemes.len());
    let affine = std::array::from_fn(|r| std::array::from_fn(|c| if c == r { spacing[2 - c] } else { 0.0 }));
    let raw = imageio::Volume { shape, spacing, affine, data: Vec::new(), header: imageio::Header::Tiff3d { spacing } };
    let (channels, _, geometry) = prepare(images, None, &raw, &[crate::predict::session::array_name()], s)?;
    Ok((channels, geometry))
}

/// Preprocesses one raw training case.
pub fn preprocess_case(case: &Case, s: &Settings) -> Result<Preprocessed> {
    let lab = imageio::read(&case.label)?;
    let seg = labels_of(&lab, &case.label)?;
    let (images, _) = read_images(&case.images, Some(lab.shape))?;
    ensure!(images.len() == s.schemes.len(), "case {}: {} channels read from {} file(s), the plan has {}", case.id, images.len(), case.images.len(), s.schemes.len());
    let (channels, seg, geometry) = prepare(images, Some(seg), &lab, &case.images, s)?;
    let out_shape = geometry.shape;
    let locations = sample_locations(&seg, out_shape, &s.classes, LOCATION_SEED);
    let mut offset = 0;
    let classes = s
        .classes
        .iter()
        .zip(&locations)
        .map(|(c, l)| {
            let e = ClassLocations { labels: c.clone(), offset, count: l.len() };
            offset += l.len();
            e
        })
        .collect();
    let header = CaseHeader { id: case.id.clone(), shape: out_shape, channels: channels.len(), image_dtype: s.image_dtype, label_dtype: s.label_dtype, classes, geometry, settings: settings_key(s) };
    Ok(Preprocessed { header, channels, seg, locations })
}

/// Host memory one case in flight may take, estimated from its voxels before and after
/// resampling: the image channels in f32 and the labels, read, cropped, transposed and
/// resampled, three copies alive at the peak. Measured (session 17, bench/RESULTS.md): a second
/// process added 91 MB for a 1-channel case of 3.2 M voxels in and 3.4 M out; this gives 95 MB.
pub fn case_bytes(voxels_in: usize, voxels_out: usize, channels: usize) -> u64 {
    ((voxels_in + voxels_out) * (4 * channels + 1) * 3) as u64
}

/// The most any one case of the fingerprint may take in flight under `settings`.
pub fn largest_case_bytes(fp: &crate::plan::fingerprint::Fingerprint, settings: &Settings, channels: usize) -> Option<u64> {
    // The target spacing is in transposed order; a 2d plan's has the in-plane axes only.
    let k = settings.spacing.len().min(3);
    let first = 3 - k;
    fp.shapes_after_crop
        .iter()
        .zip(&fp.spacings)
        .map(|(shape, spacing)| {
            let voxels_in: usize = shape.iter().product();
            let scale: f64 = (0..k).map(|i| spacing[settings.transpose_forward[first + i]] / settings.spacing[i].max(1e-12)).product();
            case_bytes(voxels_in, (voxels_in as f64 * scale).ceil() as usize, channels.max(1))
        })
        .max()
}

#[derive(Clone, Debug, Default)]
pub struct Summary {
    pub done: usize,
    pub skipped: usize,
    pub voxels_in: usize,
    pub voxels_out: usize,
    pub bytes_written: usize,
    pub seconds: f64,
}

/// A stored case (its complete header) made under the settings `key`: nothing to redo.
fn current(header: Option<&CaseHeader>, key: &str) -> bool {
    header.is_some_and(|h| h.settings == key)
}

/// The cases of `ids` that the store lacks or holds under other settings than `configuration` of `plans` gives
/// (either image dtype is accepted: that is the store's own choice), and the dtype the store
/// uses (f32 when it holds nothing): training must never read cases made for another plan.
pub fn stale_cases(store_dir: &Path, ids: &[String], json: &DatasetJson, plans: &PlansJson, configuration: &str) -> Result<(Vec<String>, ImageDtype)> {
    let headers: Vec<Option<CaseHeader>> = ids.iter().map(|id| store::complete_header(store_dir, id)).collect();
    let dtype = headers.iter().flatten().map(|h| h.image_dtype).next().unwrap_or(ImageDtype::F32);
    let key = settings_key(&Settings::new(json, plans, configuration, dtype)?);
    let stale = ids.iter().zip(&headers).filter(|(_, h)| !current(h.as_ref(), &key)).map(|(id, _)| id.clone()).collect();
    Ok((stale, dtype))
}

/// Preprocesses every case of `ds` not already complete in `store_dir` (made with the same
/// settings), on `workers` threads. The first failure stops the run after the cases in
/// flight finish; what was written stays and a rerun resumes.
pub fn run(ds: &Dataset, settings: &Settings, store_dir: &Path, workers: usize, progress: &indicatif::ProgressBar) -> Result<Summary> {
    std::fs::create_dir_all(store_dir).with_context(|| format!("creating {}", store_dir.display()))?;
    remove_temporaries(store_dir)?;
    let key = settings_key(settings);
    let todo: Vec<&Case> = ds.cases.iter().filter(|c| !current(store::complete_header(store_dir, &c.id).as_ref(), &key)).collect();
    let t0 = std::time::Instant::now();
    let summary = Mutex::new(Summary { skipped: ds.cases.len() - todo.len(), ..Summary::default() });
    progress.set_length(ds.cases.len() as u64);
    progress.set_position((ds.cases.len() - todo.len()) as u64);
    let (next, failed) = (AtomicUsize::new(0), AtomicBool::new(false));
    let first_error: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    std::thread::scope(|scope| {
        for _ in 0..workers.min(todo.len()).max(1) {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= todo.len() || failed.load(Ordering::Relaxed) {
                    break;
                }
                let case = todo[i];
                let r = preprocess_case(case, settings).and_then(|p| {
                    store::write_case(store_dir, &p.header, &p.channels, &p.seg, &p.locations)?;
                    Ok(p)
                });
                match r {
                    Ok(p) => {
                        let mut s = summary.lock().unwrap_or_else(|e| e.into_inner());
                        s.done += 1;
                        s.voxels_in += p.header.geometry.original_shape.iter().product::<usize>() * p.header.channels;
                        s.voxels_out += p.header.voxels() * p.header.channels;
                        s.bytes_written += p.header.voxels() * (p.header.channels * p.header.image_dtype.bytes() + p.header.label_dtype.bytes());
                        progress.set_message(case.id.clone());
                        progress.inc(1);
                        crate::sysinfo::log_when_hidden(progress, &case.id);
                    }
                    Err(e) => {
                        failed.store(true, Ordering::Relaxed);
                        first_error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e.context(format!("case {}", case.id)));
                    }
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|e| e.into_inner()) {
        return Err(e);
    }
    let mut s = summary.into_inner().unwrap_or_else(|e| e.into_inner());
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}

/// Leftovers of an interrupted run.
fn remove_temporaries(dir: &Path) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot list", dir.display()))?.flatten() {
        let p: PathBuf = e.path();
        if p.extension().is_some_and(|x| x == "tmp") {
            std::fs::remove_file(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}
