//! The training data path: patches cut from the memory-mapped store (sampler), nnU-Net v2's
//! augmentation chain (spatial, intensity, mirroring), filled by a pool of worker threads
//! into a ring of batch slots (pool). Deep-supervision targets are made on the device from
//! the full-resolution labels (nearest-exact, as nnU-Net), so only those are uploaded.

pub mod cascade;
pub mod intensity;
pub mod pool;
pub mod sampler;
pub mod spatial;

use crate::store::{ImageDtype, LabelDtype, StoredCase};
use anyhow::{bail, Result};
use half::f16;
use pool::{Batch, Fill, FillError};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use spatial::{Mat3, Source, SpatialParams};
use std::path::Path;

/// Probabilities and ranges of the chain; the default is nnU-Net v2's.
#[derive(Clone, Copy, Debug)]
pub struct Augment {
    pub spatial: SpatialParams,
    pub p_noise: f64,
    pub noise_sigma: f64,
    pub p_blur: f64,
    pub p_blur_channel: f64,
    pub blur_sigma: (f64, f64),
    pub p_brightness: f64,
    pub brightness: (f64, f64),
    pub p_contrast: f64,
    pub contrast: (f64, f64),
    pub p_low_res: f64,
    pub p_low_res_channel: f64,
    pub low_res: (f64, f64),
    pub p_gamma_inverted: f64,
    pub p_gamma: f64,
    pub gamma: (f64, f64),
    pub p_mirror: f64,
    /// Axes mirroring may flip (each with `p_mirror`).
    pub mirror_axes: [bool; 3],
    /// Axes the low-resolution simulation downsamples (nnU-Net ignores the first when it
    /// augments in-plane).
    pub low_res_axes: [bool; 3],
}

impl Default for Augment {
    fn default() -> Self {
        Augment {
            spatial: SpatialParams::default(),
            p_noise: 0.1,
            noise_sigma: 0.1,
            p_blur: 0.2,
            p_blur_channel: 0.5,
            blur_sigma: (0.5, 1.0),
            p_brightness: 0.15,
            brightness: (0.75, 1.25),
            p_contrast: 0.15,
            contrast: (0.75, 1.25),
            p_low_res: 0.25,
            p_low_res_channel: 0.5,
            low_res: (0.5, 1.0),
            p_gamma_inverted: 0.1,
            p_gamma: 0.3,
            gamma: (0.7, 1.5),
            p_mirror: 0.5,
            mirror_axes: [true; 3],
            low_res_axes: [true; 3],
        }
    }
}

impl Augment {
    /// nnU-Net's chain for a configuration's patch: a 2d one (`slices`, one slice deep)
    /// turns and mirrors in its plane; an anisotropic 3d one turns in-plane and keeps its
    /// first axis at full resolution in the low-resolution simulation, but mirrors all three.
    pub fn nnunet(patch: [usize; 3], slices: bool) -> Augment {
        let spatial = SpatialParams::for_patch(patch, slices);
        let in_plane = spatial.rotation != spatial::Rotation::Volume;
        Augment { spatial, mirror_axes: [!slices, true, true], low_res_axes: [!in_plane, true, true], ..Augment::default() }
    }

    /// No augmentation at all: plain crops (validation, tests).
    pub fn none() -> Augment {
        Augment {
            spatial: SpatialParams { p_rotation: 0.0, p_scaling: 0.0, ..SpatialParams::default() },
            p_noise: 0.0,
            p_blur: 0.0,
            p_brightness: 0.0,
            p_contrast: 0.0,
            p_low_res: 0.0,
            p_gamma_inverted: 0.0,
            p_gamma: 0.0,
            p_mirror: 0.0,
            ..Augment::default()
        }
    }
}

/// What a batch looks like.
#[derive(Clone, Debug)]
pub struct BatchSpec {
    pub batch: usize,
    pub patch: [usize; 3],
    pub channels: usize,
    /// Channels whose normalisation used the nonzero mask: zero outside it after warping.
    pub use_mask: Vec<bool>,
    pub seed: u64,
    pub augment: Augment,
    /// A cascade stage's previous-stage inputs (their one-hot channels come after the image's).
    pub prev_stage: Option<PrevInputs>,
    /// The samples of each global batch this loader fills (one rank's share).
    pub shard: Shard,
}

