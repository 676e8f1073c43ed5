//! The data loader: each transform against its definition, the sampler's rules, the pool's
//! ordering, determinism, ownership and failure reporting.

mod common;

use segk::dataset::Dataset;
use segk::loader::intensity;
use segk::loader::pool::{Batch, Fill, FillError, Pool, SlotShape};
use segk::loader::sampler::{forced_foreground, initial_patch, initial_patch_for, pick_box};
use segk::loader::spatial::{affine, draw, sample, warp_reference, Rotation, Source, SpatialParams};
use segk::loader::{Augment, Augmenter, BatchSpec};
use segk::plan::fingerprint::fingerprint;
use segk::preprocess::Settings;
use segk::store::ImageDtype;
use segk::synth::{write_raw_dataset, RawSpec};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-loader-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A preprocessed store of `cases` generated cases; returns (store dir, case ids).
fn store(tag: &str, cases: usize) -> (PathBuf, Vec<String>) {
    let base = tmpdir(tag);
    let root = base.join("Dataset020_Loader");
    write_raw_dataset(&root, &RawSpec { cases, shape: [40, 56, 56], spacing: [1.0, 1.0, 1.0], seed: 5 }).unwrap();
    let ds = Dataset::open(&root).unwrap();
    let fp = fingerprint(&ds, 100_000).unwrap();
    let plans = segk::plan::plans::nnunet_default("t", &ds.json, &fp).unwrap();
    let s = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32).unwrap();
    let dir = base.join(segk::plan::plans::store_dir(&plans, "3d_fullres").unwrap());
    segk::preprocess::run(&ds, &s, &dir, 2, &indicatif::ProgressBar::hidden()).unwrap();
    (dir, ds.cases.iter().map(|c| c.id.clone()).collect())
}

fn spec(batch: usize, patch: [usize; 3], augment: Augment, seed: u64) -> BatchSpec {
    BatchSpec { batch, patch, channels: 1, use_mask: vec![false], seed, augment, prev_stage: None, shard: Default::default() }
}

#[test]
fn initial_patch_and_oversampling_follow_nnunet() {
    assert_eq!(initial_patch([128, 128, 128]), [205, 205, 205]);
    assert_eq!(initial_patch([64, 160, 160]), [159, 257, 200]);
    assert_eq!(initial_patch([80, 192, 160]), [194, 289, 210]);
    // nnU-Net's configure_rotation_dummyDA_mirroring_and_inital_patch_size then get_patch_size
    // (numbers from nnunetv2 2.8.1): a 2d patch turns by 180 degrees, or 15 when one side is
    // over 1.5x the other; an anisotropic 3d patch turns in-plane by 180 and keeps its depth.
    let deg = std::f64::consts::PI / 180.0;
    for (patch, slices, rotation, angle, size) in [
        ([1, 56, 64], true, Rotation::Slice, 180.0, [1, 75, 75]),
        ([1, 512, 256], true, Rotation::Slice, 15.0, [1, 659, 301]),
        ([16, 160, 192], false, Rotation::InPlane, 180.0, [16, 225, 225]),
        ([64, 160, 160], false, Rotation::Volume, 30.0, [159, 257, 200]),
    ] {
        let sp = SpatialParams::for_patch(patch, slices);
        assert_eq!((sp.rotation, (sp.max_angle / deg).round()), (rotation, angle), "{patch:?}");
        assert_eq!(initial_patch_for(patch, &sp), size, "{patch:?}");
    }
    let forced = |b: usize| (0..b).filter(|&j| forced_foreground(j, b)).count();
    assert_eq!([2, 3, 4, 5, 6, 8, 12].map(forced), [1, 1, 1, 2, 2, 3, 4]);
    assert!(forced_foreground(1, 2) && !forced_foreground(0, 2), "the last samples are the forced ones");
}

#[test]
fn boxes_stay_in_nnunets_range_and_centre_on_the_voxel() {
    let mut rng = Pcg64::seed_from_u64(1);
    let (shape, size, patch) = ([40, 50, 60], [64, 64, 64], [48, 48, 48]);
    for _ in 0..2000 {
        let lo = pick_box(&mut rng, shape, size, patch, None);
        for d in 0..3 {
            let need = if shape[d] >= patch[d] { size[d] - patch[d] } else { size[d] - shape[d] } as i64;
            let half = (need + 1) / 2;
            assert!(lo[d] >= -half && lo[d] <= shape[d] as i64 + half - size[d] as i64, "axis {d}: {lo:?}");
        }
    }
    let v = [20, 30, 40];
    let lo = pick_box(&mut rng, shape, size, patch, Some(v));
    assert_eq!(lo, [20 - 32, 30 - 32, 40 - 32], "centred on the voxel (lower clamp not reached)");
}

fn sphere(shape: [usize; 3], r: f64) -> Vec<u8> {
    let c = shape.map(|n| (n as f64 - 1.0) / 2.0);
    let mut v = Vec::new();
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                let d2 = (z as f64 - c[0]).powi(2) + (y as f64 - c[1]).powi(2) + (x as f64 - c[2]).powi(2);
                v.push(u8::from(d2 <= r * r));
            }
        }
    }
    v
}

