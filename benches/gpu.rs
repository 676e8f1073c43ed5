//! The CUDA backend under criterion: the large conv layers of the 3d_fullres net (TFLOP/s as
//! elements/s, one element = one FLOP), the memory-bound kernels (bytes/s of compulsory
//! traffic) and a whole training step of the 3d_fullres net (patch 128³, batch 2, 6 stages,
//! checkpoint level 1). Activations are stored as the backend's default (bf16; set
//! SEGK_ACTIVATIONS=f32 to compare). Each iteration launches the op and waits for the GPU.
//! Without a usable GPU it prints why and measures nothing. The GPU machines have no Rust
//! toolchain: build with `cargo bench --bench gpu --no-run` here, copy the binary printed
//! there, and run it with `--bench`.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use segk::backend::cuda::{unavailable_reason, CudaBackend};
use segk::bench_kernels::Mem;
use segk::backend::{Backend, ConvGeom, DiceMode, SgdParams, LOSS_RECORD};
use segk::model::topology::nnunet_features;
use segk::model::unet::{Acts, Input};
use segk::model::{Checkpointing, Topology, UNet};
use segk::tensor::Dims;
use std::time::Duration;

fn convs(c: &mut Criterion, be: &CudaBackend) {
    let mut g = c.benchmark_group("cuda_conv3d");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    // The layers that carry most of a 3d_fullres step's FLOPs, and the widest one.
    let layers = [
        ("32to32_128cube", Dims::new(2, [128, 128, 128], 32), ConvGeom::new(32, 32, [3, 3, 3], [1, 1, 1])),
        ("64to64_64cube", Dims::new(2, [64, 64, 64], 64), ConvGeom::new(64, 64, [3, 3, 3], [1, 1, 1])),
        ("64to32_dec_128cube", Dims::new(2, [128, 128, 128], 64), ConvGeom::new(64, 32, [3, 3, 3], [1, 1, 1])),
        ("320to320_8cube", Dims::new(2, [8, 8, 8], 320), ConvGeom::new(320, 320, [3, 3, 3], [1, 1, 1])),
    ];
    for (name, xd, geom) in layers {
        let mut m = Mem::new(be);
        let yd = geom.out_dims(xd);
        let (x, w, b, y) = (m.act(xd.len(), 0.5).unwrap(), m.buf(geom.weight_len(), 0.01).unwrap(), m.buf(geom.cout, 0.0).unwrap(), m.act(yd.len(), 0.1).unwrap());
        let (dw, db) = (m.buf(geom.weight_len(), 0.0).unwrap(), m.buf(geom.cout, 0.0).unwrap());
        g.throughput(Throughput::Elements(geom.flops(xd) as u64));
        g.bench_function(BenchmarkId::new("fwd", name), |bch| bch.iter(|| be.conv_fwd(x, xd, w, b, y, &geom).and_then(|_| be.sync()).expect("conv_fwd")));
        g.bench_function(BenchmarkId::new("dgrad", name), |bch| bch.iter(|| be.conv_dgrad(y, w, x, xd, &geom, 0.0).and_then(|_| be.sync()).expect("conv_dgrad")));
        g.bench_function(BenchmarkId::new("wgrad", name), |bch| bch.iter(|| be.conv_wgrad(x, xd, y, dw, db, &geom).and_then(|_| be.sync()).expect("conv_wgrad")));
    }
    g.finish();
}

