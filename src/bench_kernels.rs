//! `segk bench kernels`: each op family alone, on the layer shapes of a 3d_fullres net (patch
//! 128^3, batch 2, features 32..320, 6 stages by default), with the rate that bounds it:
//! TFLOP/s for the convolutions (bf16 tensor cores on a GPU), GB/s of compulsory traffic for
//! the memory-bound ops. On a GPU each rate is also given as a share of the H100 targets the
//! issue set: 790 TFLOP/s bf16 dense and 3 TB/s of HBM. Inputs are not rotated: a layer whose
//! tensors fit in L2 (the deepest stages) reads them from L2 on repeats, which flatters its
//! GB/s, not its TFLOP/s (those layers are compute-bound).

use crate::backend::{Backend, ConvGeom, ConvTGeom, DiceMode, SgdParams, LOSS_RECORD};
use crate::bench_step::parse_triple;
use crate::model::topology::nnunet_features;
use crate::model::Topology;
use crate::tensor::Dims;
use anyhow::Result;
use serde::Serialize;
use std::time::Instant;

pub const H100_BF16_TFLOPS: f64 = 790.0;
pub const H100_HBM_GBPS: f64 = 3000.0;

#[derive(clap::Args, Debug, Clone)]
pub struct KernelArgs {
    /// Patch size D,H,W of the net whose layers are timed.
    #[arg(long, default_value = "128,128,128", value_parser = parse_triple)]
    pub patch: [usize; 3],
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    /// Stages (features min(32*2^i, 320)).
    #[arg(long, default_value_t = 6)]
    pub stages: usize,
    /// Classes including background (heads and loss).
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What the convolutions multiply: auto (the device's default: bf16 on a GPU, f32 on a
    /// CPU), f32 (CPU only) or bf16 (a CPU's AVX512-BF16).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::device::Precision,
    /// Timed runs per op (after one warm-up); the median is reported.
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Only ops whose name contains this.
    #[arg(long)]
    pub only: Option<String>,
    /// One JSON object per line instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One timed op.
#[derive(Serialize, Debug, Clone)]
pub struct Row {
    pub op: String,
    pub shape: String,
    pub median_ms: f64,
    pub tflops: Option<f64>,
    pub gbps: Option<f64>,
}

/// The ops to time: every distinct conv layer of the net (forward, dgrad, wgrad), the
/// transposed convs, norm and loss at full resolution, the optimizer over all parameters.
enum Op {
    Conv(ConvGeom, Dims),
    ConvT(ConvTGeom, Dims),
    Norm(Dims),
    Loss(Dims),
    Sgd(usize),
}

fn ops(t: &Topology, patch: [usize; 3], batch: usize) -> Result<Vec<Op>> {
    let sp = t.stage_spatial(patch)?;
    let mut v = Vec::new();
    let mut seen = Vec::new();
    let mut conv = |g: ConvGeom, x: Dims, v: &mut Vec<Op>| {
        if !seen.contains(&(g, x)) {
            seen.push((g, x));
            v.push(Op::Conv(g, x));
        }
    };
    for s in 0..t.stages() {
        let input = if s == 0 { sp[0] } else { sp[s - 1] };
        let cin = t.enc_geom(s, 0).cin;
        conv(t.enc_geom(s, 0), Dims::new(batch, input, cin), &mut v);
        conv(t.enc_geom(s, 1), Dims::new(batch, sp[s], t.features[s]), &mut v);
        if s + 1 < t.stages() {
            conv(t.dec_geom(s, 0), Dims::new(batch, sp[s], 2 * t.features[s]), &mut v);
        }
    }
    conv(t.head_geom(0), Dims::new(batch, sp[0], t.features[0]), &mut v);
    for s in 0..t.stages() - 1 {
        v.push(Op::ConvT(t.up_geom(s), Dims::new(batch, sp[s + 1], t.features[s + 1])));
    }
    v.push(Op::Norm(Dims::new(batch, sp[0], t.features[0])));
    v.push(Op::Loss(Dims::new(batch, sp[0], t.n_classes)));
    v.push(Op::Sgd(crate::model::params::ParamLayout::new(t).len));
    Ok(v)
}

fn dims_str(d: Dims) -> String {
    let s = d.spatial();
    format!("{}x{}x{}x{}x{}", d.n, s[0], s[1], s[2], d.c)
}

/// Median time of one call of `f` over `reps` runs after one warm-up, the device synchronised
/// around each run. A run repeats `f` back to back until it lasts ~2 ms, so that a kernel of a
/// few microseconds is not measured as launch and synchronisation latency.
fn time<B: Backend>(be: &B, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    be.sync()?;
    let t0 = Instant::now();
    f()?;
    be.sync()?;
    let once = t0.elapsed().as_secs_f64();
    let inner = ((2e-3 / once.max(1e-9)).ceil() as usize).clamp(1, 256);
    let mut t = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let t0 = Instant::now();
        for _ in 0..inner {
            f()?;
        }
        be.sync()?;
        t.push(t0.elapsed().as_secs_f64() / inner as f64);
    }
    Ok(crate::bench_step::median(&mut t))
}

/// Arenas filled with a constant pattern (rates do not depend on the values; finite ones
/// keep the loss and norm paths ordinary), kept alive for the views handed out.
pub struct Mem<'a, B: Backend> {
    be: &'a B,
    keep: Vec<B::Arena>,
    labels: Vec<B::LabelArena>,
}

