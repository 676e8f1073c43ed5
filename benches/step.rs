//! One full CPU training step (forward, loss, backward, SGD) of the demo net.
//! Throughput in elements/s where one element is one FLOP of the step's convolutions.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use segk::backend::cpu::CpuBackend;
use segk::demo::{topology, DemoConfig};
use segk::model::unet::Acts;
use segk::model::{Checkpointing, UNet};
use std::time::Duration;

fn bench(c: &mut Criterion) {
    let cfg = DemoConfig::default();
    let t = topology(&cfg);
    let be = CpuBackend::<f32>::new();
    let mut g = c.benchmark_group("train_step_cpu");
    g.sample_size(10).warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(5));
    let (fwd, bwd) = t.step_flops(cfg.patch, cfg.batch).unwrap();
    g.throughput(Throughput::Elements((fwd + bwd) as u64));
    for policy in [Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2] {
        let mut net = UNet::new(&be, t.clone(), 0).unwrap();
        let acts = Acts::new(&be, &t, cfg.patch, cfg.batch, policy, true).unwrap();
        let vox = cfg.batch * cfg.patch.iter().product::<usize>();
        let image: Vec<f32> = (0..vox).map(|i| ((i * 31 % 97) as f32 - 48.0) / 48.0).collect();
        let labels: Vec<u8> = (0..vox).map(|i| (i * 13 % 4) as u8).collect();
        g.bench_function(format!("demo_net_32cube_b2_ckpt{}", policy.level()), |b| {
            b.iter(|| net.train_step(&be, &acts, &image, &labels, 1e-3).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