/// Several ranks share each global batch: a rank's loader fills samples `first..first +
/// batch` of it, each drawn exactly as one process filling the whole batch would draw it (its
/// own seed from the batch number and its index in the global batch; nnU-Net's foreground
/// oversampling by that index), so no two ranks draw the same sample and the run is the one
/// process's run, whatever the number of ranks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Shard {
    pub first: usize,
    /// Samples per global batch; 0: the loader's own batch (one rank).
    pub global: usize,
}

/// The previous stage's label maps on the stored grids (`crate::cascade::prepare`), the labels
/// that become one-hot channels, and nnU-Net's augmentation of them.
#[derive(Clone, Debug)]
pub struct PrevInputs {
    pub dir: std::path::PathBuf,
    pub labels: Vec<i64>,
    pub augment: cascade::CascadeAugment,
}

impl BatchSpec {
    pub fn patch_voxels(&self) -> usize {
        self.patch.iter().product()
    }
    /// Channels read from the store (the rest are the previous stage's one-hot labels).
    pub fn image_channels(&self) -> usize {
        self.channels - self.prev_stage.as_ref().map_or(0, |p| p.labels.len())
    }
    pub fn slot_shape(&self) -> pool::SlotShape {
        let n = self.batch * self.patch_voxels();
        pool::SlotShape { image: n * self.channels, labels: n, batch: self.batch }
    }
    /// Bytes of one batch slot.
    pub fn slot_bytes(&self) -> usize {
        let s = self.slot_shape();
        s.image * 4 + s.labels
    }
    /// Bytes of one worker's scratch.
    pub fn scratch_bytes(&self) -> usize {
        // A cascade's worker also holds the warped map (i16) and, while it augments one label,
        // the distance transform (f64), two masks, component ids (u32) and their stack (usize).
        let cascade = if self.prev_stage.is_some() { 2 + 8 + 2 + 4 + 8 } else { 0 };
        self.patch_voxels() * (self.channels * 4 + 2 + 2 * 4 + cascade)
    }
}

/// Fills batches from a set of stored cases.
pub struct Augmenter {
    cases: Vec<StoredCase>,
    /// Per case: index of the "any annotated voxel" class (ignore-label datasets).
    annotated: Vec<Option<usize>>,
    spec: BatchSpec,
    size: [usize; 3],
    /// Per case, the previous stage's labels on its stored grid (cascade stages).
    prev: Vec<memmap2::Mmap>,
}

/// One worker's buffers, allocated once.
pub struct Scratch {
    image: Vec<f32>,
    labels: Vec<i16>,
    tmp: Vec<f32>,
    small: Vec<f32>,
    prev: Vec<i16>,
    case: String,
    stage: &'static str,
}

