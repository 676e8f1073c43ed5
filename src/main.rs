//! The `segk` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use segk::backend::Backend;
use segk::demo::{self, DemoConfig};
use segk::device::Job;
use segk::selftest;
use segk::synth::LABEL_NAMES;

const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SEGK_GIT_COMMIT"), ")\nCUDA kernels: ", env!("SEGK_KERNEL_INFO"), "\nkernel emulator: ", env!("SEGK_EMU_INFO"));

#[derive(Parser)]
#[command(name = "segk", version, long_version = LONG_VERSION, about = "Train and run nnU-Net-style 3D U-Nets: one binary, CPU or CUDA")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Generate synthetic cases, train (on the CPU unless --device says otherwise), predict held-out cases, print Dice.
    Demo {
        #[arg(long, default_value_t = 12)]
        epochs: usize,
        #[arg(long, default_value_t = 50)]
        iters: usize,
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Integrity check of an nnU-Net raw dataset: every problem, one line each, with its file.
    Check {
        /// The DatasetXXX_Name folder (with dataset.json, imagesTr, labelsTr), or its ID or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
    },
    /// Integrity check, then nnU-Net's dataset fingerprint written as JSON.
    Fingerprint {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// Output file (default: segk_fingerprint.json in the folder `segk plan` uses).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Integrity check, fingerprint, nnU-Net's plans (nnUNetPlans.json: 2d, 3d_fullres, 3d_lowres,
    /// 3d_cascade_fullres) and segk's 3d_fullres plan sized for a GPU budget (plans.json).
    Plan {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// nnU-Net's planner (-pl): ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL.
        #[arg(long = "pl", visible_alias = "planner", default_value = "ExperimentPlanner")]
        planner: String,
        /// nnU-Net's -gpu_memory_target in GB (default: the planner's own, 8/8/24/40).
        #[arg(long)]
        gpu_memory_target: Option<f64>,
        /// Instead of nnU-Net's 3d_fullres, train segk's own plan sized to this many GiB with its exact memory model.
        #[arg(long)]
        gpu_memory: Option<f64>,
        /// Output folder (default: $nnUNet_preprocessed/NAME, else DATASET/../segk_preprocessed/NAME).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Preprocess a planned dataset into the store (plans it first when plans.json is missing).
    Preprocess {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// Cases processed at once (default: SEGK_PROCESSES, else nnUNet_def_n_proc, else all CPUs).
        #[arg(long)]
        processes: Option<usize>,
        /// Store images as f16 (half the disk and page cache; default f32 as nnU-Net).
        #[arg(long)]
        f16: bool,
        /// When planning is needed: segk's own plan sized to this many GiB instead of nnU-Net's 3d_fullres.
        #[arg(long)]
        gpu_memory: Option<f64>,
        /// Preprocessed folder (default: as `segk plan`).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Train 3d_fullres on a fold (preprocessing first when the store is incomplete).
    Train {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// CONFIGURATION FOLD, as nnU-Net's: 3d_fullres (the configuration segk trains so far), then
        /// 0-4 or `all`. The older form `segk train DATASET FOLD` means 3d_fullres.
        #[arg(num_args = 1..=2, value_names = ["CONFIGURATION", "FOLD"], required = true)]
        configuration_fold: Vec<String>,
        /// The plans (-p): nnUNetPlans (nnU-Net's, the default `segk plan` trains), or segkPlans
        /// (`segk plan --gpu-memory`); must be the plans the preprocessed folder's plans.json holds.
        #[arg(short = 'p', long = "plans")]
        plans: Option<String>,
        /// auto (GPU 0 if usable, else CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Epochs (nnU-Net's 1000); the learning rate decays over them.
        #[arg(long, default_value_t = segk::train::EPOCHS)]
        epochs: usize,
        /// Training steps per epoch.
        #[arg(long, default_value_t = segk::train::ITERS_PER_EPOCH)]
        iters_per_epoch: usize,
        /// Validation batches per epoch for the pseudo-Dice (at least 1).
        #[arg(long, default_value_t = segk::train::VAL_ITERS)]
        val_iters: usize,
        /// Activation checkpointing: auto (the fastest level that fits), 0, 1 or 2.
        #[arg(long, default_value = "auto")]
        checkpointing: String,
        /// Epochs between checkpoint_latest saves.
        #[arg(long, default_value_t = segk::train::SAVE_EVERY)]
        save_every: usize,
        /// Continue from checkpoint_latest in the output folder.
        #[arg(long)]
        resume: bool,
        /// Skip predicting the validation cases after training.
        #[arg(long)]
        no_validation: bool,
        /// Augmentation workers (default: SEGK_WORKERS, else nnUNet_n_proc_DA, else CPUs - 1).
        #[arg(long)]
        workers: Option<usize>,
        /// Seed of the weights, the batches and the augmentation (a run is reproducible from it).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Preprocessed folder (default: as `segk plan`).
        #[arg(long)]
        preprocessed: Option<std::path::PathBuf>,
        /// The fold's output folder; its parent is the model folder `segk predict -m` takes (default: $nnUNet_results/NAME/segkTrainer__PLANS__CONFIGURATION/fold_F, else DATASET/../segk_results/NAME/segkTrainer__PLANS__CONFIGURATION/fold_F).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Predict a folder of raw NIfTI images (CASE_XXXX<ending>) with a trained model.
    Predict {
        /// Input folder (imagesTs naming).
        #[arg(short = 'i', long)]
        input: std::path::PathBuf,
        /// Output folder for the label maps.
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
        /// Model folder (plans.json, dataset.json, fold_F/ with checkpoints), as `segk train` writes it.
        #[arg(short = 'm', long)]
        model: std::path::PathBuf,
        /// Folds to average (default: every fold_* folder).
        #[arg(long, num_args = 1..)]
        folds: Option<Vec<String>>,
        /// Which checkpoint of each fold.
        #[arg(long, default_value = "checkpoint_final")]
        checkpoint: String,
        /// Tile step as a fraction of the patch.
        #[arg(long, default_value_t = 0.5)]
        step: f64,
        /// No mirror test-time augmentation (8x faster).
        #[arg(long)]
        no_tta: bool,
        /// Also write CASE.npz with the class probabilities on the input's grid (nnU-Net's
        /// `probabilities` array: float32, classes x z x y x; needs that much disk, not RAM).
        #[arg(long)]
        save_probabilities: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
    },
    /// Dice, IoU and counts per label and case of predictions against references (summary.json).
    Evaluate {
        /// Folder of predicted label maps (.nii/.nii.gz).
        pred: std::path::PathBuf,
        /// Folder of reference label maps with the same file names.
        gt: std::path::PathBuf,
        /// Labels to score: `1,2` or, as nnU-Net's -l, `1 2` (default: every nonzero label in the references).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        labels: Option<Vec<i64>>,
        /// Output file (default: PRED/summary.json).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// What segk sees: CPUs and quota, memory, GPUs, kernels, and the worker counts it would pick.
    Doctor,
    /// Write a generated nnU-Net raw dataset (CT-like images, organ + lesion labels).
    Synth {
        /// The DatasetXXX_Name folder to create.
        dataset: std::path::PathBuf,
        #[arg(long, default_value_t = 20)]
        cases: usize,
        /// Shape z,y,x.
        #[arg(long, default_value = "160,256,256", value_parser = parse_triple::<usize>)]
        shape: [usize; 3],
        /// Spacing z,y,x in mm (jittered +-20 % per case).
        #[arg(long, default_value = "1.5,0.8,0.8", value_parser = parse_triple::<f64>)]
        spacing: [f64; 3],
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Every kernel of a device against the CPU reference, then whole training steps.
    Selftest {
        /// cpu (the f32 CPU backend against f64), cuda[:N], or emu (the CUDA kernels run by the CPU emulator).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Seed of the random inputs (default: fresh each run).
        #[arg(long)]
        seed: Option<u64>,
        /// Only these families of checks, comma-separated: conv, norm, loss, misc, transfer, step.
        #[arg(long)]
        only: Option<String>,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Time training steps of a PlainConvUNet on random data.
    Step(segk::bench_step::StepArgs),
    /// Time each op family alone on the layer shapes of a net: TFLOP/s for convs, GB/s for the rest.
    Kernels(segk::bench_kernels::KernelArgs),
    /// Batches per second of the augmentation pool at several worker counts (generated data).
    Loader(segk::bench_loader::LoaderArgs),
}

fn parse_triple<T: std::str::FromStr>(s: &str) -> Result<[T; 3], String> {
    let v: Vec<T> = s.split(',').map(|p| p.trim().parse::<T>().map_err(|_| format!("{p:?} is not a number"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("expected three comma-separated values (z,y,x), got {s:?}"))
}

fn set_threads(n: Option<usize>) -> Result<()> {
    if let Some(n) = n {
        rayon::ThreadPoolBuilder::new().num_threads(n).build_global()?;
    }
    Ok(())
}

/// Dies quietly on a closed pipe (`segk ... | head`) like other Unix tools, instead of
/// panicking on the failed write (Rust ignores SIGPIPE by default).
#[cfg(unix)]
fn default_sigpipe() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGPIPE: i32 = 13;
    const SIG_DFL: usize = 0;
    // SAFETY: restores the default disposition of one signal before any thread starts.
    unsafe { signal(SIGPIPE, SIG_DFL) };
}

/// nnU-Net's single-dash flags of more than one letter (`-pl`, `-gpu_memory_target`), which
/// clap reads as bundles of short flags, in their long spelling.
fn nnunet_flag(arg: String) -> String {
    match arg.as_str() {
        "-pl" => "--pl".into(),
        "-gpu_memory_target" => "--gpu-memory-target".into(),
        _ => arg,
    }
}

fn main() {
    #[cfg(unix)]
    default_sigpipe();
    let cli = Cli::parse_from(std::env::args().map(nnunet_flag));
    let r = match cli.cmd {
        Cmd::Demo { epochs, iters, seed, threads, device } => set_threads(threads).and_then(|_| run_demo(epochs, iters, seed, &device)),
        Cmd::Selftest { device, seed, only } => selftest::command(&device, seed, only.as_deref()),
        Cmd::Check { dataset } => dataset_folder(&dataset).and_then(|d| run_check(&d)),
        Cmd::Fingerprint { dataset, out } => dataset_folder(&dataset).and_then(|d| run_fingerprint(&d, out)),
        Cmd::Plan { dataset, planner, gpu_memory_target, gpu_memory, out } => dataset_folder(&dataset).and_then(|d| run_plan(&d, gpu_memory, out, &planner, gpu_memory_target)),
        Cmd::Preprocess { dataset, processes, f16, gpu_memory, out } => dataset_folder(&dataset).and_then(|d| run_preprocess(&d, processes, f16, gpu_memory, out)),
        Cmd::Train { dataset, configuration_fold, plans, device, epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, no_validation, workers, seed, preprocessed, out } => {
            let o = TrainOpts { epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, validation: !no_validation, workers, seed };
            let (configuration, fold) = match configuration_fold.as_slice() {
                [fold] => {
                    eprintln!("note: `segk train DATASET {fold}` is the older form of `segk train DATASET 3d_fullres {fold}` (nnU-Net's CONFIGURATION FOLD); it will go");
                    ("3d_fullres", fold.as_str())
                }
                [c, fold, ..] => (c.as_str(), fold.as_str()),
                [] => ("", ""),
            };
            dataset_folder(&dataset).and_then(|d| run_train(&d, configuration, fold, plans.as_deref(), &device, o, preprocessed, out))
        }
        Cmd::Doctor => run_doctor(),
        Cmd::Predict { input, output, model, folds, checkpoint, step, no_tta, save_probabilities, device } => {
            run_predict(&input, &output, &model, folds, &checkpoint, segk::predict::PredictOptions { step, tta: !no_tta, save_probabilities }, &device)
        }
        Cmd::Evaluate { pred, gt, labels, out } => run_evaluate(&pred, &gt, labels, out),
        Cmd::Synth { dataset, cases, shape, spacing, seed } => run_synth(&dataset, segk::synth::RawSpec { cases, shape, spacing, seed }),
        Cmd::Bench { what: BenchCmd::Step(a) } => set_threads(a.threads).and_then(|_| segk::bench_step::run(&a)),
        Cmd::Bench { what: BenchCmd::Loader(a) } => segk::bench_loader::run(&a).map(|_| ()),
        Cmd::Bench { what: BenchCmd::Kernels(a) } => set_threads(a.threads).and_then(|_| segk::bench_kernels::run(&a).map(|_| ())),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run_check(root: &std::path::Path) -> Result<()> {
    let problems = segk::dataset::integrity::check(root);
    for p in &problems {
        println!("{p}");
    }
    if !problems.is_empty() {
        anyhow::bail!("{}: {} problem(s)", root.display(), problems.len());
    }
    let ds = segk::dataset::Dataset::open(root)?;
    let mut labels: Vec<(Vec<i64>, &String)> = ds.json.labels.iter().map(|(name, v)| (segk::dataset::values_of(v), name)).collect();
    labels.sort();
    let labels: Vec<String> = labels.iter().map(|(v, name)| format!("{name} {}", v.iter().map(i64::to_string).collect::<Vec<_>>().join("+"))).collect();
    println!("{}: {} cases, {} channel(s), labels {}: no problems", root.display(), ds.cases.len(), ds.json.channels(), labels.join(", "));
    Ok(())
}

/// The raw dataset a command names: a folder, else (as nnU-Net's commands take them) a dataset
/// ID (`900`, `Dataset900`) or name (`Dataset900_Synth`) under $nnUNet_raw.
fn dataset_folder(arg: &std::path::Path) -> Result<std::path::PathBuf> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let Some(raw) = std::env::var_os("nnUNet_raw").map(std::path::PathBuf::from) else {
        anyhow::bail!("{text}: no such dataset folder (set $nnUNet_raw to name datasets by ID or name, as nnU-Net does)");
    };
    let id = text.strip_prefix("Dataset").unwrap_or(&text);
    let found: Vec<std::path::PathBuf> = match id.parse::<u32>() {
        Ok(n) => {
            let prefix = format!("Dataset{n:03}_");
            std::fs::read_dir(&raw)
                .map_err(|e| anyhow::anyhow!("$nnUNet_raw ({}): {e}", raw.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_dir())
                .map(|e| e.path())
                .collect()
        }
        Err(_) => Some(raw.join(&*text)).filter(|p| p.is_dir()).into_iter().collect(),
    };
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("{text}: no such dataset folder, here or in $nnUNet_raw ({})", raw.display()),
        many => anyhow::bail!("{text}: several datasets in $nnUNet_raw match: {}", many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// The dataset folder as a full path, so that `.` or `..` still has a name and a parent.
/// Symbolic links stay as given (the link's name is the dataset's name, as for nnU-Net).
fn full_path(root: &std::path::Path) -> std::path::PathBuf {
    let abs = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    match root.file_name() {
        Some(_) => abs,
        None => std::fs::canonicalize(root).unwrap_or(abs),
    }
}

fn dataset_name(root: &std::path::Path) -> String {
    full_path(root).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dataset".into())
}

/// The folder that holds the dataset folder (where segk_preprocessed/ and segk_results/ go).
fn beside(root: &std::path::Path) -> std::path::PathBuf {
    let full = full_path(root);
    full.parent().unwrap_or(&full).to_path_buf()
}

/// Where derived files of a dataset go: $nnUNet_preprocessed/NAME as nnU-Net users expect,
/// else DATASET/../segk_preprocessed/NAME (the raw folder is never written to).
fn preprocessed_dir(root: &std::path::Path) -> std::path::PathBuf {
    match std::env::var_os("nnUNet_preprocessed") {
        Some(p) => std::path::PathBuf::from(p).join(dataset_name(root)),
        None => beside(root).join("segk_preprocessed").join(dataset_name(root)),
    }
}

use segk::store::write_json_atomic;

/// Fingerprint, nnU-Net's plans (ExperimentPlanner's always, `planner`'s too), and segk's plan
/// (plans.json, what preprocess and train use): nnU-Net's 3d_fullres, or with `gpu_memory`
/// segk's own sizing to that budget.
fn run_plan(root: &std::path::Path, gpu_memory: Option<f64>, out: Option<std::path::PathBuf>, planner: &str, target: Option<f64>) -> Result<()> {
    use segk::plan::{fingerprint, nnunet as nn, plans};
    if let Some(g) = gpu_memory {
        anyhow::ensure!(g > 0.0 && g <= 4096.0, "--gpu-memory must be a size in GiB, above 0 and at most 4096 (got {g})");
    }
    let chosen = nn::planner(planner)?;
    run_check(root)?;
    let ds = segk::dataset::Dataset::open(root)?;
    let name = dataset_name(root);
    let out = out.unwrap_or_else(|| preprocessed_dir(root));
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let t0 = std::time::Instant::now();
    let fp = fingerprint::fingerprint(&ds, fingerprint::FOREGROUND_SAMPLES)?;
    println!("fingerprint: {} in {:.1} s", segk::sysinfo::count(ds.cases.len(), "case"), t0.elapsed().as_secs_f64());
    write_json_atomic(&out.join(fingerprint::FILE), &fp)?;
    // nnU-Net's own fingerprint, where nnUNetv2_extract_fingerprint wrote one, is read as it is.
    let theirs = out.join("dataset_fingerprint.json");
    let (nfp, source) = match std::fs::read(&theirs) {
        Ok(b) => (serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: not nnU-Net's fingerprint: {e}", theirs.display()))?, "nnU-Net's dataset_fingerprint.json"),
        Err(_) => (nn::NnunetFingerprint::from_segk(&fp)?, "segk's fingerprint"),
    };
    let mut default = None;
    for p in [&nn::PLANNERS[0], chosen] {
        if p.class == nn::PLANNERS[0].class && default.is_some() {
            continue;
        }
        let doc = nn::plan_experiment(p, &name, &ds.json, &nfp, "SimpleITKIO", if std::ptr::eq(p, chosen) { target } else { None })?;
        let (path, written) = nn::write_plans(&out, &doc)?;
        println!("nnU-Net's plans ({}, from {source}):", p.class);
        for line in nn::describe(&doc, &ds.json) {
            println!("  {line}");
        }
        match written {
            nn::Written::New => println!("wrote {}", path.display()),
            nn::Written::Same => println!("{} is already this plan", path.display()),
            nn::Written::KeptDifferent => println!("{} exists with other contents (nnU-Net's or edited): kept as it is, and used; remove it to have segk write this plan", path.display()),
        }
        if default.is_none() {
            // What is on disk is what is used (nnU-Net's own file included).
            default = Some(serde_json::from_slice::<segk::plan::plans_json::PlansJson>(&std::fs::read(&path)?).map_err(|e| anyhow::anyhow!("{}: not an nnU-Net plans file: {e}", path.display()))?);
        }
    }
    let default = default.expect("ExperimentPlanner planned above");
    let plan = match gpu_memory {
        None => {
            let plan = plans::from_nnunet(&default, "3d_fullres", &ds.json).map_err(|e| e.context("segk trains nnUNetPlans' 3d_fullres (or, with --gpu-memory, a 3d_fullres plan of its own)"))?;
            println!("segk trains nnUNetPlans' 3d_fullres as planned{}", if chosen.class == nn::PLANNERS[0].class { "" } else { " (the other planner's networks are not trained by segk yet)" });
            plan
        }
        Some(g) => {
            let plan = plans::plan_3d_fullres(&ds.json, &fp, (g * plans::GIB) as usize)?;
            println!("--gpu-memory {g}: segk's own 3d_fullres plan, patch and batch sized to {g} GiB with segk's exact memory model -- a deviation from nnU-Net's plan above");
            plan
        }
    };
    let doc = plans::PlansFile {
        dataset_name: name,
        plans_name: if gpu_memory.is_some() { plans::SEGK_PLANS.to_string() } else { default.plans_name.clone() },
        configurations: plans::Configurations { fullres: plan.clone() },
        foreground_intensity_properties_per_channel: fp.foreground_intensity_properties_per_channel.clone(),
    };
    write_json_atomic(&out.join(plans::PlansFile::NAME), &doc)?;
    let t = &plan.topology;
    let triple = |v: &[usize; 3]| format!("{}x{}x{}", v[0], v[1], v[2]);
    let spacing: Vec<String> = plan.spacing.iter().map(|s| format!("{s:.3}")).collect();
    println!("3d_fullres: spacing {} mm (image axes in the order {:?}), patch {}, batch {}, {} stages, features {:?}", spacing.join(" x "), plan.transpose_forward, triple(&plan.patch_size), plan.batch_size, t.stages(), t.features);
    println!("  kernels {}", t.kernels.iter().map(triple).collect::<Vec<_>>().join(" "));
    println!("  strides {}", t.strides.iter().map(triple).collect::<Vec<_>>().join(" "));
    println!("  GPU memory: needs {:.2} GiB at checkpoint level {}{}", plan.gpu_memory_needed_bytes as f64 / plans::GIB, plan.checkpointing, gpu_memory.map(|g| format!(" of the {g:.2} GiB budget")).unwrap_or_default());
    println!("wrote {} (the plan segk preprocesses and trains with) and {}", out.join("plans.json").display(), fingerprint::FILE);
    Ok(())
}

fn run_preprocess(root: &std::path::Path, processes: Option<usize>, f16: bool, gpu_memory: Option<f64>, out: Option<std::path::PathBuf>) -> Result<()> {
    use segk::plan::plans::PlansFile;
    use segk::preprocess::{self, splits};
    let out = out.unwrap_or_else(|| preprocessed_dir(root));
    anyhow::ensure!(processes != Some(0), "--processes must be at least 1");
    if !out.join(PlansFile::NAME).is_file() {
        println!("no {} yet: planning first", out.join(PlansFile::NAME).display());
        run_plan(root, gpu_memory, Some(out.clone()), "ExperimentPlanner", None)?;
    }
    let plans = PlansFile::read(&out)?;
    let ds = segk::dataset::Dataset::open(root)?;
    anyhow::ensure!(!ds.cases.is_empty(), "{}: no training cases in labelsTr", root.display());
    let dtype = if f16 { segk::store::ImageDtype::F16 } else { segk::store::ImageDtype::F32 };
    let settings = preprocess::Settings::new(&ds.json, &plans, dtype)?;
    let (workers, source) = preprocess::worker_count(processes)?;
    let store = out.join(preprocess::STORE_DIR);
    println!("preprocessing {} into {} with {} (from {source}), images {}", segk::sysinfo::count(ds.cases.len(), "case"), store.display(), segk::sysinfo::count(workers, "worker"), format!("{dtype:?}").to_lowercase());
    let bar = indicatif::ProgressBar::new(ds.cases.len() as u64).with_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {elapsed_precise} elapsed, {eta} left  {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let s = preprocess::run(&ds, &settings, &store, workers, &bar);
    bar.finish_and_clear();
    let s = s?;
    std::fs::copy(root.join("dataset.json"), out.join("dataset.json")).map_err(|e| anyhow::anyhow!("copying dataset.json to {}: {e}", out.display()))?;
    let ids: Vec<String> = ds.cases.iter().map(|c| c.id.clone()).collect();
    let split = splits::load_or_create(&out, &ids);
    println!(
        "{} cases preprocessed, {} already done; {:.1} s, {:.1} Mvoxel/s in, {:.1} GB written",
        s.done,
        s.skipped,
        s.seconds,
        s.voxels_in as f64 / s.seconds.max(1e-9) / 1e6,
        s.bytes_written as f64 / 1e9
    );
    match split {
        Ok(sp) => println!("{}: {} folds", out.join(splits::FILE).display(), sp.len()),
        Err(e) => println!("no cross-validation split: {e:#}"),
    }
    Ok(())
}

struct Train {
    cfg: segk::train::TrainConfig,
    /// Validation after training, from this raw dataset.
    validate: Option<std::path::PathBuf>,
}

impl Job for Train {
    type Out = Vec<segk::train::EpochLog>;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        let logs = segk::train::run_on(be, &self.cfg)?;
        // A signal in the last epoch's tail (after its steps) lands here: the run is saved.
        anyhow::ensure!(
            !segk::train::STOP.load(std::sync::atomic::Ordering::Relaxed),
            "interrupted after the last epoch: checkpoint_final is saved; validation was skipped"
        );
        if let Some(root) = &self.validate {
            validate(be, &self.cfg, root)?;
        }
        Ok(logs)
    }
}

/// nnU-Net's validation after training: the fold's validation cases predicted from the raw
/// images with checkpoint_final (mirror TTA on) into OUT/validation, scored into summary.json.
fn validate<B: Backend>(be: &B, cfg: &segk::train::TrainConfig, root: &std::path::Path) -> Result<()> {
    let model_dir = cfg.out.parent().unwrap_or(&cfg.out);
    let model = segk::predict::Model {
        plans: segk::plan::plans::PlansFile::read(model_dir)?,
        json: segk::dataset::read_json(model_dir)?,
        checkpoints: vec![(cfg.out.clone(), "checkpoint_final".to_string())],
    };
    let ending = model.json.file_ending.clone();
    let cases: Vec<(String, Vec<std::path::PathBuf>)> =
        cfg.val_ids.iter().map(|id| (id.clone(), (0..model.json.channels()).map(|c| segk::dataset::image_path(&root.join("imagesTr"), id, c, &ending)).collect())).collect();
    let out = cfg.out.join("validation");
    let t0 = std::time::Instant::now();
    println!("validation: predicting {} with checkpoint_final and mirror TTA into {}", segk::sysinfo::count(cases.len(), "case"), out.display());
    let bar = cases_bar();
    let predicted = segk::predict::predict_cases(be, &model, &cases, &out, segk::predict::PredictOptions { step: 0.5, tta: true, save_probabilities: false }, &bar);
    bar.finish_and_clear();
    let (files, _) = predicted?;
    let pairs: Vec<_> = files.iter().zip(&cfg.val_ids).map(|(p, id)| (p.clone(), root.join("labelsTr").join(format!("{id}{ending}")))).collect();
    let s = segk::evaluate::evaluate_pairs(&pairs, None)?;
    write_json_atomic(&out.join("summary.json"), &s)?;
    print!("{}", segk::evaluate::table(&s));
    println!("validation: {} in {:.1} s; wrote {}", segk::sysinfo::count(files.len(), "case"), t0.elapsed().as_secs_f64(), out.join("summary.json").display());
    Ok(())
}

struct TrainOpts {
    epochs: usize,
    iters_per_epoch: usize,
    val_iters: usize,
    checkpointing: String,
    save_every: usize,
    resume: bool,
    validation: bool,
    workers: Option<usize>,
    seed: u64,
}

/// Ctrl-C or `kill` (SIGINT, SIGTERM): inside the training loop, save checkpoint_latest and
/// stop at the next step; anywhere else (planning, preprocessing, validation), or at a second
/// signal, stop at once, as without the handler.
#[cfg(unix)]
fn stop_on_signals() {
    extern "C" fn on_signal(signum: i32) {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY (both blocks): write and _exit are async-signal-safe.
        if segk::train::STEPPING.load(Relaxed) && !segk::train::STOP.swap(true, Relaxed) {
            const SAVING: &[u8] = b"\nsegk: stopping: checkpoint_latest is saved at the next step (a second Ctrl-C quits without saving)\n";
            unsafe { write(2, SAVING.as_ptr(), SAVING.len()) };
            return;
        }
        const MSG: &[u8] = b"\nsegk: interrupted\n";
        unsafe {
            write(2, MSG.as_ptr(), MSG.len());
            _exit(128 + signum);
        }
    }
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
        fn write(fd: i32, buf: *const u8, count: usize) -> isize;
        fn _exit(status: i32) -> !;
    }
    // SAFETY: the handler only touches atomics and calls async-signal-safe functions.
    unsafe {
        signal(2, on_signal as extern "C" fn(i32) as usize);
        signal(15, on_signal as extern "C" fn(i32) as usize);
    }
}

#[allow(clippy::too_many_arguments)]
fn run_train(root: &std::path::Path, configuration: &str, fold: &str, plans_name: Option<&str>, device: &str, o: TrainOpts, preprocessed: Option<std::path::PathBuf>, out: Option<std::path::PathBuf>) -> Result<()> {
    use segk::preprocess::{splits, STORE_DIR};
    let TrainOpts { epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, validation, workers, seed } = o;
    anyhow::ensure!(
        configuration == "3d_fullres",
        "configuration {configuration:?}: segk trains 3d_fullres so far (`segk plan` writes nnU-Net's 2d, 3d_lowres and 3d_cascade_fullres too; training them comes with nnU-Net's other configurations)"
    );
    let fold: splits::Fold = fold.parse()?;
    let checkpointing = match checkpointing.as_str() {
        "auto" => None,
        l => Some(segk::model::Checkpointing::from_level(l.parse().map_err(|_| anyhow::anyhow!("--checkpointing must be auto, 0, 1 or 2"))?)?),
    };
    #[cfg(unix)]
    stop_on_signals();
    anyhow::ensure!(epochs > 0 && iters_per_epoch > 0 && val_iters > 0, "--epochs, --iters-per-epoch and --val-iters must be at least 1");
    anyhow::ensure!(workers != Some(0), "--workers must be at least 1");
    if device != "auto" {
        segk::device::parse(device)?;
    }
    let pre = preprocessed.unwrap_or_else(|| preprocessed_dir(root));
    let ds = segk::dataset::Dataset::open(root)?;
    let ids: Vec<String> = ds.cases.iter().map(|c| c.id.clone()).collect();
    let store = pre.join(STORE_DIR);
    if !pre.join(segk::plan::plans::PlansFile::NAME).is_file() {
        println!("no plans in {}: planning and preprocessing first", pre.display());
        run_preprocess(root, None, false, None, Some(pre.clone()))?;
    }
    let plans = segk::plan::plans::PlansFile::read(&pre)?;
    if let Some(p) = plans_name.filter(|p| *p != plans.plans_name) {
        anyhow::bail!("-p {p}: {} holds the plan of {} (`segk plan` makes nnUNetPlans' 3d_fullres, `segk plan --gpu-memory GB` segkPlans)", pre.join(segk::plan::plans::PlansFile::NAME).display(), plans.plans_name);
    }
    let (stale, dtype) = segk::preprocess::stale_cases(&store, &ids, &ds.json, &plans)?;
    if !stale.is_empty() {
        println!("the store at {} is missing {} of {} cases or holds them under other settings: preprocessing first", store.display(), stale.len(), ids.len());
        run_preprocess(root, None, dtype == segk::store::ImageDtype::F16, None, Some(pre.clone()))?;
    }
    // `all` needs no split (and works with fewer cases than folds).
    let folds = if fold == splits::Fold::All { Vec::new() } else { splits::load_or_create(&pre, &ids)? };
    let split = splits::select(&folds, &ids, fold)?;
    let fold_name = match fold {
        splits::Fold::All => "all".to_string(),
        splits::Fold::Index(k) => k.to_string(),
    };
    let out = out.unwrap_or_else(|| match std::env::var_os("nnUNet_results") {
        Some(r) => std::path::PathBuf::from(r).join(dataset_name(root)).join(model_folder_name(&plans.plans_name, configuration)).join(format!("fold_{fold_name}")),
        None => beside(root).join("segk_results").join(dataset_name(root)).join(model_folder_name(&plans.plans_name, configuration)).join(format!("fold_{fold_name}")),
    });
    if !resume {
        refuse_to_replace_a_run(&out)?;
    }
    // The model folder (the fold's parent) carries what prediction needs.
    let model_dir = out.parent().unwrap_or(&out).to_path_buf();
    refuse_another_plan(&model_dir, &plans)?;
    std::fs::create_dir_all(&model_dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", model_dir.display()))?;
    write_json_atomic(&model_dir.join(segk::plan::plans::PlansFile::NAME), &plans)?;
    std::fs::copy(root.join("dataset.json"), model_dir.join("dataset.json")).map_err(|e| anyhow::anyhow!("copying dataset.json to {}: {e}", model_dir.display()))?;
    let plan = plans.configurations.fullres;
    println!(
        "training 3d_fullres fold {fold_name}: patch {:?}, batch {}, {} epochs x {} iterations, output {}",
        plan.patch_size,
        plan.batch_size,
        epochs,
        iters_per_epoch,
        out.display()
    );
    let cfg = segk::train::TrainConfig {
        store,
        plan,
        train_ids: split.train,
        val_ids: split.val,
        out,
        epochs,
        iters_per_epoch,
        val_iters,
        checkpointing,
        workers,
        seed,
        lr: segk::train::INITIAL_LR,
        save_every,
        resume,
    };
    let validate = validation.then(|| root.to_path_buf());
    let logs = segk::device::run_on(device, Train { cfg, validate })?;
    if let Some(last) = logs.last() {
        println!("done: {} epochs run, final EMA pseudo-Dice {:.4}", logs.len(), last.ema_dice);
    }
    Ok(())
}

/// nnU-Net's TRAINER__PLANS__CONFIGURATION, with segk's trainer name: beside nnU-Net's own
/// nnUNetTrainer__... folders, never taken for one.
fn model_folder_name(plans: &str, configuration: &str) -> String {
    format!("segkTrainer__{plans}__{configuration}")
}

/// A fold folder that holds checkpoints is a run: starting again there without --resume would
/// replace them.
fn refuse_to_replace_a_run(out: &std::path::Path) -> Result<()> {
    use segk::checkpoint;
    for name in ["checkpoint_latest", "checkpoint_final", "checkpoint_best"] {
        if checkpoint::exists(out, name) {
            let at = checkpoint::read_state(out, name).map(|st| format!(" at epoch {}", st.epoch)).unwrap_or_default();
            anyhow::bail!("{} already holds a training run ({name}{at}): continue it with --resume, or start over in another --out (or delete that folder)", out.display());
        }
    }
    Ok(())
}

/// The model folder's plans.json is the one every fold in it was trained with: a fold of
/// another plan there would leave the others unloadable.
fn refuse_another_plan(model_dir: &std::path::Path, plans: &segk::plan::plans::PlansFile) -> Result<()> {
    let path = model_dir.join(segk::plan::plans::PlansFile::NAME);
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(()) };
    let Ok(there) = serde_json::from_str::<serde_json::Value>(&text) else {
        anyhow::bail!("{}: unreadable (not JSON); it should be the plan this model folder's folds were trained with", path.display())
    };
    let same = there == serde_json::to_value(plans)?;
    anyhow::ensure!(
        same,
        "{} holds another plan than this training's (the folds trained with it would no longer load): train into another model folder (--out OTHER/fold_N), or delete that one",
        path.display()
    );
    Ok(())
}

/// Progress over cases (drawn on a terminal only).
fn cases_bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {elapsed_precise}  {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()))
}

struct Predict {
    model: segk::predict::Model,
    input: std::path::PathBuf,
    output: std::path::PathBuf,
    opt: segk::predict::PredictOptions,
}

impl Job for Predict {
    type Out = (Vec<std::path::PathBuf>, u64);
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        let bar = cases_bar();
        let r = segk::predict::predict_folder(be, &self.model, &self.input, &self.output, self.opt, &bar);
        bar.finish_and_clear();
        r
    }
}

fn run_predict(input: &std::path::Path, output: &std::path::Path, model: &std::path::Path, folds: Option<Vec<String>>, checkpoint: &str, opt: segk::predict::PredictOptions, device: &str) -> Result<()> {
    anyhow::ensure!(opt.step > 0.0 && opt.step <= 1.0, "--step must be in (0, 1]");
    // Predictions written into the input folder would be read as images by the next run.
    let same = |a: &std::path::Path, b: &std::path::Path| matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    anyhow::ensure!(!same(input, output), "-o {} is the input folder: write the predictions elsewhere", output.display());
    // nnU-Net names its checkpoints NAME.pth.
    let checkpoint = checkpoint.strip_suffix(".pth").unwrap_or(checkpoint);
    let m = segk::predict::Model::open(model, folds.as_deref(), checkpoint)?;
    let on = |b: bool| if b { "on" } else { "off" };
    let names: Vec<String> = m.checkpoints.iter().filter_map(|(d, _)| d.file_name().map(|n| n.to_string_lossy().to_string())).collect();
    println!("predicting {} with {} ({checkpoint}), step {}, mirror TTA {}, probabilities {}", input.display(), names.join(", "), opt.step, on(opt.tta), on(opt.save_probabilities));
    let unread = segk::predict::unread_files(input, m.json.channels(), &m.json.file_ending);
    if !unread.is_empty() {
        println!("  not read: {}", unread.join(", "));
    }
    let t0 = std::time::Instant::now();
    let job = Predict { model: m, input: input.to_path_buf(), output: output.to_path_buf(), opt };
    let (files, bound) = segk::device::run_on(device, job)?;
    let mapped = if opt.save_probabilities { "; RSS includes the mapped probability files" } else { "" };
    let peak = segk::sysinfo::peak_rss().map(|b| format!(", peak RSS {:.0} MiB (bound {:.0} MiB{mapped})", b as f64 / (1 << 20) as f64, bound as f64 / (1 << 20) as f64)).unwrap_or_default();
    println!("wrote {} to {} in {:.1} s{peak}", segk::sysinfo::count(files.len(), "label map"), output.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_evaluate(pred: &std::path::Path, gt: &std::path::Path, labels: Option<Vec<i64>>, out: Option<std::path::PathBuf>) -> Result<()> {
    for dir in [pred, gt] {
        anyhow::ensure!(dir.is_dir(), "{}: no such folder", dir.display());
    }
    let out = out.unwrap_or_else(|| pred.join("summary.json"));
    segk::store::prepare_output_file(&out)?;
    let s = segk::evaluate::evaluate(pred, gt, labels)?;
    write_json_atomic(&out, &s)?;
    print!("{}", segk::evaluate::table(&s));
    println!("{}; wrote {}", segk::sysinfo::count(s.metric_per_case.len(), "case"), out.display());
    Ok(())
}

fn run_doctor() -> Result<()> {
    use segk::sysinfo::*;
    println!("segk {}", LONG_VERSION.replace('\n', "; "));
    let quota = cgroup_cpu_quota().map(|q| format!(", cgroup quota {q:.1}")).unwrap_or_default();
    println!("CPUs: {} online, {} usable by this process{quota}", online_cpus(), usable_cpus());
    match (host_memory_total(), host_memory_available()) {
        (Some(t), Some(a)) => println!("memory: {:.1} GiB total, {:.1} GiB available to this process (cgroup limit included)", gib(t), gib(a)),
        _ => println!("memory: unknown (/proc/meminfo unreadable)"),
    }
    match dev_shm_bytes() {
        Some(b) => println!("/dev/shm: {:.1} GiB (segk's workers are threads: it needs none, so no --ipc=host)", gib(b)),
        None => println!("/dev/shm: not found (segk does not need it)"),
    }
    match segk::backend::cuda::unavailable_reason() {
        Some(why) if !segk::backend::cuda::KERNELS_EMBEDDED => println!("CUDA: {why}"),
        _ => match segk::backend::cuda::gpus() {
            Ok(list) => {
                for g in list {
                    println!("GPU cuda:{}: {}, sm_{}{}, {:.1} GiB free of {:.1} GiB", g.ordinal, g.name, g.compute_capability.0, g.compute_capability.1, gib(g.free_bytes), gib(g.total_bytes));
                }
            }
            Err(why) => println!("CUDA: {why}"),
        },
    }
    if let Some(lib) = segk::backend::cuda::driver_library() {
        println!("NVIDIA driver: {lib}, CUDA {}", segk::backend::cuda::driver_cuda_version().unwrap_or_else(|| "?".into()));
    }
    let (p, ps) = segk::preprocess::worker_count(None)?;
    let (w, ws) = segk::loader::worker_count(None)?;
    println!("would use: {p} preprocessing workers (from {ps}), {w} augmentation workers (from {ws})");
    Ok(())
}

fn run_synth(root: &std::path::Path, spec: segk::synth::RawSpec) -> Result<()> {
    anyhow::ensure!(spec.cases > 0 && spec.shape.iter().all(|&s| s >= 8), "need at least one case of at least 8 voxels per axis");
    let t0 = std::time::Instant::now();
    segk::synth::write_raw_dataset(root, &spec)?;
    println!("wrote {} cases of {:?} to {} in {:.1} s", spec.cases, spec.shape, root.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

fn run_fingerprint(root: &std::path::Path, out: Option<std::path::PathBuf>) -> Result<()> {
    run_check(root)?;
    let ds = segk::dataset::Dataset::open(root)?;
    let out = out.unwrap_or_else(|| preprocessed_dir(root).join(segk::plan::fingerprint::FILE));
    segk::store::prepare_output_file(&out)?;
    let t0 = std::time::Instant::now();
    let fp = segk::plan::fingerprint::fingerprint(&ds, segk::plan::fingerprint::FOREGROUND_SAMPLES)?;
    write_json_atomic(&out, &fp)?;
    for (c, s) in fp.foreground_intensity_properties_per_channel.iter().enumerate() {
        println!("channel {c}: foreground mean {:.3} std {:.3} p0.5 {:.3} p99.5 {:.3}", s.mean, s.std, s.percentile_00_5, s.percentile_99_5);
    }
    println!("wrote {} ({} cases, {:.1} s)", out.display(), fp.spacings.len(), t0.elapsed().as_secs_f64());
    Ok(())
}

struct Demo(DemoConfig);

impl Job for Demo {
    type Out = demo::DemoReport;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        demo::run_on(be, &self.0)
    }
}

fn run_demo(epochs: usize, iters: usize, seed: u64, device: &str) -> Result<()> {
    let cfg = DemoConfig { epochs, iters_per_epoch: iters, seed, ..DemoConfig::default() };
    println!(
        "segk demo: {} training + {} held-out synthetic cases of {:?}, patch {:?}, batch {}, features {:?}, {} threads",
        cfg.train_cases, cfg.test_cases, cfg.size, cfg.patch, cfg.batch, cfg.features, rayon::current_num_threads()
    );
    let t0 = std::time::Instant::now();
    let r = segk::device::run_on(device, Demo(cfg))?;
    println!("trained {} steps in {:.1} s (waiting for data {:.1} % of it); mean loss first epoch {:.4}, last epoch {:.4}", r.steps, r.train_secs, r.data_wait * 100.0, r.first_epoch_loss, r.last_epoch_loss);
    println!("held-out Dice per label:");
    for (k, d) in r.dice.iter().enumerate() {
        println!("  {:>2} {:<10} {:.4}", k + 1, LABEL_NAMES[k + 1], d);
    }
    println!("mean foreground Dice {:.4}  (total {:.1} s)", r.mean_dice, t0.elapsed().as_secs_f64());
    Ok(())
}