#[test]
fn identity_warp_equals_the_crop_and_scaling_changes_volume_by_s_cubed() {
    let shape = [64, 64, 64];
    let n: usize = shape.iter().product();
    let img: Vec<f32> = (0..n).map(|i| (i % 977) as f32 * 0.01).collect();
    let lab = sphere(shape, 12.0);
    let src = Source { image: &img[..], labels: &lab[..], channels: 1, shape, lo: [0; 3], size: shape };
    let patch = [48, 48, 48];
    let pn: usize = patch.iter().product();
    let (mut a, mut la, mut b, mut lb) = (vec![0.0; pn], vec![0; pn], vec![0.0; pn], vec![0; pn]);
    sample(&src, None, patch, &mut a, &mut la);
    sample(&src, Some(&affine([0.0; 3], [1.0; 3])), patch, &mut b, &mut lb);
    assert_eq!(a, b, "rotation 0 and scale 1 is the plain crop");
    assert_eq!(la, lb);
    let v0 = la.iter().filter(|&&l| l == 1).count() as f64;
    for s in [0.8f64, 1.25] {
        sample(&src, Some(&affine([0.0; 3], [s; 3])), patch, &mut b, &mut lb);
        let v = lb.iter().filter(|&&l| l == 1).count() as f64;
        let want = v0 / s.powi(3);
        assert!((v / want - 1.0).abs() < 0.04, "scale {s}: sphere volume {v}, expected {want}");
    }
    // Rotation keeps a centred sphere's volume; 90 degrees about axis 0 maps (y, x) to (-x, y).
    sample(&src, Some(&affine([0.4, -0.3, 0.5], [1.0; 3])), patch, &mut b, &mut lb);
    let v = lb.iter().filter(|&&l| l == 1).count() as f64;
    assert!((v / v0 - 1.0).abs() < 0.03, "rotated sphere volume {v} vs {v0}");
    let half_pi = std::f64::consts::FRAC_PI_2;
    sample(&src, Some(&affine([half_pi, 0.0, 0.0], [1.0; 3])), patch, &mut b, &mut lb);
    let at = |v: &[f32], z: usize, y: usize, x: usize| v[(z * 48 + y) * 48 + x];
    for (z, y, x) in [(5, 7, 11), (20, 3, 40), (47, 47, 0)] {
        // out(z, y, x) reads in(z, c - (x - c), c + (y - c)) with centres 23.5 (out) and 31.5 (in).
        let want = img[((z + 8) * 64 + (55 - x)) * 64 + (y + 8)];
        assert!((at(&b, z, y, x) - want).abs() < 1e-4, "({z},{y},{x}): {} vs {want}", at(&b, z, y, x));
    }
    // Past the volume: image 0, labels -1.
    let far = Source { lo: [40, 40, 40], ..src };
    sample(&far, None, patch, &mut b, &mut lb);
    assert_eq!((b[pn - 1], lb[pn - 1]), (0.0, -1));
}

/// The fast warp (interior runs, unchecked reads) equals the per-voxel definition on random
/// rotations and scalings, with boxes that stick out of the volume on every side.
#[test]
fn fast_warp_equals_the_per_voxel_definition() {
    let mut rng = common::rng("warp");
    let shape = [37, 45, 52];
    let n: usize = shape.iter().product();
    for channels in [1, 2] {
        let img: Vec<f32> = (0..n * channels).map(|_| rng.random_range(-2.0..2.0)).collect();
        // Three labels in overlapping balls and a ring of "outside" (255 -> -1).
        let lab: Vec<u8> = (0..n)
            .map(|i| {
                let (z, y, x) = ((i / (45 * 52)) as f64, ((i / 52) % 45) as f64, (i % 52) as f64);
                let r = |c: [f64; 3]| ((z - c[0]).powi(2) + (y - c[1]).powi(2) + (x - c[2]).powi(2)).sqrt();
                if r([18.0, 22.0, 26.0]) > 30.0 { 255 } else if r([14.0, 20.0, 20.0]) < 9.0 { 1 } else if r([22.0, 25.0, 30.0]) < 8.0 { 2 } else { 0 }
            })
            .collect();
        for _ in 0..6 {
            let patch = [rng.random_range(8..24), rng.random_range(8..24), rng.random_range(8..30)];
            let size = patch.map(|p| p + rng.random_range(0..12));
            let lo: [i64; 3] = std::array::from_fn(|d| rng.random_range(-8..(shape[d] as i64 - size[d] as i64 + 8)));
            let src = Source { image: &img[..], labels: &lab[..], channels, shape, lo, size };
            let angles = [0; 3].map(|_| rng.random_range(-0.6..0.6));
            let m = affine(angles, [rng.random_range(0.7..1.4); 3]);
            let pn: usize = patch.iter().product();
            let (mut a, mut la, mut b, mut lb) = (vec![f32::NAN; pn * channels], vec![7; pn], vec![f32::NAN; pn * channels], vec![7; pn]);
            sample(&src, Some(&m), patch, &mut a, &mut la);
            warp_reference(&src, &m, patch, &mut b, &mut lb);
            assert_eq!(la, lb, "labels, patch {patch:?} box {lo:?}+{size:?}");
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5 && a.iter().all(|v| v.is_finite()), "image off by {worst}, patch {patch:?} box {lo:?}+{size:?}");
            // The store's other layouts: f16 images and i16 labels take the same paths.
            let img16: Vec<half::f16> = img.iter().map(|&v| half::f16::from_f32(v)).collect();
            let lab16: Vec<i16> = lab.iter().map(|&l| if l == 255 { -1 } else { l as i16 }).collect();
            let src16 = Source { image: &img16[..], labels: &lab16[..], channels, shape, lo, size };
            sample(&src16, Some(&m), patch, &mut a, &mut la);
            warp_reference(&src16, &m, patch, &mut b, &mut lb);
            assert_eq!(la, lb, "i16 labels, patch {patch:?} box {lo:?}+{size:?}");
            let worst = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(worst <= 1e-5, "f16 image off by {worst}");
        }
    }
}