/// splitmix64: decorrelates the per-sample seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Augmenter {
    pub fn new(store: &Path, ids: &[String], spec: BatchSpec) -> Result<Augmenter> {
        if ids.is_empty() {
            bail!("{}: no cases to train on", store.display());
        }
        let cases = ids.iter().map(|id| StoredCase::open(store, id)).collect::<Result<Vec<_>>>()?;
        for c in &cases {
            if c.header.channels != spec.image_channels() {
                bail!("{}: case {} has {} channels, the plan {}", store.display(), c.header.id, c.header.channels, spec.image_channels());
            }
            if c.header.label_dtype == LabelDtype::I16 {
                bail!("{}: case {} has label values above 254; segk trains on up to 255 classes", store.display(), c.header.id);
            }
        }
        let annotated = cases.iter().map(|c| c.header.classes.iter().position(|k| k.labels.contains(&-1))).collect();
        // Without rotation or scaling nothing needs the larger box (nnU-Net's validation loader).
        let sp = &spec.augment.spatial;
        let size = if sp.p_rotation > 0.0 || sp.p_scaling > 0.0 { sampler::initial_patch_for(spec.patch, sp) } else { spec.patch };
        let prev = match &spec.prev_stage {
            Some(p) => {
                let maps = crate::cascade::open(&p.dir, ids)?;
                for (m, c) in maps.iter().zip(&cases) {
                    if m.len() != c.header.voxels() {
                        bail!("{}: the previous stage's map of case {} has {} voxels, the stored case {}", p.dir.display(), c.header.id, m.len(), c.header.voxels());
                    }
                }
                maps
            }
            None => Vec::new(),
        };
        Ok(Augmenter { cases, annotated, spec, size, prev })
    }

    pub fn case_id(&self, i: usize) -> &str {
        &self.cases[i].header.id
    }
    pub fn spec(&self) -> &BatchSpec {
        &self.spec
    }
    /// Bytes of the store files this augmenter maps.
    pub fn mapped_bytes(&self) -> usize {
        self.cases.iter().map(|c| c.header.voxels() * (c.header.channels * c.header.image_dtype.bytes() + c.header.label_dtype.bytes())).sum::<usize>() + self.prev.iter().map(|m| m.len()).sum::<usize>()
    }

    /// One sample: pick, warp, intensity chain, mask; into `w.image` / `w.labels`.
    /// Sample `j` of a global batch of `global`.
    fn sample(&self, w: &mut Scratch, rng: &mut Pcg64, j: usize, global: usize) -> std::result::Result<usize, FillError> {
        let spec = &self.spec;
        let ci = rng.random_range(0..self.cases.len());
        let case = &self.cases[ci];
        w.case.clear();
        w.case.push_str(&case.header.id);
        w.stage = "patch sampling";
        let h = &case.header;
        let class = if sampler::forced_foreground(j, global) { sampler::pick_class(rng, h, self.annotated[ci]) } else { self.annotated[ci].filter(|&k| h.classes[k].count > 0) };
        let voxel = class.map(|k| {
            let locs = case.locations(k);
            locs[rng.random_range(0..locs.len())]
        });
        let lo = sampler::pick_box(rng, h.shape, self.size, spec.patch, voxel);
        w.stage = "rotation/scaling";
        let m = spatial::draw(rng, &spec.augment.spatial);
        self.warp(case, lo, m.as_ref(), w);
        if let Some(map) = self.prev.get(ci) {
            let src = Source { image: &[] as &[f32], labels: &map[..], channels: 0, shape: h.shape, lo, size: self.size };
            spatial::sample(&src, m.as_ref(), spec.patch, &mut [], &mut w.prev);
        }
        self.intensity(w, rng);
        if let Some(p) = &spec.prev_stage {
            w.stage = "cascade inputs";
            let onehot = &mut w.image[spec.image_channels() * spec.patch_voxels()..];
            cascade::one_hot(&w.prev, &p.labels, onehot);
            cascade::augment(onehot, spec.patch, &p.augment, rng);
        }
        w.stage = "masking";
        let n = spec.patch_voxels();
        for (c, &mask) in spec.use_mask.iter().enumerate() {
            if mask {
                w.image[c * n..(c + 1) * n].iter_mut().zip(&w.labels).filter(|(_, &l)| l < 0).for_each(|(v, _)| *v = 0.0);
            }
        }
        if let Some(bad) = w.image.iter().find(|v| !v.is_finite()) {
            return Err(FillError { case: w.case.clone(), stage: "the final check", cause: format!("the augmented image holds {bad}") });
        }
        Ok(ci)
    }

    fn warp(&self, case: &StoredCase, lo: [i64; 3], m: Option<&Mat3>, w: &mut Scratch) {
        let h = &case.header;
        let labels = case.labels();
        macro_rules! go {
            ($img:expr, $lab:expr) => {{
                let src = Source { image: $img, labels: $lab, channels: h.channels, shape: h.shape, lo, size: self.size };
                spatial::sample(&src, m, self.spec.patch, &mut w.image[..self.spec.patch_voxels() * h.channels], &mut w.labels)
            }};
        }
        use crate::store::Labels;
        match (h.image_dtype, labels) {
            (ImageDtype::F32, Labels::U8(l)) => go!(case.image_f32().unwrap_or(&[]), l),
            (ImageDtype::F32, Labels::I16(l)) => go!(case.image_f32().unwrap_or(&[]), l),
            (ImageDtype::F16, Labels::U8(l)) => go!(case.image_f16().unwrap_or(&[] as &[f16]), l),
            (ImageDtype::F16, Labels::I16(l)) => go!(case.image_f16().unwrap_or(&[] as &[f16]), l),
        }
    }

    /// Noise, blur, brightness, contrast, low resolution, inverted gamma, gamma.
    fn intensity(&self, w: &mut Scratch, rng: &mut Pcg64) {
        let (a, n, shape) = (&self.spec.augment, self.spec.patch_voxels(), self.spec.patch);
        let chans = self.spec.image_channels();
        let coin = |rng: &mut Pcg64, p: f64| p > 0.0 && rng.random::<f64>() < p;
        w.stage = "gaussian noise";
        if coin(rng, a.p_noise) {
            let sigma = rng.random_range(0.0..a.noise_sigma) as f32;
            intensity::gaussian_noise(&mut w.image[..chans * n], sigma, rng);
        }
        w.stage = "gaussian blur";
        if coin(rng, a.p_blur) {
            for c in 0..chans {
                if coin(rng, a.p_blur_channel) {
                    let s = [0; 3].map(|_| rng.random_range(a.blur_sigma.0..a.blur_sigma.1));
                    intensity::gaussian_blur(&mut w.image[c * n..(c + 1) * n], shape, s, &mut w.tmp);
                }
            }
        }
        w.stage = "brightness";
        if coin(rng, a.p_brightness) {
            for c in 0..chans {
                let m = intensity::bg_contrast(rng, a.brightness.0, a.brightness.1) as f32;
                intensity::brightness(&mut w.image[c * n..(c + 1) * n], m);
            }
        }
        w.stage = "contrast";
        if coin(rng, a.p_contrast) {
            for c in 0..chans {
                let m = intensity::bg_contrast(rng, a.contrast.0, a.contrast.1) as f32;
                intensity::contrast(&mut w.image[c * n..(c + 1) * n], m);
            }
        }
        w.stage = "low-resolution simulation";
        if coin(rng, a.p_low_res) {
            for c in 0..chans {
                if coin(rng, a.p_low_res_channel) {
                    let s = rng.random_range(a.low_res.0..a.low_res.1) as f32;
                    let scales = a.low_res_axes.map(|on| if on { s } else { 1.0 });
                    intensity::low_resolution(&mut w.image[c * n..(c + 1) * n], shape, scales, &mut w.small);
                }
            }
        }
        for (p, invert, stage) in [(a.p_gamma_inverted, true, "inverted gamma"), (a.p_gamma, false, "gamma")] {
            w.stage = stage;
            if coin(rng, p) {
                for c in 0..chans {
                    let g = intensity::bg_contrast(rng, a.gamma.0, a.gamma.1) as f32;
                    intensity::gamma(&mut w.image[c * n..(c + 1) * n], g, invert);
                }
            }
        }
    }

    /// Writes sample `j` into the slot: NDHWC image and u8 labels (-1 becomes background),
    /// mirrored along the flipped axes on the way.
    fn write(&self, w: &Scratch, flip: [bool; 3], j: usize, b: &mut Batch) {
        let (p, c) = (self.spec.patch, self.spec.channels);
        let n = self.spec.patch_voxels();
        let (img, lab) = (&mut b.image[j * n * c..(j + 1) * n * c], &mut b.labels[j * n..(j + 1) * n]);
        let src = |i: usize, n: usize, f: bool| if f { n - 1 - i } else { i };
        for z in 0..p[0] {
            for y in 0..p[1] {
                let row = (src(z, p[0], flip[0]) * p[1] + src(y, p[1], flip[1])) * p[2];
                let o = (z * p[1] + y) * p[2];
                let (lo, li) = (&mut lab[o..o + p[2]], &w.labels[row..row + p[2]]);
                if flip[2] {
                    lo.iter_mut().zip(li.iter().rev()).for_each(|(d, &s)| *d = s.max(0) as u8);
                } else {
                    lo.iter_mut().zip(li).for_each(|(d, &s)| *d = s.max(0) as u8);
                }
                for ch in 0..c {
                    let si = &w.image[ch * n + row..ch * n + row + p[2]];
                    let di = img[o * c..(o + p[2]) * c].iter_mut().skip(ch).step_by(c);
                    if flip[2] {
                        di.zip(si.iter().rev()).for_each(|(d, &s)| *d = s);
                    } else {
                        di.zip(si).for_each(|(d, &s)| *d = s);
                    }
                }
            }
        }
    }
}

