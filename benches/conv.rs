//! CPU conv3d forward, dgrad and wgrad on shapes of a real nnU-Net net (batch 2, 3x3x3).
//! Throughput is reported in elements/s where one element is one FLOP (2 x MACs).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use segk::backend::cpu::{bf16, conv, Operands};
use segk::backend::ConvGeom;
use segk::tensor::Dims;
use std::time::Duration;

fn shapes() -> Vec<(&'static str, Dims, ConvGeom)> {
    vec![
        ("32to32_64cube", Dims::new(2, [64, 64, 64], 32), ConvGeom::new(32, 32, [3, 3, 3], [1, 1, 1])),
        ("64to64_32cube", Dims::new(2, [32, 32, 32], 64), ConvGeom::new(64, 64, [3, 3, 3], [1, 1, 1])),
        ("320to320_4x4x8", Dims::new(2, [4, 4, 8], 320), ConvGeom::new(320, 320, [3, 3, 3], [1, 1, 1])),
        ("32to64_s2_64cube", Dims::new(2, [64, 64, 64], 32), ConvGeom::new(32, 64, [3, 3, 3], [2, 2, 2])),
    ]
}

fn data(n: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect()
}

/// f32, and bf16 products where the CPU has AVX512-BF16.
fn precisions() -> Vec<(Operands, &'static str)> {
    let mut v = vec![(Operands::Working, "")];
    if bf16::available() {
        v.push((Operands::Bf16, "_bf16"));
    } else {
        println!("bf16 variants skipped: this CPU has no AVX512-BF16");
    }
    v
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("conv3d_cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    for (name, xd, geom) in shapes() {
        let yd = geom.out_dims(xd);
        let (x, w, b, dy) = (data(xd.len()), data(geom.weight_len()), data(geom.cout), data(yd.len()));
        let (mut y, mut dx, mut dw, mut db) = (vec![0.0; yd.len()], vec![0.0; xd.len()], vec![0.0; w.len()], vec![0.0; geom.cout]);
        g.throughput(Throughput::Elements(geom.flops(xd) as u64));
        for (ops, tag) in precisions() {
            g.bench_function(BenchmarkId::new(format!("fwd{tag}"), name), |bch| bch.iter(|| conv::conv_fwd(&x, xd, &w, &b, &mut y, &geom, ops)));
            g.bench_function(BenchmarkId::new(format!("dgrad{tag}"), name), |bch| bch.iter(|| conv::conv_dgrad(&dy, &w, &mut dx, xd, &geom, 0.0, ops)));
            g.bench_function(BenchmarkId::new(format!("wgrad{tag}"), name), |bch| bch.iter(|| conv::conv_wgrad(&x, xd, &dy, &mut dw, &mut db, &geom, ops)));
        }
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
