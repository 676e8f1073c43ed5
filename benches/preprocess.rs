//! Preprocessing throughput on one core: the resampling kernels alone, and whole cases
//! (read .nii.gz, crop, normalise, resample, sample foreground, no write) of the generated
//! CT-like dataset. Throughput is in input voxels per second.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segk::dataset::Dataset;
use segk::plan::fingerprint::fingerprint;
use segk::preprocess::resample::{resample_image, resample_labels, Kernel};
use segk::preprocess::{preprocess_case, Settings};
use segk::store::ImageDtype;
use segk::synth::{write_raw_dataset, RawSpec};
use std::time::Duration;

const SHAPE: [usize; 3] = [96, 128, 128];
const OUT: [usize; 3] = [120, 150, 150];

fn bench(c: &mut Criterion) {
    let n: usize = SHAPE.iter().product();
    let img: Vec<f32> = (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 50.0).collect();
    let seg: Vec<i16> = (0..n).map(|i| ((i / 3000) % 4) as i16).collect();
    let mut g = c.benchmark_group("preprocess_1core");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("resample_cubic_96x128x128_to_120x150x150", |b| b.iter(|| resample_image(&img, SHAPE, OUT, [Kernel::Cubic; 3])));
    g.bench_function("resample_labels_96x128x128_to_120x150x150", |b| b.iter(|| resample_labels(&seg, SHAPE, OUT, [Kernel::Linear; 3])));

    // Whole cases from the generated dataset at 160x256x256 (not written: that is I/O).
    let root = std::env::temp_dir().join(format!("segk-bench-pp-{}", std::process::id())).join("Dataset901_Bench");
    let spec = RawSpec { cases: 2, shape: [160, 256, 256], spacing: [1.5, 0.8, 0.8], seed: 3 };
    write_raw_dataset(&root, &spec).expect("generated dataset");
    let ds = Dataset::open(&root).expect("dataset");
    let fp = fingerprint(&ds, 1_000_000).expect("fingerprint");
    let plans = segk::plan::plans::nnunet_default("bench", &ds.json, &fp).expect("plan");
    let settings = Settings::new(&ds.json, &plans, "3d_fullres", ImageDtype::F32).expect("settings");
    g.throughput(Throughput::Elements(spec.shape.iter().product::<usize>() as u64));
    g.bench_function("case_160x256x256_read_crop_norm_resample", |b| b.iter(|| preprocess_case(&ds.cases[0], &settings).expect("case")));
    g.finish();
    let _ = std::fs::remove_dir_all(root.parent().expect("temp parent"));
}

criterion_group!(benches, bench);
criterion_main!(benches);
