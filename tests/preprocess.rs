//! Preprocessing: resampling against analytic functions, normalisation schemes, foreground
//! sampling, the store, splits identical to nnU-Net's, and round trips through the geometry.

mod common;

use segk::imageio::{self, header_for, Volume, VoxelType};
use segk::dataset::Dataset;
use segk::plan::fingerprint::{fingerprint, IntensityStats};
use segk::plan::plans_json::PlansJson;
use segk::preprocess::normalize::{normalize, Scheme};
use segk::preprocess::resample::{axis_kernels, new_shape, resample_image, resample_labels, Kernel};
use segk::preprocess::splits::{kfold, select, Fold, Mt19937};
use segk::preprocess::{preprocess_case, sample_locations, Settings};
use segk::store::{self, ImageDtype, StoredCase};
use std::path::{Path, PathBuf};

const I3: [[f64; 3]; 3] = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]];

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-pp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn grid(shape: [usize; 3], f: impl Fn(f64, f64, f64) -> f64) -> Vec<f32> {
    let mut v = Vec::with_capacity(shape.iter().product());
    for z in 0..shape[0] {
        for y in 0..shape[1] {
            for x in 0..shape[2] {
                v.push(f(z as f64, y as f64, x as f64) as f32);
            }
        }
    }
    v
}

/// Where output index o samples an input axis of n_in resampled to n_out (skimage geometry).
fn src(o: usize, n_in: usize, n_out: usize) -> f64 {
    (o as f64 + 0.5) * n_in as f64 / n_out as f64 - 0.5
}

/// Max error of resampling `f` from `a` to `b` over output voxels whose source lies at
/// least `margin` input voxels from every border.
fn interior_error(f: &dyn Fn(f64, f64, f64) -> f64, a: [usize; 3], b: [usize; 3], k: Kernel, margin: f64) -> f64 {
    let out = resample_image(&grid(a, f), a, b, [k; 3]);
    let mut worst = 0.0f64;
    for z in 0..b[0] {
        for y in 0..b[1] {
            for x in 0..b[2] {
                let p = [src(z, a[0], b[0]), src(y, a[1], b[1]), src(x, a[2], b[2])];
                if (0..3).any(|i| p[i] < margin || p[i] > a[i] as f64 - 1.0 - margin) {
                    continue;
                }
                let got = out[(z * b[1] + y) * b[2] + x] as f64;
                worst = worst.max((got - f(p[0], p[1], p[2])).abs());
            }
        }
    }
    worst
}

#[test]
fn identity_shape_copies_exactly() {
    let s = [5, 6, 7];
    let v = grid(s, |z, y, x| z * 100.0 + y * 10.0 + x);
    assert_eq!(resample_image(&v, s, s, [Kernel::Cubic; 3]), v);
    let l: Vec<i16> = (0..210).map(|i| (i % 5) as i16 - 1).collect();
    assert_eq!(resample_labels(&l, s, s, [Kernel::Linear; 3]), l);
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/resample").join(name)).unwrap()
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

/// Outputs of nnU-Net v2's own resampling functions (tests/fixtures/resample/make.py).
#[test]
fn resampling_matches_nnunet_outputs() {
    let (a, b) = ([12, 14, 16], [19, 9, 23]);
    let input = f32s(&fixture("input.f32"));
    let sep = axis_kernels([4.0, 1.0, 1.0], [2.0, 1.0, 1.0], Kernel::Cubic);
    for (name, kernels) in [("cubic.f32", [Kernel::Cubic; 3]), ("cubic_separate_z.f32", sep)] {
        let want: Vec<f64> = f32s(&fixture(name)).iter().map(|&v| v as f64).collect();
        let got: Vec<f64> = resample_image(&input, a, b, kernels).iter().map(|&v| v as f64).collect();
        let worst = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max);
        assert!(worst < 2e-6, "{name}: max difference {worst} from nnU-Net's");
    }
    let labels: Vec<i16> = input.iter().map(|&v| (v * 4.0).floor() as i16).collect();
    let lin = axis_kernels([4.0, 1.0, 1.0], [2.0, 1.0, 1.0], Kernel::Linear);
    for (name, kernels) in [("labels.u8", [Kernel::Linear; 3]), ("labels_separate_z.u8", lin)] {
        let want = fixture(name);
        let got = resample_labels(&labels, a, b, kernels);
        // Exact ties (two labels at the same interpolated weight) may break either way by rounding.
        let differ = got.iter().zip(&want).filter(|(x, y)| **x != **y as i16).count();
        assert!(differ <= 2, "{name}: {differ} of {} voxels differ from nnU-Net's", want.len());
    }
}

