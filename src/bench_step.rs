//! `segk bench step`: median time of full training steps (forward, loss, backward, SGD) of a
//! PlainConvUNet on random data. Every comparison with PyTorch uses this command; its text
//! output keeps this layout, and `--json` prints the same figures as one JSON object.

use crate::backend::Backend;
use crate::model::topology::nnunet_features;
use crate::model::unet::{Acts, Input};
use crate::model::{Checkpointing, Topology, UNet};
use anyhow::{bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::time::Instant;

#[derive(clap::Args, Debug, Clone)]
pub struct StepArgs {
    /// Patch size D,H,W (or DxHxW).
    #[arg(long, default_value = "80,96,80", value_parser = parse_triple)]
    pub patch: [usize; 3],
    #[arg(long, default_value_t = 2)]
    pub batch: usize,
    #[arg(long, default_value_t = 1)]
    pub in_channels: usize,
    /// Classes including background.
    #[arg(long, default_value_t = 3)]
    pub classes: usize,
    /// Stages (used when --features is not given: min(32*2^i, 320)).
    #[arg(long, default_value_t = 5, conflicts_with = "features")]
    pub stages: usize,
    /// Features per stage, comma separated.
    #[arg(long, value_delimiter = ',')]
    pub features: Option<Vec<usize>>,
    /// Kernel per stage, e.g. 1x3x3,3x3x3,... (default 3x3x3 everywhere).
    #[arg(long, value_delimiter = ',', value_parser = parse_triple)]
    pub kernels: Option<Vec<[usize; 3]>>,
    /// Stride per stage, e.g. 1x1x1,2x2x2,... (default 1 then 2 everywhere).
    #[arg(long, value_delimiter = ',', value_parser = parse_triple)]
    pub strides: Option<Vec<[usize; 3]>>,
    /// Residual blocks per encoder stage, e.g. 1,3,4,6,6,6 (nnU-Net's ResEnc presets'
    /// ResidualEncoderUNet, one decoder conv per stage); default a PlainConvUNet.
    #[arg(long, value_delimiter = ',')]
    pub blocks: Option<Vec<usize>>,
    /// Gradient checkpointing level: 0, 1 or 2.
    #[arg(long, default_value_t = 0)]
    pub checkpointing: u8,
    /// Print the exact training memory at each checkpoint level (parameters, gradients,
    /// momentum, activations; f32 and bf16 activation storage) and run nothing.
    #[arg(long)]
    pub memory_only: bool,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// What the convolutions multiply: auto (the device's default: bf16 on a GPU, f32 on a
    /// CPU), f32 (CPU only) or bf16 (a CPU's AVX512-BF16).
    #[arg(long, value_enum, default_value = "auto")]
    pub precision: crate::device::Precision,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, default_value_t = 3)]
    pub steps: usize,
    /// Read topology, patch and batch from a plans file's 3d_fullres (nnUNetPlans.json, with the dataset.json beside it), or a JSON file ({"topology": .., "patch": .., "batch": ..}).
    #[arg(long)]
    pub plans: Option<std::path::PathBuf>,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Also time every op (the device synchronised around each) and print where a step goes.
    #[arg(long)]
    pub profile: bool,
}

