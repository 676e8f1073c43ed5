//! Synthetic 3D segmentation cases: a few labelled structures of varied shape, size and
//! intensity in textured, noisy background under a smooth multiplicative bias field.
//! Labels: 1 = ellipsoid blobs, 2 = boxes, 3 = tubes (segments of a cylinder).

use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use rand_pcg::Pcg64;

pub const LABEL_NAMES: [&str; 4] = ["background", "blob", "box", "tube"];

/// One case: an image (one channel, z-scored) and its label map, both D x H x W.
pub struct Case {
    pub shape: [usize; 3],
    pub image: Vec<f32>,
    pub labels: Vec<u8>,
}

impl Case {
    pub fn voxels(&self) -> usize {
        self.shape.iter().product()
    }
}

fn idx(s: [usize; 3], z: usize, y: usize, x: usize) -> usize {
    (z * s[1] + y) * s[2] + x
}

/// Paints voxels where `inside(z, y, x)` with `label` and intensity `value`.
fn paint(c: &mut Case, base: &mut [f32], label: u8, value: f32, inside: impl Fn(f32, f32, f32) -> bool) {
    let s = c.shape;
    for z in 0..s[0] {
        for y in 0..s[1] {
            for x in 0..s[2] {
                if inside(z as f32, y as f32, x as f32) {
                    let i = idx(s, z, y, x);
                    c.labels[i] = label;
                    base[i] = value;
                }
            }
        }
    }
}

/// A random unit vector.
fn direction(r: &mut Pcg64) -> [f32; 3] {
    loop {
        let v: [f32; 3] = std::array::from_fn(|_| r.random_range(-1.0..1.0));
        let n = (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
        if n > 0.2 && n <= 1.0 {
            return v.map(|a| a / n);
        }
    }
}

/// Generates case `index` of a dataset; deterministic in (seed, index).
pub fn case(seed: u64, index: u64, shape: [usize; 3]) -> Case {
    let mut r = Pcg64::seed_from_u64(seed ^ (index.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let n = shape.iter().product();
    let mut c = Case { shape, image: vec![0.0; n], labels: vec![0; n] };
    let mut base = vec![0.0f32; n];
    let m = shape.map(|v| v as f32);
    let centre = |r: &mut Pcg64, margin: f32| -> [f32; 3] { std::array::from_fn(|a| r.random_range(margin..(m[a] - margin).max(margin + 1.0))) };
    // Tubes first so blobs and boxes may sit on top of them.
    for _ in 0..r.random_range(1..=2) {
        let (p, d, rad, half) = (centre(&mut r, 4.0), direction(&mut r), r.random_range(1.8f32..3.2), r.random_range(8.0f32..18.0));
        let v = r.random_range(0.45f32..0.75);
        paint(&mut c, &mut base, 3, v, |z, y, x| {
            let q = [z - p[0], y - p[1], x - p[2]];
            let t = q[0] * d[0] + q[1] * d[1] + q[2] * d[2];
            let perp2 = q.iter().map(|a| a * a).sum::<f32>() - t * t;
            t.abs() <= half && perp2 <= rad * rad
        });
    }
    for _ in 0..r.random_range(1..=2) {
        let (p, half) = (centre(&mut r, 6.0), [0; 3].map(|_: i32| r.random_range(2.5f32..6.5)));
        let v = r.random_range(-1.3f32..-0.8);
        paint(&mut c, &mut base, 2, v, |z, y, x| (z - p[0]).abs() <= half[0] && (y - p[1]).abs() <= half[1] && (x - p[2]).abs() <= half[2]);
    }
    for _ in 0..r.random_range(1..=3) {
        let (p, rad) = (centre(&mut r, 6.0), [0; 3].map(|_: i32| r.random_range(3.0f32..8.0)));
        let v = r.random_range(1.0f32..1.5);
        paint(&mut c, &mut base, 1, v, |z, y, x| {
            let q = [(z - p[0]) / rad[0], (y - p[1]) / rad[1], (x - p[2]) / rad[2]];
            q[0] * q[0] + q[1] * q[1] + q[2] * q[2] <= 1.0
        });
    }
    // Smooth bias field and noise, then z-score as nnU-Net does for non-CT images.
    let noise = Normal::new(0.0f32, r.random_range(0.2f32..0.35)).expect("positive sigma");
    let (f, ph): ([f32; 3], [f32; 3]) = (std::array::from_fn(|_| r.random_range(0.5f32..1.5)), std::array::from_fn(|_| r.random_range(0.0f32..std::f32::consts::TAU)));
    let amp = r.random_range(0.1f32..0.25);
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let i = idx(shape, z, y, x);
                let u = [z as f32 / m[0], y as f32 / m[1], x as f32 / m[2]];
                let bias = 1.0 + amp * (0..3).map(|a| (std::f32::consts::TAU * f[a] * u[a] + ph[a]).sin()).sum::<f32>() / 3.0;
                c.image[i] = (base[i] + 0.3) * bias + noise.sample(&mut r);
            }
        }
    }
    let mean = c.image.iter().sum::<f32>() / n as f32;
    let std = (c.image.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n as f32).sqrt().max(1e-6);
    c.image.iter_mut().for_each(|v| *v = (*v - mean) / std);
    c
}

/// Dice per label 1..classes of a prediction against a reference (NaN when a label is in
/// neither, as nnU-Net reports it).
pub fn dice_per_label(pred: &[u8], truth: &[u8], classes: usize) -> Vec<f64> {
    (1..classes as u8)
        .map(|l| {
            let (mut tp, mut fp, mut fn_) = (0usize, 0usize, 0usize);
            for (&p, &t) in pred.iter().zip(truth) {
                match (p == l, t == l) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fn_ += 1,
                    _ => {}
                }
            }
            if tp + fp + fn_ == 0 {
                f64::NAN
            } else {
                2.0 * tp as f64 / (2 * tp + fp + fn_) as f64
            }
        })
        .collect()
}