#[test]
fn cubic_reproduces_linear_and_approximates_smooth_functions() {
    let lin = |z: f64, y: f64, x: f64| 2.0 + 0.5 * x - 0.25 * y + 0.75 * z;
    for (a, b) in [([20, 22, 24], [33, 40, 47]), ([30, 28, 26], [17, 15, 13])] {
        let e = interior_error(&lin, a, b, Kernel::Cubic, 8.0);
        assert!(e < 1e-3, "linear function, {a:?} -> {b:?}: cubic error {e}");
        let e = interior_error(&lin, a, b, Kernel::Linear, 0.0);
        assert!(e < 1e-4, "linear function, {a:?} -> {b:?}: linear error {e}");
    }
    let smooth = |z: f64, y: f64, x: f64| (0.3 * x).sin() + (0.25 * y).cos() * (0.2 * z).sin();
    let (a, b) = ([24, 26, 28], [41, 47, 53]);
    let cubic = interior_error(&smooth, a, b, Kernel::Cubic, 8.0);
    let linear = interior_error(&smooth, a, b, Kernel::Linear, 8.0);
    assert!(cubic < 2e-3, "cubic error {cubic} on a smooth function");
    assert!(cubic < linear / 4.0, "cubic ({cubic}) should beat linear ({linear}) clearly");
}

#[test]
fn nearest_picks_the_closest_sample() {
    let v: Vec<f32> = (0..10).map(|x| x as f32).collect();
    let out = resample_image(&v, [1, 1, 10], [1, 1, 4], [Kernel::Nearest; 3]);
    // Sources 0.75, 3.25, 5.75, 8.25.
    assert_eq!(out, vec![1.0, 3.0, 6.0, 8.0]);
}

#[test]
fn anisotropic_spacing_resamples_the_coarse_axis_with_nearest() {
    use Kernel::*;
    assert_eq!(axis_kernels([5.0, 1.0, 1.0], [2.0, 1.0, 1.0], Cubic), [Nearest, Cubic, Cubic]);
    assert_eq!(axis_kernels([1.0, 1.0, 1.0], [1.0, 1.0, 4.0], Linear), [Linear, Linear, Nearest]);
    assert_eq!(axis_kernels([3.0, 1.0, 1.0], [2.0, 1.0, 1.0], Cubic), [Cubic; 3], "3x is not above the threshold");
    assert_eq!(axis_kernels([1.0, 5.0, 5.0], [1.0, 5.0, 5.0], Cubic), [Cubic; 3], "two coarse axes: no separate z");
    assert_eq!(new_shape([10, 100, 100], [5.0, 0.8, 0.8], [2.5, 1.0, 1.0]), [20, 80, 80]);
}