impl<'a, B: Backend> Mem<'a, B> {
    pub fn new(be: &'a B) -> Self {
        Mem { be, keep: Vec::new(), labels: Vec::new() }
    }
    /// Working precision (weights, statistics, optimizer state).
    pub fn buf(&mut self, len: usize, value: f32) -> Result<B::Buf> {
        let a = self.be.alloc(len)?;
        self.keep(a, len, value)
    }
    /// Activation memory (bf16 on a GPU by default).
    pub fn act(&mut self, len: usize, value: f32) -> Result<B::Buf> {
        let a = self.be.alloc_act(len)?;
        self.keep(a, len, value)
    }
    fn keep(&mut self, a: B::Arena, len: usize, value: f32) -> Result<B::Buf> {
        let v = self.be.view(&a, 0, len);
        self.be.fill(v, value)?;
        self.keep.push(a);
        Ok(v)
    }
    /// Label maps cycling through `classes`.
    pub fn labels(&mut self, len: usize, classes: usize) -> Result<B::LabelBuf> {
        let a = self.be.alloc_labels(len)?;
        let v = self.be.label_view(&a, 0, len);
        let host: Vec<u8> = (0..len).map(|i| (i % classes) as u8).collect();
        self.be.upload_labels(v, &host)?;
        self.labels.push(a);
        Ok(v)
    }
}