fn stats(x: &[f32]) -> (f64, f64) {
    let m = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
    let v = x.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64;
    (m, v.sqrt())
}

#[test]
fn intensity_transforms_match_their_definitions() {
    let mut rng = Pcg64::seed_from_u64(7);
    let shape = [12, 14, 16];
    let n = 12 * 14 * 16;
    let base: Vec<f32> = (0..n).map(|i| ((i * 37 % 101) as f32) * 0.05 - 1.0).collect();
    let (m0, s0) = stats(&base);

    for invert in [false, true] {
        let mut x = base.clone();
        intensity::gamma(&mut x, 1.4, invert);
        let (m, s) = stats(&x);
        assert!((m - m0).abs() < 1e-4 && (s - s0).abs() < 1e-4, "gamma keeps mean and std ({m} {s} vs {m0} {s0})");
        assert!(x.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-3), "gamma 1.4 changes the image");
        let mut y = base.clone();
        intensity::gamma(&mut y, 1.0, invert);
        assert!(y.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-5), "gamma 1 is the identity");
    }

    let mut worst = 0.0f32;
    for i in 0..=100_000 {
        let x = i as f32 / 100_000.0;
        for g in [0.7f32, 0.93, 1.0, 1.27, 1.5] {
            let (a, b) = (intensity::pow01(x, g), x.powf(g));
            worst = worst.max((a - b).abs() / b.max(1e-30));
        }
    }
    assert!(worst < 1e-5, "pow01 relative error {worst}");
    assert_eq!(intensity::pow01(0.0, 0.7), 0.0);

    let mut x = base.clone();
    intensity::contrast(&mut x, 1.0);
    assert!(x.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-6));
    intensity::contrast(&mut x, 1.25);
    let (lo, hi) = base.iter().fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    assert!(x.iter().all(|&v| v >= lo && v <= hi), "contrast stays within the range");
    let (_, s) = stats(&x);
    assert!(s > s0, "contrast 1.25 spreads values");

    let mut x = base.clone();
    intensity::low_resolution(&mut x, shape, [1.0; 3], &mut Vec::new());
    assert!(x.iter().zip(&base).all(|(a, b)| (a - b).abs() < 1e-6), "scale 1 is the identity");
    let smooth: Vec<f32> = (0..n).map(|i| (i % 16) as f32).collect();
    let mut x = smooth.clone();
    intensity::low_resolution(&mut x, shape, [0.5; 3], &mut Vec::new());
    assert!(x.iter().zip(&smooth).all(|(a, b)| (a - b).abs() <= 1.0 + 1e-5), "a ramp stays within a voxel step");

    let mut x = vec![3.0f32; n];
    intensity::gaussian_blur(&mut x, shape, [0.7, 0.9, 0.5], &mut Vec::new());
    assert!(x.iter().all(|&v| (v - 3.0).abs() < 1e-5), "blur keeps a constant");
    for (sigma, width) in [(0.55, 3), (0.75, 5), (0.95, 7)] {
        let mut d = vec![0.0f32; n];
        d[(6 * 14 + 7) * 16 + 8] = 1.0;
        intensity::gaussian_blur(&mut d, shape, [0.5, 0.5, sigma], &mut Vec::new());
        let row = &d[(6 * 14 + 7) * 16..][..16];
        assert_eq!(row.iter().filter(|&&v| v > 0.0).count(), width, "sigma {sigma}: kernel width");
        assert!((d.iter().sum::<f32>() - 1.0).abs() < 1e-5, "interior blur keeps the sum");
    }

    let mut x = vec![0.0f32; 200_000];
    intensity::gaussian_noise(&mut x, 0.05, &mut rng);
    let (m, s) = stats(&x);
    assert!(m.abs() < 1e-3 && (s - 0.05).abs() < 1e-3, "noise mean {m}, std {s}");

    let draws: Vec<f64> = (0..20000).map(|_| intensity::bg_contrast(&mut rng, 0.75, 1.25)).collect();
    let below = draws.iter().filter(|&&v| v < 1.0).count() as f64 / 20000.0;
    assert!((below - 0.5).abs() < 0.02 && draws.iter().all(|&v| (0.75..=1.25).contains(&v)));
}