pub fn parse_triple(s: &str) -> Result<[usize; 3], String> {
    let v: Vec<usize> = s.split(['x', ',']).map(|t| t.trim().parse::<usize>().map_err(|e| format!("{s:?}: {e}"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("{s:?}: expected three numbers like 80,96,80 (or 80x96x80)"))
}

/// What a plans file (or the flags) describe for the benchmark.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct StepSpec {
    pub topology: Topology,
    pub patch: [usize; 3],
    pub batch: usize,
}

#[derive(Serialize, Debug)]
pub struct StepReport {
    pub device: String,
    pub spec: StepSpec,
    pub checkpointing: u8,
    pub params: usize,
    pub gflop_forward: f64,
    pub gflop_backward: f64,
    pub steps: usize,
    pub step_median_s: f64,
    pub step_min_s: f64,
    pub step_max_s: f64,
    pub forward_median_s: f64,
    pub backward_median_s: f64,
    pub gflops_per_s: f64,
    pub param_bytes: usize,
    pub activation_bytes: usize,
    pub peak_rss_bytes: Option<usize>,
    /// Device memory this run holds once the steps ran (in use after, less in use before: the
    /// arenas and workspace stay allocated, so this is its peak; like PyTorch's reserved memory,
    /// not counting the context): None on the CPU.
    #[serde(default)]
    pub peak_gpu_bytes: Option<u64>,
}

fn spec(a: &StepArgs) -> Result<StepSpec> {
    ensure!(a.steps >= 1, "--steps must be at least 1");
    let s = spec_asked(a)?;
    ensure!(s.batch >= 1 && s.patch.iter().all(|&v| v >= 1), "the batch and every patch axis must be at least 1 (got batch {}, patch {:?})", s.batch, s.patch);
    Ok(s)
}

fn spec_asked(a: &StepArgs) -> Result<StepSpec> {
    if let Some(p) = &a.plans {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        // A plans file (nnU-Net's schema) times its 3d_fullres step as training would run it;
        // the dataset.json beside it (a preprocessed or model folder has one) gives the
        // channels and classes.
        let value: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not JSON", p.display()))?;
        if value.get("configurations").is_some() {
            let plans = crate::plan::plans::parse_plans(text.as_bytes(), &p.display().to_string())?;
            let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
            let json = crate::dataset::read_json(dir).with_context(|| format!("{}: a plans file needs the dataset.json beside it", p.display()))?;
            let c = crate::plan::plans::from_nnunet(&plans, "3d_fullres", &json)?;
            return Ok(StepSpec { topology: c.topology, patch: c.patch_size, batch: c.batch_size });
        }
        return serde_json::from_value(value).with_context(|| format!("{}: neither a plans file nor a step spec (topology, patch, batch)", p.display()));
    }
    let features = a.features.clone().unwrap_or_else(|| nnunet_features(a.stages, 32, 320));
    let n = features.len();
    let mut t = Topology::isotropic(a.in_channels, a.classes, features);
    if let Some(k) = &a.kernels {
        t.kernels = k.clone();
    }
    if let Some(s) = &a.strides {
        t.strides = s.clone();
    }
    if t.kernels.len() != n || t.strides.len() != n {
        bail!("--kernels and --strides need one entry per stage ({n})");
    }
    if let Some(b) = &a.blocks {
        ensure!(b.len() == n, "--blocks needs one entry per stage ({n})");
        t = t.residual(b.clone());
    }
    Ok(StepSpec { topology: t, patch: a.patch, batch: a.batch })
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite timings"));
    v[v.len() / 2]
}

/// Peak resident set size of this process (VmHWM), where /proc has it.
pub fn peak_rss_bytes() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<usize>().ok().map(|kb| kb * 1024)
}

struct Measure<'a>(&'a StepArgs);

impl crate::device::Job for Measure<'_> {
    type Out = StepReport;
    fn run<B: Backend>(self, be: &B) -> Result<StepReport> {
        if self.0.profile {
            let p = crate::backend::profile::Profiled::new(be);
            let a = StepArgs { warmup: self.0.warmup.max(1), steps: 1, ..self.0.clone() };
            let r = measure_with(&p, &a, || p.reset())?;
            println!("per-op time of one step (device synchronised around each op):");
            let total: f64 = p.table().iter().map(|t| t.1).sum();
            for (op, secs, calls, gflops) in p.table() {
                let rate = gflops.map(|g| format!("{g:8.1} GFLOP/s")).unwrap_or_default();
                println!("  {op:<18} {secs:8.3} s {:5.1} %  {calls:5} calls {rate}", 100.0 * secs / total);
            }
            return Ok(r);
        }
        measure(be, self.0)
    }
}

pub fn run(a: &StepArgs) -> Result<()> {
    if a.memory_only {
        return print_memory(&spec(a)?);
    }
    let report = crate::device::run_on(&a.device, a.precision, Measure(a))?;
    print(&report, a.json)
}

pub fn measure<B: Backend>(be: &B, a: &StepArgs) -> Result<StepReport> {
    measure_with(be, a, || {})
}