fn memory_bound(c: &mut Criterion, be: &CudaBackend) {
    let mut g = c.benchmark_group("cuda_memory_bound");
    g.sample_size(20).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    let mut m = Mem::new(be);
    let e = be.act_bytes() as u64;
    let d = Dims::new(2, [128, 128, 128], 32);
    let n = d.len() as u64;
    let (x, y, dy, dx) = (m.act(d.len(), 0.5).unwrap(), m.act(d.len(), 0.0).unwrap(), m.act(d.len(), 0.1).unwrap(), m.act(d.len(), 0.0).unwrap());
    let st = d.n * d.c;
    let (mean, rstd) = (m.buf(st, 0.0).unwrap(), m.buf(st, 1.0).unwrap());
    let (gamma, beta, dg, dbt) = (m.buf(d.c, 1.0).unwrap(), m.buf(d.c, 0.0).unwrap(), m.buf(d.c, 0.0).unwrap(), m.buf(d.c, 0.0).unwrap());
    // Compulsory traffic: stats read x; forward reads x and writes y; backward reads dy and x
    // and writes dx.
    g.throughput(Throughput::Bytes(n * e));
    g.bench_function("norm_stats_2x128cube_32ch", |bch| bch.iter(|| be.norm_stats(x, d, mean, rstd).and_then(|_| be.sync()).expect("norm_stats")));
    g.throughput(Throughput::Bytes(2 * n * e));
    g.bench_function("norm_act_fwd_2x128cube_32ch", |bch| bch.iter(|| be.norm_act_fwd(x, d, mean, rstd, gamma, beta, y).and_then(|_| be.sync()).expect("norm_act_fwd")));
    g.throughput(Throughput::Bytes(3 * n * e));
    g.bench_function("norm_act_bwd_2x128cube_32ch", |bch| bch.iter(|| be.norm_act_bwd(dy, x, d, mean, rstd, gamma, beta, dx, dg, dbt).and_then(|_| be.sync()).expect("norm_act_bwd")));

    let ld = Dims::new(2, [128, 128, 128], 3);
    let (logits, labels) = (m.act(ld.len(), 0.0).unwrap(), m.labels(ld.rows(), ld.c).unwrap());
    // Reads logits and labels, writes the gradient (the fill that restores the logits is
    // timed too: one more write).
    g.throughput(Throughput::Bytes(3 * ld.len() as u64 * e + ld.rows() as u64));
    let record = m.buf(LOSS_RECORD, 0.0).unwrap();
    g.bench_function("softmax_dice_ce_2x128cube_3cls", |bch| bch.iter(|| be.fill(logits, 0.0).and_then(|_| be.softmax_dice_ce(logits, ld, labels, DiceMode::Batch, false, 1.0, record)).and_then(|_| be.sync()).expect("loss")));

    let np = segk::model::params::ParamLayout::new(&net_topology()).len;
    let (p, gr, mo) = (m.buf(np, 0.1).unwrap(), m.buf(np, 0.01).unwrap(), m.buf(np, 0.0).unwrap());
    let sp = SgdParams { lr: 1e-3, momentum: 0.99, weight_decay: 3e-5, max_grad_norm: 12.0 };
    // A squared gradient norm of 1: the update runs, unclipped.
    let guard = m.buf(1, 1.0).unwrap();
    // Reads params, grads, momentum; writes params and momentum (f32).
    g.throughput(Throughput::Bytes(5 * 4 * np as u64));
    g.bench_function("sgd_update_3d_fullres_params", |bch| bch.iter(|| be.sgd_update(p, gr, mo, &sp, guard).and_then(|_| be.sync()).expect("sgd")));
    g.finish();
}

fn net_topology() -> Topology {
    Topology::isotropic(1, 3, nnunet_features(6, 32, 320))
}

fn training_step(c: &mut Criterion, be: &CudaBackend) {
    let mut g = c.benchmark_group("cuda_step");
    g.sample_size(10).warm_up_time(Duration::from_secs(3)).measurement_time(Duration::from_secs(15));
    let (t, patch, batch) = (net_topology(), [128, 128, 128], 2);
    let (fwd, bwd) = t.step_flops(patch, batch).expect("step flops");
    let mut net = UNet::new(be, t.clone(), 0).expect("net");
    let acts = Acts::new(be, &t, patch, batch, Checkpointing::Level1, true).expect("activations");
    let vox = batch * patch.iter().product::<usize>();
    be.upload(acts.input_image(be), &(0..vox).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 500.0).collect::<Vec<_>>()).expect("image");
    be.upload_labels(acts.input_labels(be).expect("labels"), &(0..vox).map(|i| ((i / 4099) % 3) as u8).collect::<Vec<_>>()).expect("labels");
    g.throughput(Throughput::Elements((fwd + bwd) as u64));
    g.bench_function("3d_fullres_128cube_b2_level1", |bch| bch.iter(|| net.step(be, &acts, Input::Resident, 1e-2).and_then(|_| net.take_steps(be)).expect("step")));
    g.finish();
}

fn bench(c: &mut Criterion) {
    if let Some(why) = unavailable_reason() {
        println!("SKIPPED gpu benches: {why}");
        return;
    }
    let be = CudaBackend::new(0).expect("CUDA backend");
    println!("gpu benches on {}", be.name());
    convs(c, &be);
    memory_bound(c, &be);
    training_step(c, &be);
}

criterion_group!(benches, bench);
criterion_main!(benches);