fn collect(dir: &std::path::Path, ids: &[String], spec: BatchSpec, workers: usize, batches: usize) -> Vec<(Vec<f32>, Vec<u8>, Vec<usize>)> {
    let aug = Arc::new(Augmenter::new(dir, ids, spec.clone()).unwrap());
    let mut pool = Pool::start(aug, workers, 3, spec.slot_shape(), 0).unwrap();
    (0..batches)
        .map(|k| {
            let b = pool.next_batch().unwrap();
            assert_eq!(b.index, k as u64, "batches arrive in order");
            let out = (b.image.to_vec(), b.labels.to_vec(), b.cases.clone());
            pool.give_back(b);
            out
        })
        .collect()
}

/// In-plane rotation (2d patches, anisotropic 3d ones) turns and scales axes 1 and 2 only:
/// the first axis maps to itself, so no slice mixes with another.
#[test]
fn in_plane_rotation_leaves_the_first_axis_alone() {
    let mut rng = Pcg64::seed_from_u64(4);
    for rotation in [Rotation::Volume, Rotation::InPlane, Rotation::Slice] {
        let p = SpatialParams { p_rotation: 1.0, p_scaling: 1.0, max_angle: std::f64::consts::PI, rotation, ..SpatialParams::default() };
        let mut mixed = false;
        for _ in 0..20 {
            let m = draw(&mut rng, &p).unwrap();
            let first_alone = m[0] == [1.0, 0.0, 0.0] && m[1][0] == 0.0 && m[2][0] == 0.0;
            assert!(rotation == Rotation::Volume || first_alone, "{rotation:?}: {m:?}");
            let det = m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1]) - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0]) + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]);
            assert!(det > 0.7f64.powi(3) - 1e-9 && det < 1.4f64.powi(3) + 1e-9, "a rotation times a scale");
            mixed |= !first_alone;
        }
        assert_eq!(mixed, rotation == Rotation::Volume, "{rotation:?}");
    }
    // The warp itself: nothing of a bright slice reaches the others.
    let (shape, patch) = ([4, 20, 20], [4, 16, 16]);
    let image: Vec<f32> = (0..shape.iter().product::<usize>()).map(|i| if i / (shape[1] * shape[2]) == 2 { 100.0 } else { 1.0 }).collect();
    let labels = vec![0u8; image.len()];
    let size = initial_patch_for(patch, &SpatialParams::for_patch(patch, false));
    assert_eq!(size[0], 4, "16 / 4 > nnU-Net's ANISO_THRESHOLD: in-plane");
    let src = Source { image: image.as_slice(), labels: labels.as_slice(), channels: 1, shape, lo: [0, -4, -4], size };
    let m = draw(&mut rng, &SpatialParams { p_rotation: 1.0, p_scaling: 1.0, ..SpatialParams::for_patch(patch, false) }).unwrap();
    let (mut out, mut lab) = (vec![0.0f32; patch.iter().product()], vec![0i16; patch.iter().product()]);
    sample(&src, Some(&m), patch, &mut out, &mut lab);
    for (i, &v) in out.iter().enumerate() {
        let z = i / (patch[1] * patch[2]);
        assert!((0.0..=if z == 2 { 100.0 } else { 1.0 } + 1e-4).contains(&v), "voxel {i}: {v} in slice {z}");
    }
    let centre = |z: usize| out[(z * patch[1] + patch[1] / 2) * patch[2] + patch[2] / 2];
    assert!((centre(2) - 100.0).abs() < 1e-3 && (centre(1) - 1.0).abs() < 1e-5, "{} {}", centre(2), centre(1));
}

/// Ranks sharing a global batch: each rank's loader fills its slice of the batch one process
/// would fill, sample for sample (the same cases, crops, augmentation and foreground
/// oversampling by the sample's place in the global batch).
#[test]
fn the_shards_of_a_batch_are_its_slices() {
    let (dir, ids) = store("shard", 3);
    let patch = [24, 32, 32];
    let whole = collect(&dir, &ids, spec(4, patch, Augment::default(), 5), 2, 3);
    let (n, c) = (patch.iter().product::<usize>(), 1);
    for (first, batch) in [(0, 2), (2, 2), (1, 1), (3, 1)] {
        let part = collect(&dir, &ids, BatchSpec { shard: segk::loader::Shard { first, global: 4 }, ..spec(batch, patch, Augment::default(), 5) }, 1, 3);
        for ((wi, wl, wc), (pi, pl, pc)) in whole.iter().zip(&part) {
            assert!(wi[first * n * c..(first + batch) * n * c] == pi[..], "image of samples {first}..{}", first + batch);
            assert!(wl[first * n..(first + batch) * n] == pl[..], "labels of samples {first}..{}", first + batch);
            assert_eq!(&wc[first..first + batch], &pc[..]);
        }
    }
}