/// `measure`, calling `after_warmup` once the warm-up steps are done.
pub fn measure_with<B: Backend>(be: &B, a: &StepArgs, after_warmup: impl Fn()) -> Result<StepReport> {
    let spec = spec(a)?;
    let (t, patch, batch) = (&spec.topology, spec.patch, spec.batch);
    let policy = Checkpointing::from_level(a.checkpointing)?;
    let (fwd, bwd) = t.step_flops(patch, batch)?;
    // Device memory in use before this run's allocations (the context, other processes).
    let used_before = be.memory_used();
    let mut net = UNet::new(be, t.clone(), 0)?;
    // Forward and backward timed apart: the step synchronises at each end (a few microseconds).
    net.timed = true;
    let acts = Acts::new(be, t, patch, batch, policy, true)?;
    let mut rng = rand_pcg::Pcg64::seed_from_u64(1);
    let vox = batch * patch.iter().product::<usize>();
    let image: Vec<f32> = (0..vox * t.in_channels).map(|_| rng.random_range(-1.0..1.0)).collect();
    let labels: Vec<u8> = (0..vox).map(|_| rng.random_range(0..t.n_classes as u8)).collect();
    // The batch stays on the device, as the PyTorch peer's does: the step alone is timed
    // (in training the feed uploads the next batch while a step runs).
    be.upload(acts.input_image(be), &image)?;
    be.upload_labels(acts.input_labels(be)?, &labels)?;
    let (mut total, mut f, mut b) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..a.warmup + a.steps.max(1) {
        if i == a.warmup {
            after_warmup();
        }
        let t0 = Instant::now();
        net.step(be, &acts, Input::Resident, 1e-2)?;
        be.sync()?;
        if i >= a.warmup {
            total.push(t0.elapsed().as_secs_f64());
        }
    }
    for loss in net.take_steps(be)?.iter().skip(a.warmup) {
        f.push(loss.forward_secs);
        b.push(loss.backward_secs);
    }
    let step = median(&mut total);
    Ok(StepReport {
        device: be.name(),
        checkpointing: policy.level(),
        params: net.n_params(),
        gflop_forward: fwd / 1e9,
        gflop_backward: bwd / 1e9,
        steps: total.len(),
        step_median_s: step,
        step_min_s: total[0],
        step_max_s: total[total.len() - 1],
        forward_median_s: median(&mut f),
        backward_median_s: median(&mut b),
        gflops_per_s: (fwd + bwd) / step / 1e9,
        param_bytes: net.param_bytes(be),
        activation_bytes: acts.bytes(be),
        peak_rss_bytes: peak_rss_bytes(),
        peak_gpu_bytes: be.memory_used().zip(used_before).map(|(after, before)| after.saturating_sub(before)),
        spec,
    })
}

/// The bytes a training step of `s` takes at each checkpoint level: parameters, gradients
/// and momentum (f32) plus activations stored as f32 (the CPU) or bf16 (a GPU's default),
/// exactly as the arenas are sized (the backend's workspace aside).
fn print_memory(s: &StepSpec) -> Result<()> {
    let t = &s.topology;
    let params = 3 * 4 * crate::model::params::ParamLayout::new(t).len;
    println!("training memory of {} (patch {:?}, batch {}): parameters, gradients and momentum {}", describe(t), s.patch, s.batch, mib(params));
    for policy in [Checkpointing::None, Checkpointing::Level1, Checkpointing::Level2] {
        let act = |bytes| crate::model::plan::activation_bytes(t, s.patch, s.batch, policy, bytes, 4);
        println!("  level {}  activations f32 {:>11}, bf16 {:>11};  total with bf16 activations {:.2} GiB", policy.level(), mib(act(4)?), mib(act(2)?), (params + act(2)?) as f64 / (1u64 << 30) as f64);
    }
    Ok(())
}

/// The net in words: its stages and widths, and its encoder.
fn describe(t: &Topology) -> String {
    let enc = if t.is_residual() { format!("residual encoder, blocks {:?}", t.blocks_per_stage) } else { format!("{} convs/stage", t.convs_per_stage) };
    format!("{} stages, features {:?}, {enc}", t.stages(), t.features)
}

fn mib(b: usize) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn print(r: &StepReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(r)?);
        return Ok(());
    }
    let t = &r.spec.topology;
    let triples = |v: &[[usize; 3]]| v.iter().map(|k| format!("{}x{}x{}", k[0], k[1], k[2])).collect::<Vec<_>>().join(",");
    let p = r.spec.patch;
    println!("segk bench step");
    println!("  device          {}", r.device);
    println!("  net             {}, deep supervision {}", describe(t), t.deep_supervision);
    println!("  kernels         {}", triples(&t.kernels));
    println!("  strides         {}", triples(&t.strides));
    println!("  patch           {}x{}x{}, batch {}, in channels {}, classes {}", p[0], p[1], p[2], r.spec.batch, t.in_channels, t.n_classes);
    println!("  checkpointing   {}", r.checkpointing);
    println!("  params          {} ({:.2} M)", r.params, r.params as f64 / 1e6);
    println!("  work/step       {:.1} GFLOP (forward {:.1}, backward {:.1})", r.gflop_forward + r.gflop_backward, r.gflop_forward, r.gflop_backward);
    println!("  step            median {:.3} s  (min {:.3}, max {:.3}, {} steps)", r.step_median_s, r.step_min_s, r.step_max_s, r.steps);
    println!("  forward+loss    {:.3} s", r.forward_median_s);
    println!("  backward        {:.3} s", r.backward_median_s);
    println!("  throughput      {:.1} GFLOP/s", r.gflops_per_s);
    let gpu = r.peak_gpu_bytes.map(|b| format!(", peak GPU {} in use", mib(b as usize))).unwrap_or_default();
    println!("  memory          params+grads+momentum {}, activations {}, peak RSS {}{gpu}", mib(r.param_bytes), mib(r.activation_bytes), r.peak_rss_bytes.map(mib).unwrap_or_else(|| "n/a".into()));
    Ok(())
}