impl Fill for Augmenter {
    type Worker = Scratch;
    fn worker(&self) -> Scratch {
        let n = self.spec.patch_voxels();
        let prev = if self.spec.prev_stage.is_some() { vec![0; n] } else { Vec::new() };
        Scratch { image: vec![0.0; n * self.spec.channels], labels: vec![0; n], tmp: Vec::with_capacity(n), small: Vec::with_capacity(n), prev, case: String::new(), stage: "start" }
    }
    fn fill(&self, w: &mut Scratch, index: u64, b: &mut Batch) -> std::result::Result<(), FillError> {
        let global = if self.spec.shard.global == 0 { self.spec.batch } else { self.spec.shard.global };
        for j in 0..self.spec.batch {
            let g = self.spec.shard.first + j;
            let mut rng = Pcg64::seed_from_u64(mix(self.spec.seed ^ mix(index.wrapping_mul(1024).wrapping_add(g as u64))));
            let ci = self.sample(w, &mut rng, g, global)?;
            w.stage = "mirroring";
            let a = &self.spec.augment;
            let coins = [0; 3].map(|_| a.p_mirror > 0.0 && rng.random::<f64>() < a.p_mirror);
            let flip = std::array::from_fn(|d| coins[d] && a.mirror_axes[d]);
            self.write(w, flip, j, b);
            b.cases[j] = ci;
        }
        Ok(())
    }
    fn whereabouts(&self, w: &Scratch) -> (String, &'static str) {
        (w.case.clone(), w.stage)
    }
}