fn sphere(shape: [usize; 3], centre: [f64; 3], r: f64, scale: f64) -> Vec<i16> {
    grid(shape, |z, y, x| {
        let p = [(z + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5, (x + 0.5) * scale - 0.5];
        let d2: f64 = (0..3).map(|a| (p[a] - centre[a]).powi(2)).sum();
        if d2 <= r * r { if p[2] > centre[2] { 2.0 } else { 1.0 } } else { 0.0 }
    })
    .iter()
    .map(|&v| v as i16)
    .collect()
}

#[test]
fn per_label_linear_keeps_shapes_and_invents_no_labels() {
    let (a, b) = ([32, 32, 32], [48, 48, 48]);
    let c = [15.5, 15.5, 15.5];
    let coarse = sphere(a, c, 10.0, 1.0);
    let up = resample_labels(&coarse, a, b, [Kernel::Linear; 3]);
    let truth = sphere(b, c, 10.0, 32.0 / 48.0);
    let wrong = up.iter().zip(&truth).filter(|(x, y)| x != y).count();
    let fg = truth.iter().filter(|&&v| v != 0).count();
    assert!((wrong as f64) < 0.08 * fg as f64, "{wrong} of {fg} foreground voxels differ from the analytic sphere");
    // [0, 0, 2] must never give a 1 in between (nnU-Net resizes each label's indicator).
    let step: Vec<i16> = (0..40).map(|x| if x < 20 { 0 } else { 2 }).collect();
    let out = resample_labels(&step, [1, 1, 40], [1, 1, 97], [Kernel::Linear; 3]);
    assert!(out.iter().all(|&l| l == 0 || l == 2), "{out:?}");
    let down = resample_labels(&truth, b, a, [Kernel::Linear; 3]);
    let wrong = down.iter().zip(&coarse).filter(|(x, y)| x != y).count();
    assert!((wrong as f64) < 0.08 * coarse.iter().filter(|&&v| v != 0).count() as f64, "downsampling: {wrong} differ");
}

fn stats(mean: f64, std: f64, lo: f64, hi: f64) -> IntensityStats {
    IntensityStats { mean, median: mean, std, min: lo, max: hi, percentile_99_5: hi, percentile_00_5: lo }
}

#[test]
fn normalisation_schemes_match_their_definitions() {
    let seg = vec![0i16, 1, -1, 0];
    let mut v = vec![-2000.0f32, 0.0, 100.0, 5000.0];
    normalize(&mut v, Scheme::Ct, false, &seg, &stats(50.0, 10.0, -1000.0, 1000.0)).unwrap();
    assert_eq!(v, vec![-105.0, -5.0, 5.0, 95.0], "clip to [p0.5, p99.5], then (x - mean) / std");

    let mut v = vec![1.0f32, 3.0, 0.0, 5.0];
    normalize(&mut v, Scheme::ZScore, true, &seg, &stats(0.0, 1.0, 0.0, 1.0)).unwrap();
    let s = 8.0f32.sqrt() / 3.0f32.sqrt();
    let want = [(1.0 - 3.0) / s, 0.0, 0.0, (5.0 - 3.0) / s];
    assert!(v.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-6), "{v:?}: masked z-score, outside untouched");

    let mut v = vec![1.0f32, 3.0, 0.0, 5.0];
    normalize(&mut v, Scheme::ZScore, false, &seg, &stats(0.0, 1.0, 0.0, 1.0)).unwrap();
    let mean = v.iter().sum::<f32>() / 4.0;
    let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / 4.0;
    assert!(mean.abs() < 1e-6 && (var - 1.0).abs() < 1e-5);

    let mut v = vec![2.0f32, 4.0, 6.0];
    normalize(&mut v, Scheme::RescaleTo01, false, &seg, &stats(0.0, 1.0, 0.0, 1.0)).unwrap();
    assert_eq!(v, vec![0.0, 0.5, 1.0]);
    let mut v = vec![0.0f32, 255.0];
    normalize(&mut v, Scheme::RgbTo01, false, &seg, &stats(0.0, 1.0, 0.0, 1.0)).unwrap();
    assert_eq!(v, vec![0.0, 1.0]);
    assert!(normalize(&mut [300.0f32], Scheme::RgbTo01, false, &[0], &stats(0.0, 1.0, 0.0, 1.0)).is_err());
    let mut v = vec![7.0f32];
    normalize(&mut v, Scheme::NoNorm, false, &[0], &stats(0.0, 1.0, 0.0, 1.0)).unwrap();
    assert_eq!(v, vec![7.0]);
    assert_eq!(Scheme::for_channel("CT"), Scheme::Ct);
    assert_eq!(Scheme::for_channel("noNorm"), Scheme::NoNorm);
    assert_eq!(Scheme::for_channel("T2"), Scheme::ZScore);
}

#[test]
fn foreground_sampling_takes_nnunets_quota_of_distinct_voxels() {
    let shape = [40, 50, 60];
    let n = 40 * 50 * 60;
    // Label 1: 20000 voxels (quota 10000), label 2: 1_500_000 / 12 > 1 % rule? keep small: 300.
    let seg: Vec<i16> = (0..n).map(|i| if i % 6 == 0 { 1 } else if i % 400 == 1 { 2 } else if i == 5 { -1 } else { 0 }).collect();
    let classes = vec![vec![1], vec![2], vec![1, 2], vec![7]];
    let locs = sample_locations(&seg, shape, &classes, 1234);
    let count = |l: &[i64]| seg.iter().filter(|&&v| l.contains(&(v as i64))).count();
    for (c, got) in classes.iter().zip(&locs) {
        let total = count(c);
        let want = total.min(10_000).max((total as f64 * 0.01).ceil() as usize);
        assert_eq!(got.len(), want, "class {c:?} of {total} voxels");
        let mut idx: Vec<usize> = got.iter().map(|p| (p[0] as usize * 50 + p[1] as usize) * 60 + p[2] as usize).collect();
        assert!(idx.iter().all(|&i| c.contains(&(seg[i] as i64))), "class {c:?}: a location off the class");
        idx.sort();
        idx.dedup();
        assert_eq!(idx.len(), got.len(), "locations are distinct");
    }
    assert_eq!(sample_locations(&seg, shape, &classes, 1234), locs, "seeded");
    let big: Vec<i16> = vec![1; 2_000_000];
    assert_eq!(sample_locations(&big, [20, 100, 1000], &[vec![1]], 1)[0].len(), 20_000, "1 % of 2e6 beats 10000");
}