fn rows_of<B: Backend>(be: &B, op: &Op, reps: usize, keep: &dyn Fn(&str) -> bool) -> Result<Vec<Row>> {
    let mut m = Mem::new(be);
    let mut out = Vec::new();
    let mut row = |op: &str, shape: String, secs: f64, flops: Option<f64>, bytes: Option<f64>| {
        out.push(Row { op: op.into(), shape, median_ms: secs * 1e3, tflops: flops.map(|f| f / secs / 1e12), gbps: bytes.map(|b| b / secs / 1e9) });
    };
    match *op {
        Op::Conv(g, x) => {
            let y = g.out_dims(x);
            let name = |k: &str| format!("conv_{k} {}x{}x{} s{}", g.kernel[0], g.kernel[1], g.kernel[2], g.stride.iter().max().copied().unwrap_or(1));
            let shape = format!("{} -> {} ch", dims_str(x), g.cout);
            let (xb, wb, bb, yb) = (m.act(x.len(), 0.5)?, m.buf(g.weight_len(), 0.01)?, m.buf(g.cout, 0.0)?, m.act(y.len(), 0.0)?);
            if keep(&name("fwd")) {
                row(&name("fwd"), shape.clone(), time(be, reps, || be.conv_fwd(xb, x, wb, bb, yb, &g))?, Some(g.flops(x)), None);
            }
            if keep(&name("dgrad")) {
                row(&name("dgrad"), shape.clone(), time(be, reps, || be.conv_dgrad(yb, wb, xb, x, &g, 0.0))?, Some(g.flops(x)), None);
            }
            if keep(&name("wgrad")) {
                let (dw, db) = (m.buf(g.weight_len(), 0.0)?, m.buf(g.cout, 0.0)?);
                row(&name("wgrad"), shape, time(be, reps, || be.conv_wgrad(xb, x, yb, dw, db, &g))?, Some(g.flops(x)), None);
            }
        }
        Op::ConvT(g, x) => {
            let y = g.out_dims(x);
            let shape = format!("{} -> {} ch", dims_str(x), g.cout);
            let (xb, wb, bb, yb) = (m.act(x.len(), 0.5)?, m.buf(g.weight_len(), 0.01)?, m.buf(g.cout, 0.0)?, m.act(y.len(), 0.0)?);
            if keep("convt_fwd") {
                row("convt_fwd", shape.clone(), time(be, reps, || be.convt_fwd(xb, x, wb, bb, yb, &g))?, Some(g.flops(x)), None);
            }
            if keep("convt_dgrad") {
                row("convt_dgrad", shape.clone(), time(be, reps, || be.convt_dgrad(yb, wb, xb, x, &g, 0.0))?, Some(g.flops(x)), None);
            }
            if keep("convt_wgrad") {
                let (dw, db) = (m.buf(g.weight_len(), 0.0)?, m.buf(g.cout, 0.0)?);
                row("convt_wgrad", shape, time(be, reps, || be.convt_wgrad(xb, x, yb, dw, db, &g))?, Some(g.flops(x)), None);
            }
        }
        Op::Norm(d) => {
            let e = be.act_bytes() as f64;
            let n = d.len() as f64;
            let st = d.n * d.c;
            let (x, y, dy) = (m.act(d.len(), 0.5)?, m.act(d.len(), 0.0)?, m.act(d.len(), 0.1)?);
            let (mean, rstd, gamma, beta, dg, dbt) = (m.buf(st, 0.0)?, m.buf(st, 1.0)?, m.buf(d.c, 1.0)?, m.buf(d.c, 0.0)?, m.buf(d.c, 0.0)?, m.buf(d.c, 0.0)?);
            // Compulsory traffic: stats read x; forward reads x, writes y; backward reads
            // dy and x, writes dx.
            if keep("norm_stats") {
                row("norm_stats", dims_str(d), time(be, reps, || be.norm_stats(x, d, mean, rstd))?, None, Some(n * e));
            }
            if keep("norm_act_fwd") {
                row("norm_act_fwd", dims_str(d), time(be, reps, || be.norm_act_fwd(x, d, mean, rstd, gamma, beta, y))?, None, Some(2.0 * n * e));
            }
            if keep("norm_act_bwd") {
                let dx = m.act(d.len(), 0.0)?;
                row("norm_act_bwd", dims_str(d), time(be, reps, || be.norm_act_bwd(dy, x, d, mean, rstd, gamma, beta, dx, dg, dbt))?, None, Some(3.0 * n * e));
            }
            // A residual block's end reads the residual too; its gradient reads dy and y.
            if keep("norm_add_act_fwd") {
                let res = m.act(d.len(), 0.25)?;
                row("norm_add_act_fwd", dims_str(d), time(be, reps, || be.norm_fwd(x, d, mean, rstd, gamma, beta, Some(res), crate::backend::Act::LeakyRelu, y))?, None, Some(3.0 * n * e));
            }
            if keep("leaky_bwd") {
                let dx = m.act(d.len(), 0.0)?;
                row("leaky_bwd", dims_str(d), time(be, reps, || be.leaky_bwd(dy, y, dx))?, None, Some(3.0 * n * e));
            }
            // A ResNet-D skip's 2x2x2 pooling: reads x, writes an eighth of it (backward: the
            // reverse, every input voxel written).
            if keep("avg_pool") && d.d % 2 == 0 && d.h % 2 == 0 && d.w % 2 == 0 {
                let k = [2, 2, 2];
                let pd = crate::backend::pooled_dims(d, k);
                let (p, dx) = (m.act(pd.len(), 0.0)?, m.act(d.len(), 0.0)?);
                row("avg_pool", dims_str(d), time(be, reps, || be.avg_pool(x, d, k, p))?, None, Some((n + pd.len() as f64) * e));
                row("avg_pool_bwd", dims_str(d), time(be, reps, || be.avg_pool_bwd(p, k, dx, d, 0.0))?, None, Some((n + pd.len() as f64) * e));
            }
        }
        Op::Loss(d) => {
            if keep("softmax_dice_ce") {
                let e = be.act_bytes() as f64;
                let logits = m.act(d.len(), 0.0)?;
                let labels = m.labels(d.rows(), d.c)?;
                let record = m.buf(LOSS_RECORD, 0.0)?;
                // Reads logits and labels, writes the gradient over the logits.
                let bytes = 2.0 * d.len() as f64 * e + d.rows() as f64;
                row("softmax_dice_ce", dims_str(d), time(be, reps, || be.fill(logits, 0.0).and_then(|_| be.softmax_dice_ce(logits, d, labels, DiceMode::Batch, false, 1.0, record)))?, None, Some(bytes));
            }
            if keep("sigmoid_dice_bce") && d.c <= crate::backend::MAX_REGIONS {
                // The same head as a region net's: nested regions over the first c labels.
                let e = be.act_bytes() as f64;
                let regions: Vec<Vec<i64>> = (1..=d.c as i64).map(|k| (k..=d.c as i64).collect()).collect();
                let masks = crate::backend::RegionMasks::new(&regions)?;
                let (logits, labels, record) = (m.act(d.len(), 0.0)?, m.labels(d.rows(), d.c + 1)?, m.buf(LOSS_RECORD, 0.0)?);
                let bytes = 2.0 * d.len() as f64 * e + d.rows() as f64;
                row("sigmoid_dice_bce", dims_str(d), time(be, reps, || be.fill(logits, 0.0).and_then(|_| be.sigmoid_dice_bce(logits, d, labels, &masks, DiceMode::Batch, false, 1.0, record)))?, None, Some(bytes));
            }
        }
        Op::Sgd(n) => {
            if keep("sgd_update") {
                let e = be.elem_bytes() as f64;
                let (p, g, mo) = (m.buf(n, 0.1)?, m.buf(n, 0.01)?, m.buf(n, 0.0)?);
                let sp = SgdParams { lr: 1e-3, momentum: 0.99, weight_decay: 3e-5, max_grad_norm: 12.0 };
                // A squared norm of 1: the update runs, unclipped.
                let guard = m.buf(1, 1.0)?;
                // Reads params, grads, momentum; writes params and momentum.
                row("sgd_update", format!("{n} params"), time(be, reps, || be.sgd_update(p, g, mo, &sp, guard))?, None, Some(5.0 * n as f64 * e));
            }
        }
    }
    Ok(out)
}