/// A generated raw dataset in nnU-Net's format: CT-like int16 images (0 outside an
/// elliptic body, so cropping has work), an organ (label 1) holding a lesion (label 2),
/// spacing jittered per case so resampling has work too.
#[derive(Clone, Debug)]
pub struct RawSpec {
    pub cases: usize,
    /// [z, y, x]
    pub shape: [usize; 3],
    /// [z, y, x], before a per-case jitter of up to +-20 %.
    pub spacing: [f64; 3],
    pub seed: u64,
}

/// One generated case: image and labels [z][y][x] and its spacing.
pub fn raw_case(spec: &RawSpec, index: usize) -> (Vec<f32>, Vec<u8>, [f64; 3]) {
    let mut r = Pcg64::seed_from_u64(spec.seed ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let spacing = spec.spacing.map(|s| s * r.random_range(0.8..1.2));
    let [d, h, w] = spec.shape;
    let m = spec.shape.map(|v| v as f32);
    // Body: an elliptic cylinder over most slices; organ and lesion: ellipsoids inside it.
    let body = [m[1] * r.random_range(0.38f32..0.46), m[2] * r.random_range(0.38f32..0.46)];
    let z_range = [(m[0] * r.random_range(0.0f32..0.1)) as usize, (m[0] * r.random_range(0.9f32..1.0)) as usize];
    let organ_c = [m[0] * r.random_range(0.35f32..0.65), m[1] * r.random_range(0.4f32..0.6), m[2] * r.random_range(0.35f32..0.65)];
    let organ_r = [m[0] * r.random_range(0.12f32..0.2), m[1] * r.random_range(0.12f32..0.2), m[2] * r.random_range(0.12f32..0.2)];
    let lesion_c: [f32; 3] = std::array::from_fn(|a| organ_c[a] + organ_r[a] * r.random_range(-0.4f32..0.4));
    let lesion_r: [f32; 3] = std::array::from_fn(|a| organ_r[a] * r.random_range(0.2f32..0.35));
    let noise = Normal::new(0.0f32, 15.0).expect("positive sigma");
    let (organ_hu, lesion_hu) = (r.random_range(90.0f32..120.0), r.random_range(30.0f32..60.0));
    let inside = |c: [f32; 3], rad: [f32; 3], p: [f32; 3]| (0..3).map(|a| ((p[a] - c[a]) / rad[a]).powi(2)).sum::<f32>() <= 1.0;
    let n = d * h * w;
    let (mut img, mut lab) = (vec![0.0f32; n], vec![0u8; n]);
    for z in z_range[0]..z_range[1].max(z_range[0] + 1).min(d) {
        for y in 0..h {
            for x in 0..w {
                let p = [z as f32, y as f32, x as f32];
                let (dy, dx) = ((p[1] - m[1] / 2.0) / body[0], (p[2] - m[2] / 2.0) / body[1]);
                if dy * dy + dx * dx > 1.0 {
                    continue;
                }
                let i = idx(spec.shape, z, y, x);
                let (hu, l) = if inside(lesion_c, lesion_r, p) { (lesion_hu, 2) } else if inside(organ_c, organ_r, p) { (organ_hu, 1) } else { (40.0, 0) };
                lab[i] = l;
                // Never exactly 0 inside the body, so the nonzero mask is the body.
                img[i] = (hu + noise.sample(&mut r)).round().max(1.0);
            }
        }
    }
    (img, lab, spacing)
}

/// Writes `spec` as DatasetXXX_Name folder `root` (dataset.json, imagesTr, labelsTr).
pub fn write_raw_dataset(root: &std::path::Path, spec: &RawSpec) -> anyhow::Result<()> {
    use crate::imageio::{self, header_for, Volume, VoxelType};
    use anyhow::Context;
    use rayon::prelude::*;
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(root.join(sub)).with_context(|| format!("creating {}", root.join(sub).display()))?;
    }
    let json = serde_json::json!({
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "numTraining": spec.cases,
        "file_ending": ".nii.gz",
        "name": root.file_name().map(|n| n.to_string_lossy().to_string()),
    });
    std::fs::write(root.join("dataset.json"), serde_json::to_string_pretty(&json)?).with_context(|| format!("writing {}", root.join("dataset.json").display()))?;
    let eye = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];
    (0..spec.cases).into_par_iter().try_for_each(|k| {
        let (img, lab, spacing) = raw_case(spec, k);
        let header = header_for(spec.shape, spacing, eye, [0.0; 3]);
        let v = Volume { shape: spec.shape, spacing, affine: [[0.0; 4]; 3], data: img, header };
        let id = format!("case_{k:04}");
        imageio::write(&root.join(format!("imagesTr/{id}_0000.nii.gz")), &v, VoxelType::I16)?;
        let l = Volume { data: lab.iter().map(|&x| x as f32).collect(), ..v };
        imageio::write(&root.join(format!("labelsTr/{id}.nii.gz")), &l, VoxelType::U8)
    })
}

/// `segk synth`: writes the generated raw dataset, saying how long it took.
pub fn command(root: &std::path::Path, spec: RawSpec) -> anyhow::Result<()> {
    anyhow::ensure!(spec.cases > 0 && spec.shape.iter().all(|&s| s >= 8), "need at least one case of at least 8 voxels per axis");
    let t0 = std::time::Instant::now();
    write_raw_dataset(root, &spec)?;
    println!("wrote {} cases of {:?} to {} in {:.1} s", spec.cases, spec.shape, root.display(), t0.elapsed().as_secs_f64());
    Ok(())
}