#[test]
fn batches_depend_on_the_seed_only_and_mirroring_flips() {
    let (dir, ids) = store("det", 3);
    let patch = [24, 32, 32];
    let s = spec(2, patch, Augment::default(), 11);
    let a = collect(&dir, &ids, s.clone(), 1, 6);
    let b = collect(&dir, &ids, s.clone(), 3, 6);
    assert!(a == b, "1 and 3 workers give the same batches");
    let c = collect(&dir, &ids, BatchSpec { seed: 12, ..s }, 2, 6);
    assert!(a != c, "another seed, other batches");

    // Everything drawn before mirroring is the same with p_mirror 1 and 0: one is the other flipped.
    let plain = collect(&dir, &ids, spec(2, patch, Augment { p_mirror: 0.0, ..Augment::default() }, 3), 2, 3);
    let flipped = collect(&dir, &ids, spec(2, patch, Augment { p_mirror: 1.0, ..Augment::default() }, 3), 2, 3);
    let n = patch.iter().product::<usize>();
    for ((pi, pl, _), (fi, fl, _)) in plain.iter().zip(&flipped) {
        for o in 0..2 * n {
            let (j, v) = (o / n, o % n);
            let (z, y, x) = (v / (patch[1] * patch[2]), (v / patch[2]) % patch[1], v % patch[2]);
            let m = j * n + ((patch[0] - 1 - z) * patch[1] + (patch[1] - 1 - y)) * patch[2] + (patch[2] - 1 - x);
            assert_eq!((pi[o], pl[o]), (fi[m], fl[m]), "mirroring every axis is a flip");
        }
    }
    // A 2d configuration mirrors in-plane only.
    let in_plane = collect(&dir, &ids, spec(2, patch, Augment { p_mirror: 1.0, mirror_axes: [false, true, true], ..Augment::default() }, 3), 2, 3);
    for ((pi, _, _), (fi, _, _)) in plain.iter().zip(&in_plane) {
        for o in 0..2 * n {
            let (j, v) = (o / n, o % n);
            let (z, y, x) = (v / (patch[1] * patch[2]), (v / patch[2]) % patch[1], v % patch[2]);
            assert_eq!(pi[o], fi[j * n + (z * patch[1] + (patch[1] - 1 - y)) * patch[2] + (patch[2] - 1 - x)]);
        }
    }
}

/// A cascade stage's extra channels are the previous stage's labels, one-hot: with the
/// dataset's own label maps as the "previous stage", every sample's one-hot channels say what
/// its labels say, voxel by voxel (the maps warp with the image and labels).
#[test]
fn cascade_channels_are_the_previous_stages_one_hot_labels() {
    use segk::loader::cascade::CascadeAugment;
    use segk::loader::PrevInputs;
    let (dir, ids) = store("cascade", 2);
    let root = dir.parent().unwrap().join("Dataset020_Loader");
    let maps = dir.parent().unwrap().join("prev_inputs");
    segk::cascade::prepare(&dir, &ids, &root.join("labelsTr"), ".nii.gz", &maps).unwrap();
    let labels = vec![1, 2];
    let patch = [24, 32, 32];
    let n = patch.iter().product::<usize>();
    for (augment, name) in [(Augment::none(), "plain crops"), (Augment { p_mirror: 0.5, spatial: SpatialParams { p_rotation: 1.0, p_scaling: 1.0, ..SpatialParams::default() }, ..Augment::none() }, "rotated, scaled, mirrored")] {
        let prev_stage = Some(PrevInputs { dir: maps.clone(), labels: labels.clone(), augment: CascadeAugment::none() });
        let s = BatchSpec { batch: 2, patch, channels: 3, use_mask: vec![false], seed: 5, augment, prev_stage, shard: Default::default() };
        let (mut agree, mut total, mut fg) = (0, 0, 0);
        for (image, lab, _) in collect(&dir, &ids, s, 1, 4) {
            for j in 0..2 {
                for v in 0..n {
                    let l = lab[j * n + v];
                    let hot = [image[(j * n + v) * 3 + 1], image[(j * n + v) * 3 + 2]];
                    assert!(hot.iter().all(|&h| h == 0.0 || h == 1.0) && hot[0] + hot[1] <= 1.0, "{name}: one-hot");
                    total += 1;
                    fg += usize::from(l != 0);
                    agree += usize::from(hot == [f32::from(u8::from(l == 1)), f32::from(u8::from(l == 2))]);
                }
            }
        }
        assert!(fg > 1000, "{name}: foreground sampled ({fg})");
        // Labels and maps interpolate alike; they may part only where their warps round apart.
        let share = agree as f64 / total as f64;
        assert!(share >= if name == "plain crops" { 1.0 } else { 0.995 }, "{name}: one-hot agrees with the labels on {share}");
    }
}