#[test]
fn splits_match_scikit_learn_and_numpy() {
    // numpy.random.RandomState(12345).randint(0, 2**32, size=3, dtype=np.uint32)
    let mut mt = Mt19937::new(12345);
    assert_eq!([mt.next_u32(), mt.next_u32(), mt.next_u32()], [3992670690, 3823185381, 1358822685]);
    // a = np.arange(10); np.random.RandomState(7).shuffle(a)
    let mut a: Vec<usize> = (0..10).collect();
    Mt19937::new(7).shuffle(&mut a);
    assert_eq!(a, vec![8, 5, 0, 2, 1, 9, 7, 3, 6, 4]);
    // [te for _, te in KFold(5, shuffle=True, random_state=12345).split(range(n))]
    let want: [(usize, Vec<Vec<usize>>); 2] = [
        (7, vec![vec![3, 6], vec![0, 4], vec![1], vec![5], vec![2]]),
        (23, vec![vec![3, 8, 10, 17, 19], vec![0, 7, 12, 15, 16], vec![6, 11, 14, 18, 20], vec![9, 13, 21, 22], vec![1, 2, 4, 5]]),
    ];
    for (n, folds) in want {
        let ids: Vec<String> = (0..n).map(|i| format!("case_{i:03}")).collect();
        let splits = kfold(&ids, 5, 12345).unwrap();
        for (s, f) in splits.iter().zip(&folds) {
            assert_eq!(s.val, f.iter().map(|&i| ids[i].clone()).collect::<Vec<_>>(), "n = {n}");
            assert_eq!(s.train.len() + s.val.len(), n);
            assert!(s.train.iter().all(|t| !s.val.contains(t)));
        }
        let all = select(&splits, &ids, Fold::All).unwrap();
        assert_eq!((all.train.len(), all.val.len()), (n, n));
        assert!(select(&splits, &ids, Fold::Index(5)).is_err());
    }
    assert!(kfold(&["a".into(), "b".into()], 5, 1).is_err());
    assert_eq!("all".parse::<Fold>().unwrap(), Fold::All);
    assert_eq!("3".parse::<Fold>().unwrap(), Fold::Index(3));
}