struct Measure<'a>(&'a KernelArgs);

impl crate::device::Job for Measure<'_> {
    type Out = (String, Vec<Row>);
    fn run<B: Backend>(self, be: &B) -> Result<(String, Vec<Row>)> {
        let a = self.0;
        let t = Topology::isotropic(1, a.classes, nnunet_features(a.stages, 32, 320));
        let keep = |name: &str| a.only.as_deref().is_none_or(|f| name.contains(f));
        let mut rows = Vec::new();
        if !a.json {
            println!("  device {}", be.name());
        }
        for op in ops(&t, a.patch, a.batch)? {
            // Each op's buffers are freed before the next op allocates its own.
            let r = rows_of(be, &op, a.reps, &keep)?;
            for row in &r {
                if a.json {
                    println!("{}", serde_json::to_string(row)?);
                } else {
                    print_row(row, be.name().starts_with("cuda"));
                }
            }
            rows.extend(r);
        }
        Ok((be.name(), rows))
    }
}

fn print_row(r: &Row, gpu: bool) {
    let rate = match (r.tflops, r.gbps) {
        (Some(t), _) if gpu => format!("{t:8.1} TFLOP/s {:5.1} % of {H100_BF16_TFLOPS:.0}", 100.0 * t / H100_BF16_TFLOPS),
        (Some(t), _) => format!("{:8.1} GFLOP/s", t * 1e3),
        (_, Some(g)) if gpu => format!("{g:8.1} GB/s    {:5.1} % of {H100_HBM_GBPS:.0}", 100.0 * g / H100_HBM_GBPS),
        (_, Some(g)) => format!("{g:8.1} GB/s"),
        _ => String::new(),
    };
    println!("  {:<20} {:<32} {:>10.3} ms  {rate}", r.op, r.shape, r.median_ms);
}

pub fn run(a: &KernelArgs) -> Result<Vec<Row>> {
    if !a.json {
        let p = a.patch;
        println!("segk bench kernels: {} stages, patch {}x{}x{}, batch {}, device {} (median of {} runs)", a.stages, p[0], p[1], p[2], a.batch, a.device, a.reps.max(1));
    }
    let (_name, rows) = crate::device::run_on(&a.device, a.precision, Measure(a))?;
    Ok(rows)
}
