//! Augmented 3d_fullres samples per second: the full nnU-Net chain on one core (patch 128³,
//! one channel), and the pool feeding a consumer that does nothing, at batch 2.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segk::loader::pool::{Batch, Fill, Pool};
use segk::loader::{Augment, Augmenter, BatchSpec};
use std::sync::Arc;
use std::time::Duration;

const PATCH: [usize; 3] = [128, 128, 128];

/// The rotation+scaling pass alone (the loader's largest cost), on an in-memory f32 volume with
/// three labels in blobs, so the label path meets boundaries as in real cases.
fn bench_warp(c: &mut Criterion) {
    use segk::loader::spatial::{affine, sample, Source};
    let shape = [205usize, 205, 205];
    let n: usize = shape.iter().product();
    let image: Vec<f32> = (0..n).map(|i| ((i * 2654435761) % 1000) as f32 / 500.0 - 1.0).collect();
    let labels: Vec<u8> = (0..n)
        .map(|i| {
            let (z, y, x) = (i / (205 * 205), (i / 205) % 205, i % 205);
            let r2 = |c: usize| (z as i64 - c as i64).pow(2) + (y as i64 - c as i64).pow(2) + (x as i64 - 100).pow(2);
            if r2(80) < 40 * 40 { 1 } else if r2(130) < 30 * 30 { 2 } else { 0 }
        })
        .collect();
    let src = Source { image: &image[..], labels: &labels[..], channels: 1, shape, lo: [0, 0, 0], size: shape };
    let m = affine([0.3, -0.2, 0.4], [1.1; 3]);
    let (mut out, mut lab) = (vec![0f32; 128 * 128 * 128], vec![0i16; 128 * 128 * 128]);
    let mut g = c.benchmark_group("loader");
    g.sample_size(10).throughput(Throughput::Elements(1));
    g.bench_function("warp_only_128cube_1core", |b| b.iter(|| sample(&src, Some(&m), PATCH, &mut out, &mut lab)));
    g.finish();
}

fn bench(c: &mut Criterion) {
    let base = std::env::temp_dir().join(format!("segk-bench-loader-{}", std::process::id()));
    let (store, ids) = segk::bench_loader::synthetic_store(&base, 3, [160, 256, 256]).expect("store");

    let mut g = c.benchmark_group("loader");
    g.sample_size(10).warm_up_time(Duration::from_secs(2)).measurement_time(Duration::from_secs(15));
    g.throughput(Throughput::Elements(1));
    for (name, augment) in [("full_chain_128cube_1core", Augment::default()), ("crop_only_128cube_1core", Augment::none())] {
        let spec = BatchSpec { batch: 1, patch: PATCH, channels: 1, use_mask: vec![false], seed: 1, augment, prev_stage: None, shard: Default::default() };
        let aug = Augmenter::new(&store, &ids, spec.clone()).expect("augmenter");
        let mut w = aug.worker();
        let s = spec.slot_shape();
        let mut b = Batch::new(0, s, &segk::hostmem::Heap).expect("slot");
        let mut k = 0u64;
        g.bench_function(name, |bch| {
            bch.iter(|| {
                k += 1;
                aug.fill(&mut w, k, &mut b).expect("fill")
            })
        });
    }
    // The pool at batch 2 feeding a consumer that does nothing; throughput in samples.
    g.throughput(Throughput::Elements(2));
    for workers in [1, 2] {
        let spec = BatchSpec { batch: 2, patch: PATCH, channels: 1, use_mask: vec![false], seed: 2, augment: Augment::default(), prev_stage: None, shard: Default::default() };
        let aug = Arc::new(Augmenter::new(&store, &ids, spec.clone()).expect("augmenter"));
        let mut pool = Pool::start(aug, workers, 2 * workers + 2, spec.slot_shape(), 0).expect("pool");
        g.bench_function(format!("pool_{workers}_workers_batch2"), |bch| {
            bch.iter(|| {
                let b = pool.next_batch().expect("batch");
                pool.give_back(b);
            })
        });
    }
    g.finish();
    let _ = std::fs::remove_dir_all(&base);
}

criterion_group!(benches, bench_warp, bench);
criterion_main!(benches);