/// A raw dataset whose cases are a smooth image on an elliptic body (zero outside) with
/// two labels; `spacings` per case.
fn smooth_dataset(root: &Path, shape: [usize; 3], spacings: &[[f64; 3]], channel: &str, labels_json: &str, big_label: i16) {
    std::fs::create_dir_all(root.join("imagesTr")).unwrap();
    std::fs::create_dir_all(root.join("labelsTr")).unwrap();
    std::fs::write(root.join("dataset.json"), format!(r#"{{"channel_names": {{"0": "{channel}"}}, "labels": {labels_json}, "numTraining": {}, "file_ending": ".nii.gz"}}"#, spacings.len())).unwrap();
    let m = shape.map(|v| v as f64);
    for (k, sp) in spacings.iter().enumerate() {
        let inside = |z: f64, y: f64, x: f64| {
            let q = [(z - m[0] / 2.0) / (m[0] * 0.4), (y - m[1] / 2.0) / (m[1] * 0.35), (x - m[2] / 2.0) / (m[2] * 0.3)];
            q.iter().map(|v| v * v).sum::<f64>() <= 1.0
        };
        let img = grid(shape, |z, y, x| if inside(z, y, x) { 100.0 + 20.0 * (0.2 * x + 0.1 * k as f64).sin() + 10.0 * (0.15 * y).cos() + 0.5 * z } else { 0.0 });
        let lab = grid(shape, |z, y, x| {
            if !inside(z, y, x) {
                return 0.0;
            }
            let d2 = ((z - m[0] / 2.0) / 3.0).powi(2) + ((y - m[1] / 2.0) / 4.0).powi(2) + ((x - m[2] / 2.0) / 4.0).powi(2);
            if d2 <= 1.0 { big_label as f64 } else if y > m[1] / 2.0 + 5.0 { 1.0 } else { 0.0 }
        });
        let h = header_for(shape, *sp, I3, [0.0; 3]);
        let v = Volume { shape, spacing: *sp, affine: [[0.0; 4]; 3], data: img, header: h };
        imageio::write(&root.join(format!("imagesTr/c{k}_0000.nii.gz")), &v, VoxelType::F32).unwrap();
        let l = Volume { data: lab, ..v };
        imageio::write(&root.join(format!("labelsTr/c{k}.nii.gz")), &l, VoxelType::I16).unwrap();
    }
}

fn plans_for(ds: &Dataset) -> PlansJson {
    let fp = fingerprint(ds, 100_000).unwrap();
    segk::plan::plans::nnunet_default("t", &ds.json, &fp).unwrap()
}

fn fullres(plans: &PlansJson, json: &segk::dataset::DatasetJson) -> segk::plan::plans::Plan {
    segk::plan::plans::from_nnunet(plans, "3d_fullres", json).unwrap()
}

#[test]
fn identity_spacing_round_trip_preserves_labels_exactly() {
    let root = tmpdir("ident").join("Dataset010_Ident");
    // x is the coarse axis, so the store is transposed (x first).
    let sp = [1.0, 1.0, 3.5];
    smooth_dataset(&root, [20, 24, 28], &[sp, sp, sp], "noNorm", r#"{"background": 0, "a": 1, "b": 2}"#, 2);
    let ds = Dataset::open(&root).unwrap();
    let plans = plans_for(&ds);
    assert_eq!(fullres(&plans, &ds.json).transpose_forward, [2, 0, 1]);
    let s = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32).unwrap();
    for case in &ds.cases {
        let p = preprocess_case(case, &s).unwrap();
        let g = &p.header.geometry;
        assert_eq!(p.header.shape, g.transpose_forward.map(|a| g.crop_shape()[a]), "no resampling at identity spacing");
        let raw_l = imageio::read(&case.label).unwrap();
        let back = g.undo_labels(&p.seg);
        assert!(back.iter().zip(&raw_l.data).all(|(&a, &b)| a as f32 == b), "labels come back exactly");
        let raw = imageio::read(&case.images[0]).unwrap();
        assert_eq!(g.undo_image(&p.channels[0]), raw.data, "noNorm image comes back exactly");
        assert!(p.seg.contains(&-1), "voxels outside the nonzero mask are marked -1");
    }
}

#[test]
fn resampled_round_trip_is_within_interpolation_error() {
    let root = tmpdir("resamp").join("Dataset011_Resamp");
    smooth_dataset(&root, [24, 40, 44], &[[1.2, 0.9, 0.8], [1.5, 1.1, 1.0], [1.0, 0.7, 0.9]], "noNorm", r#"{"background": 0, "a": 1, "b": 2}"#, 2);
    let ds = Dataset::open(&root).unwrap();
    let plans = plans_for(&ds);
    let s = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32).unwrap();
    for case in &ds.cases {
        let p = preprocess_case(case, &s).unwrap();
        let g = &p.header.geometry;
        assert_ne!(p.header.shape, g.crop_shape(), "this case is resampled");
        let raw = imageio::read(&case.images[0]).unwrap();
        let back = g.undo_image(&p.channels[0]);
        // Compare away from the body's edge, where the image has a jump the spline rings on.
        let m = raw.shape.map(|v| v as f64);
        let interior: Vec<usize> = (0..raw.data.len())
            .filter(|&i| {
                let c = [i / (raw.shape[1] * raw.shape[2]), (i / raw.shape[2]) % raw.shape[1], i % raw.shape[2]].map(|v| v as f64);
                let q = [(c[0] - m[0] / 2.0) / (m[0] * 0.4), (c[1] - m[1] / 2.0) / (m[1] * 0.35), (c[2] - m[2] / 2.0) / (m[2] * 0.3)];
                q.iter().map(|v| v * v).sum::<f64>() <= 0.5
            })
            .collect();
        let a: Vec<f64> = interior.iter().map(|&i| back[i] as f64).collect();
        let b: Vec<f64> = interior.iter().map(|&i| raw.data[i] as f64).collect();
        let e = common::rel_err(&a, &b);
        assert!(e < 0.01, "case {}: relative error {e} after resampling there and back", case.id);
        let raw_l = imageio::read(&case.label).unwrap();
        let back_l = g.undo_labels(&p.seg);
        for l in [1i16, 2] {
            let (mut tp, mut fp, mut fn_) = (0, 0, 0);
            for (&x, &y) in back_l.iter().zip(&raw_l.data) {
                match (x == l, y as i16 == l) {
                    (true, true) => tp += 1,
                    (true, false) => fp += 1,
                    (false, true) => fn_ += 1,
                    _ => {}
                }
            }
            let dice = 2.0 * tp as f64 / (2 * tp + fp + fn_) as f64;
            assert!(dice > 0.9, "case {} label {l}: Dice {dice} after resampling there and back", case.id);
        }
    }
}

#[test]
fn store_round_trips_and_resumes() {
    let base = tmpdir("store");
    let root = base.join("Dataset012_Store");
    // Label 300 forces i16 labels.
    smooth_dataset(&root, [16, 20, 24], &[[1.0, 1.0, 1.0], [1.2, 1.0, 1.0], [1.0, 0.9, 1.1]], "T2", r#"{"background": 0, "a": 1, "b": 300}"#, 300);
    let ds = Dataset::open(&root).unwrap();
    let plans = plans_for(&ds);
    assert!(fullres(&plans, &ds.json).use_mask_for_norm[0], "cropping removes over a quarter: z-score uses the mask");
    let dir = base.join("store");
    let bar = indicatif::ProgressBar::hidden();
    for dtype in [ImageDtype::F32, ImageDtype::F16] {
        let s = Settings::new(&ds.json, &plans, "3d_fullres", dtype).unwrap();
        let sum = segk::preprocess::run(&ds, &s, &dir, 2, &bar).unwrap();
        assert_eq!((sum.done, sum.skipped), (3, 0), "{dtype:?}: a change of settings redoes every case");
        let again = segk::preprocess::run(&ds, &s, &dir, 2, &bar).unwrap();
        assert_eq!((again.done, again.skipped), (0, 3), "a rerun resumes");
        for case in &ds.cases {
            let want = preprocess_case(case, &s).unwrap();
            let got = StoredCase::open(&dir, &case.id).unwrap();
            assert_eq!(got.header, want.header);
            assert_eq!(got.labels().to_i16(), want.seg);
            let tol = if dtype == ImageDtype::F16 { 2e-3 } else { 0.0 };
            let ch = got.channel(0);
            assert!(ch.iter().zip(&want.channels[0]).all(|(a, b)| (a - b).abs() <= tol * b.abs().max(1.0)), "{dtype:?} image");
            for k in 0..want.locations.len() {
                assert_eq!(got.locations(k), &want.locations[k][..]);
            }
            let inside: Vec<f32> = ch.iter().zip(&want.seg).filter(|(_, &l)| l >= 0).map(|(v, _)| *v).collect();
            let mean = inside.iter().sum::<f32>() / inside.len() as f32;
            assert!(mean.abs() < 0.05, "z-scored inside the mask (mean {mean} after resampling)");
        }
    }
    // Training's check: nothing stale now (the f16 store is accepted as is); a plan with another
    // spacing makes every case stale.
    let ids: Vec<String> = ds.cases.iter().map(|c| c.id.clone()).collect();
    assert_eq!(segk::preprocess::stale_cases(&dir, &ids, &ds.json, &plans, "3d_fullres").unwrap(), (vec![], ImageDtype::F16));
    let mut other = plans_for(&ds);
    other.configurations.get_mut("3d_fullres").unwrap().spacing.as_mut().unwrap()[0] *= 1.5;
    assert_eq!(segk::preprocess::stale_cases(&dir, &ids, &ds.json, &other, "3d_fullres").unwrap().0, ids);
    // An interrupted case (a file missing, a temporary left behind) is redone, the rest kept.
    std::fs::remove_file(dir.join("c1.seg")).unwrap();
    std::fs::write(dir.join("c1.img.tmp"), b"partial").unwrap();
    let s = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F16).unwrap();
    let r = segk::preprocess::run(&ds, &s, &dir, 1, &bar).unwrap();
    assert_eq!((r.done, r.skipped), (1, 2));
    assert!(!dir.join("c1.img.tmp").exists());
    assert_eq!(store::case_ids(&dir).unwrap(), vec!["c0", "c1", "c2"]);
}

#[test]
fn a_broken_case_stops_the_run_with_its_name() {
    let base = tmpdir("broken");
    let root = base.join("Dataset013_Broken");
    smooth_dataset(&root, [12, 14, 16], &[[1.0; 3], [1.0; 3]], "CT", r#"{"background": 0, "a": 1, "b": 2}"#, 2);
    let ds = Dataset::open(&root).unwrap();
    let plans = plans_for(&ds);
    std::fs::write(root.join("imagesTr/c1_0000.nii.gz"), b"not a nifti file").unwrap();
    let s = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32).unwrap();
    let e = segk::preprocess::run(&ds, &s, &base.join("store"), 2, &indicatif::ProgressBar::hidden()).unwrap_err();
    let msg = format!("{e:#}");
    assert!(msg.contains("case c1") && msg.contains("c1_0000.nii.gz"), "{msg}");
}

#[test]
fn preprocess_command_plans_preprocesses_splits_and_resumes() {
    let base = tmpdir("cli");
    let root = base.join("Dataset014_Cli");
    let segk = env!("CARGO_BIN_EXE_segk");
    let out = std::process::Command::new(segk).args(["synth", "--cases", "5", "--shape", "24,40,40"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let run = || std::process::Command::new(segk).arg("preprocess").arg(&root).args(["--processes", "2"]).env_remove("nnUNet_preprocessed").output().unwrap();
    let out = run();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("planning first") && text.contains("5 cases preprocessed") && text.contains("2 at a time (from --processes)"), "{text}");
    let dir = base.join("segk_preprocessed/Dataset014_Cli");
    for f in ["nnUNetPlans.json", "dataset.json", "segk_fingerprint.json", "splits_final.json"] {
        assert!(dir.join(f).is_file(), "{f} written");
    }
    // One store per nnU-Net data identifier, under segk's prefix.
    assert_eq!(store::case_ids(&dir.join("segk_nnUNetPlans_3d_fullres")).unwrap().len(), 5);
    assert!(!dir.join("plans.json").exists(), "plans files by plans name only, as nnU-Net's");
    let splits: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("splits_final.json")).unwrap()).unwrap();
    assert_eq!(splits.as_array().unwrap().len(), 5);
    let again = run();
    assert!(String::from_utf8_lossy(&again.stdout).contains("0 cases preprocessed, 5 already done"));
    // `.` from inside the dataset names the same dataset (not one called "dataset" in the raw folder).
    let here = std::process::Command::new(segk).args(["preprocess", "."]).current_dir(&root).env_remove("nnUNet_preprocessed").output().unwrap();
    assert!(String::from_utf8_lossy(&here.stdout).contains("0 cases preprocessed, 5 already done"), "{}", String::from_utf8_lossy(&here.stderr));
    assert!(!root.join("segk_preprocessed").exists() && !base.join("segk_preprocessed/dataset").exists());
    // A dataset reached through a symbolic link keeps the link's name, as for nnU-Net.
    std::os::unix::fs::symlink(&root, base.join("Dataset015_Link")).unwrap();
    let out = std::process::Command::new(segk).arg("fingerprint").arg(base.join("Dataset015_Link")).env_remove("nnUNet_preprocessed").output().unwrap();
    assert!(out.status.success() && base.join("segk_preprocessed/Dataset015_Link/segk_fingerprint.json").is_file(), "{}", String::from_utf8_lossy(&out.stderr));
    // As nnU-Net's commands: the dataset by ID or name under $nnUNet_raw.
    for (arg, ok) in [("14", true), ("Dataset014", true), ("Dataset014_Cli", true), ("16", false)] {
        let out = std::process::Command::new(segk).args(["check", arg]).env("nnUNet_raw", &base).current_dir(std::env::temp_dir()).output().unwrap();
        let (text, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert_eq!(out.status.success(), ok, "{arg}: {text}{err}");
        assert!(if ok { text.contains("Dataset014_Cli: 5 cases") } else { err.contains("16: no such dataset folder, here or in $nnUNet_raw") }, "{arg}: {text}{err}");
    }
    // Sizes that cannot be are refused at once, with the file or flag named.
    let plan_inf = std::process::Command::new(segk).arg("plan").arg(&root).args(["--gpu-memory", "inf"]).output().unwrap();
    assert!(String::from_utf8_lossy(&plan_inf.stderr).contains("--gpu-memory must be a size in GiB"), "{}", String::from_utf8_lossy(&plan_inf.stderr));
    let plans = dir.join("nnUNetPlans.json");
    let good = std::fs::read_to_string(&plans).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&good).unwrap();
    v["configurations"]["3d_fullres"]["batch_size"] = 0.into();
    std::fs::write(&plans, v.to_string()).unwrap();
    let train = std::process::Command::new(segk).arg("train").arg(&root).args(["0", "--device", "cpu", "--epochs", "1"]).env_remove("nnUNet_preprocessed").env_remove("nnUNet_results").output().unwrap();
    let err = String::from_utf8_lossy(&train.stderr);
    assert!(!train.status.success() && err.contains("nnUNetPlans.json: configuration 3d_fullres of nnUNetPlans: batch_size must be at least 1") && !err.contains("panicked"), "{err}");
    std::fs::write(&plans, good).unwrap();
    // A hand-written split is checked against the dataset before anything is written.
    let splits = dir.join("splits_final.json");
    for (text, says) in [
        (r#"[{"train": ["case_0000", "case_0001"], "val": []}]"#, r#"fold 0: "val" is empty"#),
        (r#"[{"train": ["case_0000", "case_0099"], "val": ["case_0003"]}]"#, r#"fold 0: "train" names cases the dataset does not have: case_0099"#),
    ] {
        std::fs::write(&splits, text).unwrap();
        let out_dir = base.join("split_run/fold_0");
        let train = std::process::Command::new(segk).arg("train").arg(&root).args(["0", "--device", "cpu", "--epochs", "1", "--out"]).arg(&out_dir).env_remove("nnUNet_preprocessed").output().unwrap();
        let err = String::from_utf8_lossy(&train.stderr);
        assert!(!train.status.success() && err.contains("splits_final.json") && err.contains(says) && !out_dir.exists(), "{err}");
    }
}

/// `segk preprocess -c 2d 3d_fullres 3d_lowres`: one store per data identifier; 2d resamples
/// in plane only (the first axis keeps each case's spacing, as nnU-Net's preprocessor does),
/// 3d_lowres to its own coarser spacing; configurations the plans lack are skipped.
#[test]
fn preprocess_makes_a_store_per_configuration() {
    let base = tmpdir("configs");
    let root = base.join("Dataset016_Configs");
    let segk = env!("CARGO_BIN_EXE_segk");
    let run = |args: &[&str]| std::process::Command::new(segk).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_raw").output().unwrap();
    assert!(run(&["synth", root.to_str().unwrap(), "--cases", "3", "--shape", "20,36,36", "--spacing", "2.5,1,1"]).status.success());
    assert!(run(&["plan", root.to_str().unwrap()]).status.success());
    let dir = base.join("segk_preprocessed/Dataset016_Configs");
    // The synthetic cases are too small for nnU-Net to plan 3d_lowres: the default skips it.
    let out = run(&["preprocess", root.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("nnUNetPlans has no configuration 3d_lowres: skipped") && text.contains("2d: 3 cases preprocessed"), "{text}");
    // A plans file with a 3d_lowres (as nnU-Net writes one for large images).
    let path = dir.join("nnUNetPlans.json");
    let mut plans: PlansJson = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut low = plans.configurations.get("3d_fullres").unwrap().clone();
    low.spacing = Some(low.spacing.unwrap().iter().map(|s| s * 2.0).collect());
    low.data_identifier = Some("nnUNetPlans_3d_lowres".into());
    plans.configurations.0.push(("3d_lowres".into(), low));
    std::fs::write(&path, segk::plan::plans_json::to_python_json(&plans).unwrap()).unwrap();
    let out = run(&["preprocess", root.to_str().unwrap(), "-c", "2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("3d_lowres: 3 cases preprocessed") && text.contains("2d: 0 cases preprocessed, 3 already done"), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let full_spacing = plans.configurations.get("3d_fullres").unwrap().spacing.clone().unwrap();
    let two_d = plans.configurations.get("2d").unwrap().spacing.clone().unwrap();
    let ids = store::case_ids(&dir.join("segk_nnUNetPlans_2d")).unwrap();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        let id = id.as_str();
        let header = |store: &str| store::complete_header(&dir.join(store), id).unwrap_or_else(|| panic!("{id} in {store}"));
        let (f, l, d) = (header("segk_nnUNetPlans_3d_fullres"), header("segk_nnUNetPlans_3d_lowres"), header("segk_nnUNetPlans_2d"));
        assert_eq!(f.geometry.spacing.to_vec(), full_spacing);
        assert_eq!(l.geometry.spacing.to_vec(), full_spacing.iter().map(|s| s * 2.0).collect::<Vec<_>>());
        for a in 0..3 {
            assert!(l.shape[a].abs_diff(f.shape[a].div_ceil(2)) <= 1, "{id}: lowres {:?} vs fullres {:?}", l.shape, f.shape);
        }
        let own = d.geometry.transpose_forward.map(|a| d.geometry.original_spacing[a]);
        assert_eq!(d.geometry.spacing, [own[0], two_d[0], two_d[1]], "{id}: 2d keeps the case's own first-axis spacing");
        assert_eq!(d.shape[0], d.geometry.transpose_forward.map(|a| d.geometry.crop_shape()[a])[0], "{id}: no resampling along the first axis");
    }
}