/// The running loader: the pool over an augmenter, with what it chose.
pub struct Loader {
    pub pool: pool::Pool,
    /// The cases, as a batch's `cases` indexes them.
    pub ids: Vec<String>,
}

/// Refuses when the slots and the workers' scratch do not fit in the memory available; the
/// mapped store only warns (its pages are page cache: the kernel drops and rereads them, so a
/// store larger than RAM trains, more slowly).
pub fn check_memory(spec: &BatchSpec, workers: usize, slots: usize, mapped: usize) -> Result<()> {
    let need = (slots * spec.slot_bytes() + workers * spec.scratch_bytes()) as u64;
    use crate::sysinfo::gib;
    if let Some(avail) = crate::sysinfo::host_memory_available() {
        if need > avail {
            bail!(
                "the loader needs {:.2} GiB of host memory ({} slots x {:.2} GiB and {} workers' scratch) but {:.2} GiB is available: use fewer --workers or a smaller batch or patch",
                gib(need), slots, gib(spec.slot_bytes() as u64), workers, gib(avail)
            );
        }
        if need + mapped as u64 > avail {
            println!("note: the store ({:.2} GiB) does not fit in the {:.2} GiB left beside the loader: cases will be reread from disk (`segk preprocess --f16` halves the store)", gib(mapped as u64), gib(avail.saturating_sub(need)));
        }
    }
    Ok(())
}

impl Loader {
    /// Starts `workers` threads (the thread policy's count) over the store's cases `ids`,
    /// with two slots per worker plus two from `mem`, batches numbered from `first`.
    pub fn start(store: &Path, ids: &[String], spec: BatchSpec, workers: usize, first: u64, mem: &dyn crate::hostmem::HostAlloc) -> Result<Loader> {
        let aug = Augmenter::new(store, ids, spec.clone())?;
        let slots = 2 * workers + 2;
        check_memory(&spec, workers, slots, aug.mapped_bytes())?;
        let pool = pool::Pool::start_in(std::sync::Arc::new(aug), workers, slots, spec.slot_shape(), first, mem)?;
        Ok(Loader { pool, ids: ids.to_vec() })
    }

    /// Host memory one more worker takes (its scratch and its two slots), and what the
    /// loader holds whatever the count (two slots).
    pub fn worker_bytes(spec: &BatchSpec) -> (u64, u64) {
        ((2 * spec.slot_bytes() + spec.scratch_bytes()) as u64, 2 * spec.slot_bytes() as u64)
    }
}

/// Advice when the trainer waited for data more than 5 % of the time and the thread policy
/// could not add a worker (the count was set, or every CPU has one).
pub fn data_wait_advice(wait_share: f64, workers: usize) -> Option<String> {
    if wait_share <= 0.05 {
        return None;
    }
    let cpus = crate::threads::Cpus::detect().usable();
    let want = ((workers as f64 / (1.0 - wait_share)).ceil() as usize).max(workers + 1);
    Some(if want < cpus {
        format!("the step waited for data {:.0} % of the time: raise --workers from {workers} to {want} (this machine has {cpus} CPUs)", wait_share * 100.0)
    } else {
        format!("the step waited for data {:.0} % of the time with {workers} workers on {cpus} CPUs: the CPUs cannot keep up; store images as f16 (`segk preprocess --f16`) or use a machine with more cores", wait_share * 100.0)
    })
}
