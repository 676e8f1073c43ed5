//! The `segk` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};
use segk::demo;
use segk::selftest;
use segk::experiment::*;

const LONG_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("SEGK_GIT_COMMIT"), ")\nCUDA kernels: ", env!("SEGK_KERNEL_INFO"), "\nkernel emulator: ", env!("SEGK_EMU_INFO"));

#[derive(Parser)]
#[command(name = "segk", version, long_version = LONG_VERSION, about = "Train and run nnU-Net-style 3D U-Nets: one binary, CPU or CUDA")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
    /// Compute threads (default: SEGK_THREADS, else OMP_NUM_THREADS, else every CPU this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
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
    /// Integrity check, fingerprint, and nnU-Net's plans (nnUNetPlans.json: 2d, 3d_fullres,
    /// 3d_lowres, 3d_cascade_fullres) with what each needs with segk; with --gpu-memory also
    /// segkPlans.json, segk's own sizing of 3d_fullres.
    Plan {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// nnU-Net's planner (-pl): ExperimentPlanner, nnUNetPlannerResEncM, nnUNetPlannerResEncL, nnUNetPlannerResEncXL.
        #[arg(long = "pl", visible_alias = "planner", default_value = "ExperimentPlanner")]
        planner: String,
        /// nnU-Net's -gpu_memory_target in GB (default: the planner's own, 8/8/24/40).
        #[arg(long)]
        gpu_memory_target: Option<f64>,
        /// Also write segkPlans.json: nnU-Net's 3d_fullres with patch and batch sized to this many GiB by segk's exact memory model (train it with -p segkPlans).
        #[arg(long)]
        gpu_memory: Option<f64>,
        /// Output folder (default: $nnUNet_preprocessed/NAME, else DATASET/../segk_preprocessed/NAME).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Preprocess configurations of a plans file into segk's stores (plans first when the plans file is missing).
    Preprocess {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// The plans file's name (nnU-Net's -plans_name).
        #[arg(short = 'p', long = "plans", default_value = "nnUNetPlans")]
        plans: String,
        /// Configurations to preprocess (nnU-Net's -c); those the plans lack are skipped.
        #[arg(short = 'c', long = "configurations", num_args = 1.., default_values_t = DEFAULT_CONFIGURATIONS.map(String::from))]
        configurations: Vec<String>,
        /// Cases processed at once (default: SEGK_PROCESSES, else nnUNet_def_n_proc, else every
        /// usable CPU, as many as the host memory holds).
        #[arg(long)]
        processes: Option<usize>,
        /// Store images as f16 (half the disk and page cache; default f32 as nnU-Net).
        #[arg(long)]
        f16: bool,
        /// Preprocessed folder (default: as `segk plan`).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Train 2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres on a fold (preprocessing first when the store is incomplete).
    Train {
        /// The DatasetXXX_Name folder, or its ID (900) or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// CONFIGURATION FOLD, as nnU-Net's: 2d, 3d_fullres, 3d_lowres or 3d_cascade_fullres, then
        /// 0-4 or `all`. The older form `segk train DATASET FOLD` means 3d_fullres.
        #[arg(num_args = 1..=2, value_names = ["CONFIGURATION", "FOLD"], required = true)]
        configuration_fold: Vec<String>,
        /// The plans file's name (-p): nnUNetPlans (the default), segkPlans (`segk plan
        /// --gpu-memory`), or a plans file of your own in the preprocessed folder.
        #[arg(short = 'p', long = "plans")]
        plans: Option<String>,
        /// auto (GPU 0 if usable, else CPU), cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Train on several GPUs of this node, one process each (cuda:0,cuda:1 or cuda:0-3): the
        /// batch is split over them, gradients summed with NCCL (nnU-Net's -num_gpus). Runs
        /// across nodes start one process per GPU with srun, mpirun or torchrun-style variables
        /// instead (README, "Several GPUs").
        #[arg(long, conflicts_with = "device")]
        devices: Option<String>,
        /// nnU-Net's -num_gpus: GPUs 0..N-1 of this node, as --devices cuda:0-(N-1) (1: one process).
        #[arg(long, alias = "num_gpus", conflicts_with_all = ["device", "devices"])]
        num_gpus: Option<usize>,
        /// What the convolutions multiply: auto (bf16 on a GPU; f32 on a CPU), f32 (CPU only), or
        /// bf16 (on a CPU with AVX512-BF16: bf16 operands, f32 sums, f32 weights, norms, loss and
        /// optimizer, as on a GPU). segk's own flag; nnU-Net trains in fp16/bf16 autocast on GPUs.
        #[arg(long, value_enum, default_value = "auto")]
        precision: segk::device::Precision,
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
        /// Continue from checkpoint_latest in the output folder (nnU-Net's --c).
        #[arg(long, alias = "c")]
        resume: bool,
        /// Fine-tune: start from these weights, every one but the segmentation heads (an
        /// nnU-Net checkpoint .pth or a segk .safetensors; nnU-Net's -pretrained_weights).
        #[arg(long, alias = "pretrained_weights", conflicts_with = "resume")]
        pretrained_weights: Option<std::path::PathBuf>,
        /// Skip predicting the validation cases after training.
        #[arg(long)]
        no_validation: bool,
        /// Validation also writes the probabilities (CASE.npz), for ensembling in
        /// find-best-configuration (nnU-Net's --npz).
        #[arg(long)]
        npz: bool,
        /// Augmentation workers (default: SEGK_WORKERS, else nnUNet_n_proc_DA, else segk's
        /// choice, adapted each epoch to what the step needs; see `segk doctor`).
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
    /// Predict a folder of raw images (CASE_XXXX<ending>: NIfTI, MetaImage, NRRD, PNG or TIFF) with a trained model, written in the model's format.
    Predict {
        /// Input folder (imagesTs naming).
        #[arg(short = 'i', long)]
        input: std::path::PathBuf,
        /// Output folder for the label maps.
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
        /// Model folder (plans.json, dataset.json, fold_F/ with checkpoints), as `segk train` writes
        /// it; or, as nnU-Net's, -d DATASET -c CONFIGURATION [-p PLANS] [-tr TRAINER].
        #[arg(short = 'm', long, required_unless_present = "dataset", conflicts_with = "dataset")]
        model: Option<std::path::PathBuf>,
        /// The dataset (ID or name) whose model folder under $nnUNet_results to use.
        #[arg(short = 'd', long, requires = "configuration")]
        dataset: Option<String>,
        /// With -d: the configuration (3d_fullres).
        #[arg(short = 'c', long, requires = "dataset")]
        configuration: Option<String>,
        /// With -d: the plans (nnUNetPlans, or segkPlans).
        #[arg(short = 'p', long, default_value = "nnUNetPlans")]
        plans: String,
        /// With -d: the trainer part of the model folder's name.
        #[arg(long = "tr", default_value = "segkTrainer")]
        trainer: String,
        /// Folds to average (-f; default: every fold_* folder).
        #[arg(short = 'f', long, num_args = 1..)]
        folds: Option<Vec<String>>,
        /// Which checkpoint of each fold (-chk).
        #[arg(long, default_value = "checkpoint_final")]
        checkpoint: String,
        /// Tile step as a fraction of the patch (nnU-Net's --step_size).
        #[arg(long, alias = "step_size", default_value_t = 0.5)]
        step: f64,
        /// No mirror test-time augmentation (8x faster; nnU-Net's --disable_tta).
        #[arg(long, alias = "disable_tta")]
        no_tta: bool,
        /// Also write CASE.npz with the class probabilities on the input's grid (nnU-Net's
        /// `probabilities` array: float32, classes x z x y x; needs that much disk, not RAM).
        #[arg(long, alias = "save_probabilities")]
        save_probabilities: bool,
        /// auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto")]
        device: String,
        /// Predict on several GPUs of this node (cuda:0,cuda:1 or cuda:0-3): one process per GPU,
        /// each taking every N-th case (as --num-parts N --part-id K would).
        #[arg(long, conflicts_with_all = ["device", "num_parts", "part_id"])]
        devices: Option<String>,
        /// What the convolutions multiply: auto (bf16 on a GPU and on a CPU with AVX512-BF16,
        /// labels equal to f32's on >= 99.9 % of voxels in segk's tests; else f32), f32 (CPU
        /// only) or bf16. segk's own flag.
        #[arg(long, value_enum, default_value = "auto")]
        precision: segk::device::Precision,
        /// Split the cases over this many jobs (nnU-Net's -num_parts): each takes every
        /// N-th case of the sorted list, from its --part-id.
        #[arg(long, alias = "num_parts", default_value_t = 1)]
        num_parts: usize,
        /// Which of the --num-parts jobs this is, 0-based (nnU-Net's -part_id).
        #[arg(long, alias = "part_id", default_value_t = 0)]
        part_id: usize,
        /// Skip cases whose label map (and probabilities, when asked) is already in the output
        /// folder (nnU-Net's --continue_prediction); label maps are renamed into place only when
        /// complete, so one there is whole.
        #[arg(long = "continue", alias = "continue_prediction")]
        continue_prediction: bool,
        /// For 3d_cascade_fullres: the folder of the previous stage's (3d_lowres) label maps of
        /// these cases, named as the images' cases (nnU-Net's -prev_stage_predictions).
        #[arg(long, alias = "prev_stage_predictions")]
        prev_stage_predictions: Option<std::path::PathBuf>,
    },
    /// Average the probabilities of several prediction folders (nnU-Net's nnUNetv2_ensemble):
    /// label maps, and with --save-probabilities the averaged CASE.npz.
    Ensemble {
        /// Prediction folders made with --save-probabilities, holding the same cases.
        #[arg(short = 'i', long, num_args = 2.., required = true)]
        input: Vec<std::path::PathBuf>,
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
        /// Also write the averaged probabilities (nnU-Net's --save_npz).
        #[arg(long, alias = "save_npz")]
        save_probabilities: bool,
        /// The dataset.json giving labels and file ending (default: the first folder's).
        #[arg(long)]
        dataset_json: Option<std::path::PathBuf>,
    },
    /// nnU-Net's postprocessing decision on cross-validation predictions: keep the largest
    /// foreground component, then each label's, where it raises the Dice; writes
    /// PRED/postprocessing.json and the postprocessed maps into PRED/postprocessed.
    DeterminePostprocessing {
        /// Prediction folder (e.g. a fold's validation folder, or all folds' merged).
        #[arg(short = 'i', long)]
        input: std::path::PathBuf,
        /// Reference label maps (labelsTr).
        #[arg(long = "ref")]
        reference: std::path::PathBuf,
        /// The dataset.json (default: the prediction folder's, else the references' parent's).
        #[arg(long)]
        dataset_json: Option<std::path::PathBuf>,
    },
    /// Apply a postprocessing.json (nnU-Net's format) to a folder of label maps.
    Postprocess {
        #[arg(short = 'i', long)]
        input: std::path::PathBuf,
        #[arg(short = 'o', long)]
        output: std::path::PathBuf,
        /// The postprocessing.json written by determine-postprocessing (or nnU-Net's).
        #[arg(long)]
        pp_json: std::path::PathBuf,
        /// The dataset.json giving the file ending (default: the input folder's).
        #[arg(long)]
        dataset_json: Option<std::path::PathBuf>,
    },
    /// nnU-Net's model selection: score each configuration's cross-validation predictions and
    /// every pair's ensemble, determine the best one's postprocessing, and write
    /// inference_information.json and inference_instructions.txt.
    FindBestConfiguration {
        /// The DatasetXXX_Name folder, or its ID or name under $nnUNet_raw.
        dataset: std::path::PathBuf,
        /// Configurations to compare (each trained on every fold of -f).
        #[arg(short = 'c', long, num_args = 1.., default_values_t = ["3d_fullres".to_string()])]
        configurations: Vec<String>,
        #[arg(short = 'p', long, default_value = "nnUNetPlans")]
        plans: String,
        #[arg(long = "tr", default_value = "segkTrainer")]
        trainer: String,
        #[arg(short = 'f', long, num_args = 1.., default_values_t = ["0".to_string(), "1".to_string(), "2".to_string(), "3".to_string(), "4".to_string()])]
        folds: Vec<String>,
        /// Compare single configurations only.
        #[arg(long, alias = "disable_ensembling")]
        disable_ensembling: bool,
    },
    /// Dice, IoU and counts per label and case of predictions against references (summary.json).
    /// The prediction folder comes first: the reverse of nnUNetv2_evaluate_folder GT PRED.
    Evaluate {
        /// Folder of predicted label maps (.nii/.nii.gz).
        pred: std::path::PathBuf,
        /// Folder of reference label maps with the same file names.
        gt: std::path::PathBuf,
        /// Labels to score: `1,2` or, as nnU-Net's -l, `1 2` (default: the dataset.json's, else every nonzero label in the references).
        #[arg(long, value_delimiter = ',', num_args = 1..)]
        labels: Option<Vec<i64>>,
        /// The ignore label (nnU-Net's -il): voxels with it in the reference are not scored (default: the dataset.json's).
        #[arg(long)]
        ignore_label: Option<i64>,
        /// A dataset.json giving the labels and the ignore label (nnU-Net's -djfile).
        #[arg(long)]
        dataset_json: Option<std::path::PathBuf>,
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
        /// With --device cpu: bf16 checks the CPU's bf16 convolutions (AVX512-BF16).
        #[arg(long, value_enum, default_value = "auto")]
        precision: segk::device::Precision,
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
    /// Time training steps of a U-Net on random data (a PlainConvUNet, or with --blocks a ResidualEncoderUNet).
    Step(segk::bench_step::StepArgs),
    /// Time each op family alone on the layer shapes of a net: TFLOP/s for convs, GB/s for the rest.
    Kernels(segk::bench_kernels::KernelArgs),
    /// Batches per second of the augmentation pool at several worker counts (generated data).
    Loader(segk::bench_loader::LoaderArgs),
}

/// This process's own arguments (nnU-Net's flags in their long spelling).
fn own_args() -> Vec<String> {
    std::env::args().skip(1).map(nnunet_flag).collect()
}

/// `segk train ... --devices LIST`: one rank per GPU on this node, met at a free local port.
fn train_on_devices(list: &str) -> anyhow::Result<()> {
    let devices = segk::dist::spawn::parse_devices(list)?;
    let (args, port, n) = (segk::dist::spawn::strip_device_flags(&own_args()), segk::dist::spawn::free_port()?, devices.len());
    let argv = |_: usize, d: usize| args.iter().cloned().chain(["--device".to_string(), format!("cuda:{d}")]).collect();
    let env = |k: usize| {
        [("WORLD_SIZE", n.to_string()), ("RANK", k.to_string()), ("LOCAL_RANK", k.to_string()), ("LOCAL_WORLD_SIZE", n.to_string()), ("MASTER_ADDR", "127.0.0.1".to_string()), ("MASTER_PORT", port.to_string()), ("SEGK_GROUP", "1".to_string())]
            .map(|(a, b)| (a.to_string(), b))
            .to_vec()
    };
    segk::dist::spawn::run("training", &devices, argv, env)
}

/// `segk predict ... --devices LIST`: one process per GPU, each a part of the cases.
fn predict_on_devices(list: &str) -> anyhow::Result<()> {
    let devices = segk::dist::spawn::parse_devices(list)?;
    let (args, n) = (segk::dist::spawn::strip_device_flags(&own_args()), devices.len());
    let argv = |k: usize, d: usize| args.iter().cloned().chain(["--device".to_string(), format!("cuda:{d}"), "--num-parts".into(), n.to_string(), "--part-id".into(), k.to_string()]).collect();
    segk::dist::spawn::run("prediction", &devices, argv, |_| Vec::new())
}

fn parse_triple<T: std::str::FromStr>(s: &str) -> Result<[T; 3], String> {
    let v: Vec<T> = s.split(',').map(|p| p.trim().parse::<T>().map_err(|_| format!("{p:?} is not a number"))).collect::<Result<_, _>>()?;
    v.try_into().map_err(|_| format!("expected three comma-separated values (z,y,x), got {s:?}"))
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
        "-chk" => "--checkpoint".into(),
        "-step_size" => "--step".into(),
        "-device" => "--device".into(),
        "-num_gpus" => "--num-gpus".into(),
        "-tr" => "--tr".into(),
        "-plans_name" => "--plans".into(),
        "-np" => "--processes".into(),
        "-il" => "--ignore-label".into(),
        "-num_parts" => "--num-parts".into(),
        "-ref" => "--ref".into(),
        "-pp_json" => "--pp-json".into(),
        "-pretrained_weights" => "--pretrained-weights".into(),
        "-part_id" => "--part-id".into(),
        "-djfile" => "--dataset-json".into(),
        _ => arg,
    }
}

fn main() {
    #[cfg(unix)]
    default_sigpipe();
    let cli = Cli::parse_from(std::env::args().map(nnunet_flag));
    if let Err(e) = segk::threads::init_global(cli.threads) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    let r = match cli.cmd {
        Cmd::Demo { epochs, iters, seed, device } => demo::command(epochs, iters, seed, &device),
        Cmd::Selftest { device, precision, seed, only } => selftest::command(&device, precision, seed, only.as_deref()),
        Cmd::Check { dataset } => Experiment::new(&dataset).and_then(|e| e.dataset().map(|_| ())),
        Cmd::Fingerprint { dataset, out } => Experiment::new(&dataset).and_then(|e| run_fingerprint(&e, out)),
        Cmd::Plan { dataset, planner, gpu_memory_target, gpu_memory, out } => Experiment::new(&dataset).and_then(|e| run_plan(&e, gpu_memory, out, &planner, gpu_memory_target)),
        Cmd::Preprocess { dataset, plans, configurations, processes, f16, out } => Experiment::new(&dataset).and_then(|e| run_preprocess(&e, processes, f16, &plans, &configurations, out)),
        Cmd::Train { devices: Some(d), .. } => train_on_devices(&d),
        Cmd::Train { num_gpus: Some(0), .. } => Err(anyhow::anyhow!("-num_gpus must be at least 1")),
        Cmd::Train { num_gpus: Some(n), .. } if n > 1 => train_on_devices(&format!("cuda:0-{}", n - 1)),
        Cmd::Predict { devices: Some(d), .. } => predict_on_devices(&d),
        Cmd::Train { dataset, configuration_fold, plans, device, devices: None, num_gpus: _, precision, epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, pretrained_weights, no_validation, npz, workers, seed, preprocessed, out } => {
            let o = TrainOpts { epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, pretrained: pretrained_weights, validation: !no_validation, npz, workers, seed, precision };
            let (configuration, fold) = match configuration_fold.as_slice() {
                [c] if ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"].contains(&c.as_str()) => {
                    eprintln!("error: segk train DATASET {c} FOLD: the fold is missing (0-4 or all)");
                    std::process::exit(2);
                }
                [fold] => {
                    eprintln!("note: `segk train DATASET {fold}` is the older form of `segk train DATASET 3d_fullres {fold}` (nnU-Net's CONFIGURATION FOLD); it will go");
                    ("3d_fullres", fold.as_str())
                }
                // clap takes one or two values.
                [c, fold, ..] => (c.as_str(), fold.as_str()),
                [] => unreachable!("CONFIGURATION FOLD is required"),
            };
            Experiment::new(&dataset).and_then(|e| run_train(&e, configuration, fold, plans.as_deref(), &device, o, preprocessed, out))
        }
        Cmd::Doctor => segk::sysinfo::doctor(&LONG_VERSION.replace('\n', "; ")),
        Cmd::Predict { input, output, model, dataset, configuration, plans, trainer, folds, checkpoint, step, no_tta, save_probabilities, device, devices: None, precision, num_parts, part_id, continue_prediction, prev_stage_predictions } => {
            let select = segk::experiment::CaseSelection { part_id, num_parts, continue_prediction };
            let model = match (model, dataset) {
                (Some(m), _) => Ok(m),
                (None, Some(d)) => model_folder(&d, configuration.as_deref().unwrap_or("3d_fullres"), &plans, &trainer),
                (None, None) => Err(anyhow::anyhow!("predict needs -m MODEL_DIR, or -d DATASET -c CONFIGURATION")),
            };
            model.and_then(|m| run_predict(&input, &output, &m, folds, &checkpoint, segk::predict::PredictOptions { step, tta: !no_tta, save_probabilities, precision }, select, &device, prev_stage_predictions))
        }
        Cmd::Ensemble { input, output, save_probabilities, dataset_json } => segk::ensemble::command(&input, &output, save_probabilities, dataset_json.as_deref()),
        Cmd::DeterminePostprocessing { input, reference, dataset_json } => segk::experiment::run_determine_postprocessing(&input, &reference, dataset_json.as_deref()),
        Cmd::Postprocess { input, output, pp_json, dataset_json } => segk::experiment::run_postprocess(&input, &output, &pp_json, dataset_json.as_deref()),
        Cmd::FindBestConfiguration { dataset, configurations, plans, trainer, folds, disable_ensembling } => Experiment::new(&dataset).and_then(|e| segk::experiment::run_find_best(&e, &configurations, &plans, &trainer, &folds, !disable_ensembling)),
        Cmd::Evaluate { pred, gt, labels, ignore_label, dataset_json, out } => run_evaluate(&pred, &gt, labels, ignore_label, dataset_json.as_deref(), out),
        Cmd::Synth { dataset, cases, shape, spacing, seed } => segk::synth::command(&dataset, segk::synth::RawSpec { cases, shape, spacing, seed }),
        Cmd::Bench { what: BenchCmd::Step(a) } => segk::bench_step::run(&a),
        Cmd::Bench { what: BenchCmd::Loader(a) } => segk::bench_loader::run(&a).map(|_| ()),
        Cmd::Bench { what: BenchCmd::Kernels(a) } => segk::bench_kernels::run(&a).map(|_| ()),
    };
    if let Err(e) = r {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