#[test]
fn forced_samples_centre_on_foreground() {
    let (dir, ids) = store("fg", 3);
    let patch = [24, 32, 32];
    let n = patch.iter().product::<usize>();
    let centre = (patch[0] / 2 * patch[1] + patch[1] / 2) * patch[2] + patch[2] / 2;
    // Training boxes (the larger initial patch) centre on the voxel; without rotation or
    // scaling the box is the patch (nnU-Net's validation loader) and only holds it.
    let centred = Augment { spatial: SpatialParams { p_rotation: 1e-12, ..SpatialParams::default() }, ..Augment::none() };
    let batches = collect(&dir, &ids, spec(3, patch, centred, 4), 2, 60);
    let (mut forced_fg, mut free_fg) = (0, 0);
    for (_, labels, _) in &batches {
        forced_fg += usize::from(labels[2 * n + centre] != 0);
        free_fg += usize::from(labels[centre] != 0);
    }
    assert_eq!(forced_fg, 60, "every forced sample (the last of 3) has foreground at its centre");
    let val = collect(&dir, &ids, spec(3, patch, Augment::none(), 4), 2, 30);
    assert!(val.iter().all(|(_, labels, _)| labels[2 * n..].iter().any(|&l| l != 0)), "validation: forced samples hold foreground");
    assert!(free_fg < 30, "free samples are not centred on foreground ({free_fg} of 60 were)");
}

/// A filler that stamps the batch index over the whole slot, slowly, to catch two owners.
struct Stamp {
    fail_at: Option<u64>,
    panic_at: Option<u64>,
}

impl Fill for Stamp {
    type Worker = u64;
    fn worker(&self) -> u64 {
        0
    }
    fn fill(&self, w: &mut u64, index: u64, b: &mut Batch) -> Result<(), FillError> {
        *w = index;
        if self.fail_at == Some(index) {
            return Err(FillError { case: "case_0007".into(), stage: "gaussian blur", cause: "corrupt".into() });
        }
        if self.panic_at == Some(index) {
            panic!("boom");
        }
        for (i, v) in b.image.iter_mut().enumerate() {
            *v = index as f32;
            if i % 4096 == 0 {
                std::thread::yield_now();
            }
        }
        b.labels.iter_mut().for_each(|l| *l = (index % 251) as u8);
        Ok(())
    }
    fn whereabouts(&self, w: &u64) -> (String, &'static str) {
        (format!("batch-{w}"), "stamping")
    }
}

#[test]
fn the_ring_never_gives_a_slot_two_owners() {
    let shape = SlotShape { image: 50_000, labels: 1000, batch: 1 };
    for (workers, slots) in [(8, 2), (3, 7), (1, 1)] {
        let mut pool = Pool::start(Arc::new(Stamp { fail_at: None, panic_at: None }), workers, slots, shape, 5).unwrap();
        let mut held = Vec::new();
        for k in 5..400u64 {
            let b = pool.next_batch().unwrap();
            assert_eq!(b.index, k);
            assert!(b.image.iter().all(|&v| v == k as f32) && b.labels.iter().all(|&l| l == (k % 251) as u8), "slot {} written by another owner", b.slot);
            held.push(b);
            // Hold up to slots-1 batches a while, so workers race for the rest.
            if held.len() >= slots || k % 3 == 0 {
                for b in held.drain(..) {
                    pool.give_back(b);
                }
            }
        }
    }
}

#[test]
fn a_failing_worker_is_named_within_a_second() {
    let shape = SlotShape { image: 1000, labels: 100, batch: 1 };
    for filler in [Stamp { fail_at: Some(3), panic_at: None }, Stamp { fail_at: None, panic_at: Some(3) }] {
        let panics = filler.panic_at.is_some();
        let t0 = Instant::now();
        let mut pool = Pool::start(Arc::new(filler), 4, 4, shape, 0).unwrap();
        let err = loop {
            match pool.next_batch() {
                Ok(b) => pool.give_back(b),
                Err(e) => break e.to_string(),
            }
        };
        if panics {
            assert!(err.contains("augmentation worker") && err.contains("batch-3") && err.contains("stamping") && err.contains("boom"), "{err}");
        } else {
            assert!(err.contains("augmentation worker") && err.contains("case_0007 during gaussian blur") && err.contains("corrupt"), "{err}");
        }
        drop(pool);
        assert!(t0.elapsed() < Duration::from_secs(1), "reported and shut down in {:?}", t0.elapsed());
    }
}

#[test]
fn data_wait_advice_when_the_policy_cannot_add_a_worker() {
    let advice = segk::loader::data_wait_advice(0.2, 1).unwrap_or_default();
    assert!(advice.contains("20 %"), "{advice}");
    assert!(segk::loader::data_wait_advice(0.01, 1).is_none());
}

#[test]
fn a_loader_that_cannot_fit_in_ram_is_refused_with_numbers() {
    let huge = BatchSpec { batch: 64, patch: [512, 512, 512], channels: 4, use_mask: vec![false; 4], seed: 0, augment: Augment::none(), prev_stage: None, shard: Default::default() };
    let e = segk::loader::check_memory(&huge, 8, 18, 1 << 30).unwrap_err().to_string();
    assert!(e.contains("GiB of host memory") && e.contains("available") && e.contains("--workers"), "{e}");
    let small_slots = spec(2, [32, 32, 32], Augment::none(), 0);
    segk::loader::check_memory(&small_slots, 1, 4, 1 << 50).unwrap(); // a store larger than RAM only warns
    let small = spec(2, [32, 32, 32], Augment::none(), 0);
    segk::loader::check_memory(&small, 1, 4, 1 << 20).unwrap();
}

/// The feed puts batch k on the "device" while batch k+1 is staged: every batch arrives
/// whole, in order, with its own stamp, although the CPU backend reads a staged slot only at
/// `take_staged` (as a copy engine reads late) and workers race for few slots.
#[test]
fn the_feed_delivers_each_batch_whole_while_the_next_is_staged() {
    feed_delivers_each_batch_whole(&segk::backend::cpu::CpuBackend::<f32>::new());
}

/// The same through the CUDA backend on the fake driver: page-locked slots, the copy stream
/// and its events, with every stream a thread that runs each operation up to 2 ms late (longer
/// than the test's own downloads, so a missing wait reads a stale staging buffer).
#[test]
fn the_feed_delivers_each_batch_whole_on_the_fake_driver() {
    if common::run_on_fake_driver("the_feed_delivers_each_batch_whole_on_the_fake_driver", 2000) {
        let be = segk::backend::cuda::CudaBackend::new(0).unwrap();
        assert!(be.device().contains("fake GPU"), "{}", be.device());
        assert_eq!(segk::backend::Backend::host_memory(&be).kind(), "pinned");
        feed_delivers_each_batch_whole(&be);
    }
}

fn feed_delivers_each_batch_whole<B: segk::backend::Backend>(be: &B) {
    use segk::feed::Feed;
    let shape = SlotShape { image: 30_000, labels: 2000, batch: 1 };
    for (workers, slots) in [(6, 2), (2, 5)] {
        let mut pool = Pool::start_in(Arc::new(Stamp { fail_at: None, panic_at: None }), workers, slots, shape, 0, &*be.host_memory()).unwrap();
        let (img, lab) = (be.alloc(shape.image).unwrap(), be.alloc_labels(shape.labels).unwrap());
        let mut feed = Feed::new(be, shape.image, shape.labels).unwrap();
        let (mut image, mut labels) = (vec![0f32; shape.image], vec![0u8; shape.labels]);
        for k in 0..150u64 {
            let b = feed.next(&mut pool, be.view(&img, 0, shape.image), be.label_view(&lab, 0, shape.labels)).unwrap();
            assert_eq!(b.index, k);
            be.download(be.view(&img, 0, shape.image), &mut image).unwrap();
            be.download_labels(be.label_view(&lab, 0, shape.labels), &mut labels).unwrap();
            assert!(image.iter().all(|&v| v == k as f32), "batch {k}: device image holds another batch's values");
            assert!(labels.iter().all(|&l| l == (k % 251) as u8), "batch {k}: device labels hold another batch's values");
            pool.give_back(b);
        }
    }
}

/// Training through the feed (device-resident input) is the same computation as uploading
/// each batch in the step: identical losses, bit for bit, on the CPU.
#[test]
fn training_through_the_feed_matches_uploading_in_the_step() {
    training_through_the_feed_matches_uploading(&segk::backend::cpu::CpuBackend::<f32>::new());
}

/// The same on the CUDA backend through the fake driver (bf16 activations, the kernels on the
/// emulator): the asynchronous staged upload gives the bits the synchronous upload gives.
#[test]
fn training_through_the_feed_matches_uploading_on_the_fake_driver() {
    if common::run_on_fake_driver("training_through_the_feed_matches_uploading_on_the_fake_driver", 100) {
        training_through_the_feed_matches_uploading(&segk::backend::cuda::CudaBackend::new(0).unwrap());
    }
}

fn training_through_the_feed_matches_uploading<B: segk::backend::Backend>(be: &B) {
    use segk::feed::Feed;
    use segk::model::unet::{Acts, Input};
    use segk::model::{Checkpointing, Topology, UNet};
    let topo = Topology::isotropic(1, 3, vec![8, 16]);
    let (patch, batch) = ([8, 8, 8], 2);
    let (root, ids) = store("feed", 3);
    let s = BatchSpec { batch, patch, channels: 1, use_mask: vec![false], seed: 11, augment: Augment::default(), prev_stage: None, shard: Default::default() };
    let acts = Acts::new(be, &topo, patch, batch, Checkpointing::None, true).unwrap();
    let voxels = batch * 512;
    let mut direct = UNet::new(be, topo.clone(), 5).unwrap();
    let mut fed = UNet::new(be, topo, 5).unwrap();
    let mut pool = Pool::start(Arc::new(Augmenter::new(&root, &ids, s.clone()).unwrap()), 2, 3, s.slot_shape(), 0).unwrap();
    let mut feed_pool = Pool::start_in(Arc::new(Augmenter::new(&root, &ids, s.clone()).unwrap()), 2, 3, s.slot_shape(), 0, &*be.host_memory()).unwrap();
    let mut feed = Feed::new(be, voxels, voxels).unwrap();
    for _ in 0..4 {
        let b = pool.next_batch().unwrap();
        direct.step(be, &acts, Input::Host { image: &b.image, labels: &b.labels }, 0.01).unwrap();
        let a = direct.take_steps(be).unwrap().pop().unwrap();
        pool.give_back(b);
        let b = feed.next(&mut feed_pool, acts.input_image(be), acts.input_labels(be).unwrap()).unwrap();
        fed.step(be, &acts, Input::Resident, 0.01).unwrap();
        let f = fed.take_steps(be).unwrap().pop().unwrap();
        feed_pool.give_back(b);
        assert!(a.total.is_finite());
        assert_eq!(a.total.to_bits(), f.total.to_bits(), "loss {} through the feed, {} uploaded", f.total, a.total);
        assert_eq!(a.grad_norm.to_bits(), f.grad_norm.to_bits());
    }
}

/// (stream, event and context synchronisations, device-to-host copies) the fake driver counted
/// so far in this process.
fn fake_driver_counts() -> [u64; 4] {
    // SAFETY: the fake libcuda is loaded in this process (the test runs on it); RTLD_NOLOAD
    // only finds it, and fakecuda_counts writes 4 counters.
    unsafe {
        let lib = libc::dlopen(c"libcuda.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD);
        let lib = if lib.is_null() { libc::dlopen(c"libcuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_NOLOAD) } else { lib };
        assert!(!lib.is_null(), "the fake libcuda is not loaded");
        let f = libc::dlsym(lib, c"fakecuda_counts".as_ptr());
        assert!(!f.is_null(), "this libcuda is not the fake driver");
        let f: extern "C" fn(*mut u64) = std::mem::transmute(f);
        let mut out = [0u64; 4];
        f(out.as_mut_ptr());
        out
    }
}

/// A training step never waits for the device: through the feed, each step waits only for its
/// batch's upload (one event synchronisation, so the slot can go back to the workers) and reads
/// nothing back; the epoch's numbers come with one synchronisation and one copy. Counted by the
/// fake driver over 5 steps after a warm-up.
#[test]
fn a_training_step_waits_only_for_its_upload() {
    if !common::run_on_fake_driver("a_training_step_waits_only_for_its_upload", 0) {
        return;
    }
    use segk::feed::Feed;
    use segk::model::unet::{Acts, Input};
    use segk::model::{Checkpointing, Topology, UNet};
    let be = segk::backend::cuda::CudaBackend::new(0).unwrap();
    let topo = Topology::isotropic(1, 3, vec![8, 16]);
    let (patch, batch) = ([8, 8, 8], 2);
    let (root, ids) = store("syncs", 3);
    let s = BatchSpec { batch, patch, channels: 1, use_mask: vec![false], seed: 3, augment: Augment::default(), prev_stage: None, shard: Default::default() };
    let acts = Acts::new(&be, &topo, patch, batch, Checkpointing::Level1, true).unwrap();
    let mut net = UNet::new(&be, topo, 5).unwrap();
    let mut pool = Pool::start_in(Arc::new(Augmenter::new(&root, &ids, s.clone()).unwrap()), 1, 3, s.slot_shape(), 0, &*segk::backend::Backend::host_memory(&be)).unwrap();
    let mut feed = Feed::new(&be, batch * 512, batch * 512).unwrap();
    let mut step = |net: &mut UNet<_>| {
        let b = feed.next(&mut pool, acts.input_image(&be), acts.input_labels(&be).unwrap()).unwrap();
        net.step(&be, &acts, Input::Resident, 0.01).unwrap();
        pool.give_back(b);
    };
    // Warm-up: the first batch's stage, workspace growth.
    step(&mut net);
    net.take_steps(&be).unwrap();
    let before = fake_driver_counts();
    for _ in 0..5 {
        step(&mut net);
    }
    let stepped = fake_driver_counts();
    let read = net.take_steps(&be).unwrap();
    let after = fake_driver_counts();
    let diff = |a: [u64; 4], b: [u64; 4]| [b[0] - a[0], b[1] - a[1], b[2] - a[2], b[3] - a[3]];
    assert_eq!(diff(before, stepped), [0, 5, 0, 0], "5 steps: [stream syncs, event syncs, context syncs, device-to-host copies]");
    assert_eq!(diff(stepped, after), [1, 0, 0, 1], "reading the steps' numbers");
    assert_eq!(read.len(), 5);
    assert!(read.iter().all(|s| s.applied && s.total.is_finite() && s.grad_norm > 0.0), "{read:?}");
}
