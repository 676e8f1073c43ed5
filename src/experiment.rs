//! One experiment as nnU-Net's commands see it: a raw dataset (a folder, or an ID or name under
//! $nnUNet_raw), its preprocessed and results folders, and the stages -- check, fingerprint,
//! plan, preprocess, train (with validation), predict, evaluate -- as library functions that
//! `segk`'s commands call. A command opens the dataset once: the stages share the
//! [`Experiment`] and the dataset it opened while checking it.

use crate::backend::Backend;
use crate::dataset::Dataset;
use crate::device::Job;
use crate::store::write_json_atomic;
use anyhow::{Context, Result};
use std::cell::OnceCell;
use std::path::{Path, PathBuf};

/// A raw dataset and the folders derived from it; the dataset is opened (and checked) once.
pub struct Experiment {
    pub root: PathBuf,
    dataset: OnceCell<Dataset>,
}

impl Experiment {
    /// The dataset a command names: a folder, else a dataset ID or name under $nnUNet_raw.
    pub fn new(arg: &Path) -> Result<Experiment> {
        Ok(Experiment { root: dataset_folder(arg)?, dataset: OnceCell::new() })
    }
    /// The dataset, checked for integrity (every problem printed) the first time.
    pub fn dataset(&self) -> Result<&Dataset> {
        if let Some(ds) = self.dataset.get() {
            return Ok(ds);
        }
        let ds = check_and_open(&self.root)?;
        Ok(self.dataset.get_or_init(|| ds))
    }
    pub fn name(&self) -> String {
        dataset_name(&self.root)
    }
}

/// Prints every problem of the dataset, then its summary line; the dataset when it has none.
fn check_and_open(root: &Path) -> Result<Dataset> {
    let (problems, ds) = crate::dataset::integrity::check_opening(root);
    for p in &problems {
        println!("{p}");
    }
    if !problems.is_empty() {
        anyhow::bail!("{}: {} problem(s)", root.display(), problems.len());
    }
    let ds = ds.ok_or_else(|| anyhow::anyhow!("{}: the dataset could not be opened", root.display()))?;
    let mut labels: Vec<(Vec<i64>, &String)> = ds.json.labels.iter().map(|(name, v)| (crate::dataset::values_of(v), name)).collect();
    labels.sort();
    let labels: Vec<String> = labels.iter().map(|(v, name)| format!("{name} {}", v.iter().map(i64::to_string).collect::<Vec<_>>().join("+"))).collect();
    println!("{}: {} cases, {} channel(s), labels {}: no problems", root.display(), ds.cases.len(), ds.json.channels(), labels.join(", "));
    Ok(ds)
}

/// The raw dataset a command names: a folder, else (as nnU-Net's commands take them) a dataset
/// ID (`900`, `Dataset900`) or name (`Dataset900_Synth`) under $nnUNet_raw.
pub fn dataset_folder(arg: &std::path::Path) -> Result<std::path::PathBuf> {
    if arg.is_dir() {
        return Ok(arg.to_path_buf());
    }
    let text = arg.to_string_lossy();
    let Some(raw) = std::env::var_os("nnUNet_raw").map(std::path::PathBuf::from) else {
        anyhow::bail!("{text}: no such dataset folder (set $nnUNet_raw to name datasets by ID or name, as nnU-Net does)");
    };
    find_dataset(&raw, "$nnUNet_raw", &text)
}

/// The dataset folder in `dir` (named `what` in errors) that `text` names: an ID (`900`,
/// `Dataset900`) or a full name, as nnU-Net's commands take them.
fn find_dataset(dir: &Path, what: &str, text: &str) -> Result<PathBuf> {
    let id = text.strip_prefix("Dataset").unwrap_or(text);
    let found: Vec<PathBuf> = match id.parse::<u32>() {
        Ok(n) => {
            let prefix = format!("Dataset{n:03}_");
            std::fs::read_dir(dir)
                .map_err(|e| anyhow::anyhow!("{what} ({}): {e}", dir.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix) && e.path().is_dir())
                .map(|e| e.path())
                .collect()
        }
        Err(_) => Some(dir.join(text)).filter(|p| p.is_dir()).into_iter().collect(),
    };
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => anyhow::bail!("{text}: no such dataset folder, here or in {what} ({})", dir.display()),
        many => anyhow::bail!("{text}: several datasets in {what} match: {}", many.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")),
    }
}

/// The dataset folder as a full path, so that `.` or `..` still has a name and a parent.
/// Symbolic links stay as given (the link's name is the dataset's name, as for nnU-Net).
pub fn full_path(root: &std::path::Path) -> std::path::PathBuf {
    let abs = std::path::absolute(root).unwrap_or_else(|_| root.to_path_buf());
    match root.file_name() {
        Some(_) => abs,
        None => std::fs::canonicalize(root).unwrap_or(abs),
    }
}

pub fn dataset_name(root: &std::path::Path) -> String {
    full_path(root).file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "dataset".into())
}

/// The folder that holds the dataset folder (where segk_preprocessed/ and segk_results/ go).
pub fn beside(root: &std::path::Path) -> std::path::PathBuf {
    let full = full_path(root);
    full.parent().unwrap_or(&full).to_path_buf()
}

/// Where derived files of a dataset go: $nnUNet_preprocessed/NAME as nnU-Net users expect,
/// else DATASET/../segk_preprocessed/NAME (the raw folder is never written to).
pub fn preprocessed_dir(root: &std::path::Path) -> std::path::PathBuf {
    match std::env::var_os("nnUNet_preprocessed") {
        Some(p) => std::path::PathBuf::from(p).join(dataset_name(root)),
        None => beside(root).join("segk_preprocessed").join(dataset_name(root)),
    }
}

/// Fingerprint and nnU-Net's plans (ExperimentPlanner's always, `planner`'s too) as nnU-Net
/// writes them; with `gpu_memory` also segkPlans, segk's own sizing of 3d_fullres to that
/// budget. Preprocess and train read these files by plans name (-p).
pub fn run_plan(ex: &Experiment, gpu_memory: Option<f64>, out: Option<std::path::PathBuf>, planner: &str, target: Option<f64>) -> Result<()> {
    let root = ex.root.as_path();
    use crate::plan::{fingerprint, nnunet as nn, plans};
    if let Some(g) = gpu_memory {
        anyhow::ensure!(g > 0.0 && g <= 4096.0, "--gpu-memory must be a size in GiB, above 0 and at most 4096 (got {g})");
    }
    let chosen = nn::planner(planner)?;
    let ds = ex.dataset()?;
    let name = ex.name();
    let out = out.unwrap_or_else(|| preprocessed_dir(root));
    std::fs::create_dir_all(&out).map_err(|e| anyhow::anyhow!("creating {}: {e}", out.display()))?;
    let t0 = std::time::Instant::now();
    let fp = fingerprint::fingerprint(ds, fingerprint::FOREGROUND_SAMPLES)?;
    println!("fingerprint: {} in {:.1} s", crate::sysinfo::count(ds.cases.len(), "case"), t0.elapsed().as_secs_f64());
    write_json_atomic(&out.join(fingerprint::FILE), &fp)?;
    // nnU-Net's own fingerprint, where nnUNetv2_extract_fingerprint wrote one, is read as it is.
    let theirs = out.join("dataset_fingerprint.json");
    let (nfp, source) = match std::fs::read(&theirs) {
        Ok(b) => (serde_json::from_slice(&b).map_err(|e| anyhow::anyhow!("{}: not nnU-Net's fingerprint: {e}", theirs.display()))?, "nnU-Net's dataset_fingerprint.json"),
        Err(_) => (nn::NnunetFingerprint::from_segk(&fp)?, "segk's fingerprint"),
    };
    let (mut default, mut chosen_plans) = (None, None);
    let reader = crate::dataset::reader_writer(&ds.json, ds.cases.first().and_then(|c| c.images.first()).map(|p| p.as_path()));
    for p in [&nn::PLANNERS[0], chosen] {
        if p.class == nn::PLANNERS[0].class && default.is_some() {
            continue;
        }
        let doc = nn::plan_experiment(p, &name, &ds.json, &nfp, &reader, if p.class == chosen.class { target } else { None })?;
        let (path, written) = nn::write_plans(&out, &doc)?;
        match written {
            nn::Written::New => println!("wrote {}", path.display()),
            nn::Written::Same => println!("{} is already this plan", path.display()),
            nn::Written::KeptDifferent => println!("{} exists with other contents (nnU-Net's or edited): kept as it is, and used; remove it to have segk write this plan", path.display()),
        }
        // What is on disk is what is used and described (nnU-Net's own file included).
        let used = plans::read_nnunet_plans(&path)?;
        println!("{} ({}, from {source}):", path.display(), p.class);
        for line in nn::describe(&used, &ds.json) {
            println!("  {line}");
        }
        if p.class == chosen.class {
            chosen_plans = Some(used.clone());
        }
        if default.is_none() {
            default = Some(used);
        }
    }
    let default = default.expect("ExperimentPlanner planned above");
    if let Some(g) = gpu_memory {
        let doc = plans::segk_sized(&default, &ds.json, (g * plans::GIB) as usize)?;
        let path = nn::plans_path(&out, &doc.plans_name);
        let bytes = crate::plan::plans_json::to_python_json(&doc)?;
        crate::store::write_atomic_via(&path, &format!(".{}.tmp", std::process::id()), |w| std::io::Write::write_all(w, &bytes))?;
        println!("wrote {} (--gpu-memory {g}: nnUNetPlans' 3d_fullres with patch and batch sized to {g} GiB by segk's exact memory model -- a deviation from nnU-Net's plan):", path.display());
        for line in nn::describe(&doc, &ds.json) {
            println!("  {line}");
        }
        println!("train it with `segk train DATASET 3d_fullres FOLD -p {}`", plans::SEGK_PLANS);
    } else {
        let plans_name = chosen.plans_name;
        let flag = if chosen.class == nn::PLANNERS[0].class { String::new() } else { format!(" -p {plans_name}") };
        let planned = chosen_plans.as_ref().expect("the chosen planner planned above");
        for c in ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"].into_iter().filter(|c| planned.configurations.get(c).is_some()) {
            let after = match crate::cascade::previous_stage(planned, c) {
                Ok(Some(p)) => format!(" after every fold of {p} (its validations write {c}'s inputs)"),
                _ => String::new(),
            };
            match plans::from_nnunet(planned, c, &ds.json) {
                Ok(_) => println!("segk trains {plans_name}' {c} as planned: `segk train DATASET {c} FOLD{flag}`{after}"),
                Err(e) => println!("segk cannot train {plans_name}' {c}: {e:#}"),
            }
        }
    }
    println!("wrote {}", out.join(fingerprint::FILE).display());
    Ok(())
}

/// The plans file PLANS.json of the preprocessed folder, planned first when it is missing and
/// one of nnU-Net's planners makes it.
fn open_plans(ex: &Experiment, pre: &Path, plans_name: &str) -> Result<crate::plan::plans_json::PlansJson> {
    use crate::plan::{nnunet as nn, plans};
    let path = nn::plans_path(pre, plans_name);
    if !path.is_file() {
        match nn::planner(plans_name) {
            Ok(p) => {
                println!("no {} yet: planning first", path.display());
                run_plan(ex, None, Some(pre.to_path_buf()), p.class, None)?;
            }
            Err(_) if plans_name == plans::SEGK_PLANS => anyhow::bail!("{}: missing: `segk plan DATASET --gpu-memory GB` writes segkPlans", path.display()),
            Err(_) => anyhow::bail!("{}: no such plans file (`segk plan -pl PLANNER` writes nnU-Net's; a plans file of your own goes there by its plans name)", path.display()),
        }
    }
    plans::read_nnunet_plans(&path)
}

/// nnU-Net's default configurations to preprocess (`nnUNetv2_plan_and_preprocess`).
pub const DEFAULT_CONFIGURATIONS: [&str; 3] = ["2d", "3d_fullres", "3d_lowres"];

/// Preprocesses `configurations` of the plans `plans_name` (planned first when missing), one
/// store per data identifier: configurations that share one are preprocessed once.
pub fn run_preprocess(ex: &Experiment, processes: Option<usize>, f16: bool, plans_name: &str, configurations: &[String], out: Option<std::path::PathBuf>) -> Result<()> {
    let root = ex.root.as_path();
    use crate::preprocess::{self, splits};
    let out = out.unwrap_or_else(|| preprocessed_dir(root));
    anyhow::ensure!(processes != Some(0), "--processes must be at least 1");
    let plans = open_plans(ex, &out, plans_name)?;
    let ds = ex.dataset()?;
    anyhow::ensure!(!ds.cases.is_empty(), "{}: no training cases in labelsTr", root.display());
    let dtype = if f16 { crate::store::ImageDtype::F16 } else { crate::store::ImageDtype::F32 };
    let cpus = crate::threads::Cpus::detect();
    let asked = crate::threads::processes(processes, &cpus, &crate::threads::process_env)?;
    // segk's fingerprint (written by `segk plan`) gives every case's size for the memory cap.
    let fp: Option<crate::plan::fingerprint::Fingerprint> = std::fs::read(out.join(crate::plan::fingerprint::FILE)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let mut done: Vec<String> = Vec::new();
    for configuration in configurations {
        if plans.configurations.get(configuration).is_none() {
            println!("{plans_name} has no configuration {configuration}: skipped (nnU-Net plans 3d_lowres only when the images are large against the 3d_fullres patch)");
            continue;
        }
        let dir = crate::plan::plans::store_dir(&plans, configuration)?;
        if done.contains(&dir) {
            println!("{configuration}: preprocessed above, in {dir}");
            continue;
        }
        let settings = preprocess::Settings::new(&ds.json, &plans, configuration, dtype)?;
        let store = out.join(&dir);
        let mut count = asked.clone();
        if let Some(per_case) = fp.as_ref().and_then(|fp| preprocess::largest_case_bytes(fp, &settings, ds.json.channels())) {
            if let Some(line) = crate::threads::cap_by_memory(&mut count, per_case, 0, crate::sysinfo::host_memory_available(), "preprocessing processes", "--processes")? {
                println!("{line}");
            }
        }
        let workers = count.n;
        println!("preprocessing {configuration}: {} into {}, {workers} at a time (from {}), images {}", crate::sysinfo::count(ds.cases.len(), "case"), store.display(), count.from, format!("{dtype:?}").to_lowercase());
        let bar = indicatif::ProgressBar::new(ds.cases.len() as u64).with_style(
            indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {elapsed_precise} elapsed, {eta} left  {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        let s = preprocess::run(ds, &settings, &store, workers, &bar);
        bar.finish_and_clear();
        let s = s?;
        println!(
            "{configuration}: {} cases preprocessed, {} already done; {:.1} s, {:.1} Mvoxel/s in, {:.1} GB written",
            s.done,
            s.skipped,
            s.seconds,
            s.voxels_in as f64 / s.seconds.max(1e-9) / 1e6,
            s.bytes_written as f64 / 1e9
        );
        done.push(dir);
    }
    std::fs::copy(root.join("dataset.json"), out.join("dataset.json")).map_err(|e| anyhow::anyhow!("copying dataset.json to {}: {e}", out.display()))?;
    let ids: Vec<String> = ds.cases.iter().map(|c| c.id.clone()).collect();
    match splits::load_or_create(&out, &ids) {
        Ok(sp) => println!("{}: {} folds", out.join(splits::FILE).display(), sp.len()),
        Err(e) => println!("no cross-validation split: {e:#}"),
    }
    Ok(())
}

struct Train {
    cfg: crate::train::TrainConfig,
    /// The plans trained with, as read once at the start.
    plans: crate::plan::plans_json::PlansJson,
    configuration: String,
    /// Validation after training, from this raw dataset.
    validate: Option<std::path::PathBuf>,
    /// Validation also writes the probabilities (nnU-Net's --npz; for ensembling).
    npz: bool,
    /// A cascade stage: the previous stage's label maps of the cases (its cross-validation).
    prev_stage_predictions: Option<std::path::PathBuf>,
}

impl Job for Train {
    type Out = Vec<crate::train::EpochLog>;
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        let logs = crate::train::run_on(be, &self.cfg)?;
        // A signal in the last epoch's tail (after its steps) lands here: the run is saved.
        // With several ranks rank 0 decides and writes; the others are done.
        if !crate::train::leads(&self.cfg) {
            return Ok(logs);
        }
        anyhow::ensure!(
            !crate::train::STOP.load(std::sync::atomic::Ordering::Relaxed),
            "interrupted after the last epoch: checkpoint_final is saved; validation was skipped"
        );
        // nnU-Net's predictor takes the model folder too.
        let pth = crate::checkpoint::export_nnunet(&self.cfg.out, "checkpoint_final", &self.configuration)?;
        println!("wrote {} (nnU-Net's checkpoint format: nnUNetv2_predict_from_modelfolder reads this model folder)", pth.display());
        if let Some(root) = &self.validate {
            validate(be, &self.cfg, &self.plans, &self.configuration, root, self.npz, self.prev_stage_predictions)?;
        }
        Ok(logs)
    }
}

/// nnU-Net's validation after training: the fold's validation cases predicted from the raw
/// images with checkpoint_final (mirror TTA on) into OUT/validation, scored into summary.json.
pub fn validate<B: Backend>(be: &B, cfg: &crate::train::TrainConfig, plans: &crate::plan::plans_json::PlansJson, configuration: &str, root: &std::path::Path, npz: bool, prev_stage_predictions: Option<std::path::PathBuf>) -> Result<()> {
    let model_dir = cfg.out.parent().unwrap_or(&cfg.out);
    let model = crate::predict::Model {
        plans: plans.clone(),
        configuration: configuration.to_string(),
        plan: cfg.plan.clone(),
        json: crate::dataset::read_json(model_dir)?,
        checkpoints: vec![(cfg.out.clone(), crate::checkpoint::WeightsFile::Segk("checkpoint_final".to_string()))],
        mirror_axes: cfg.plan.topology.mirror_axes(),
        trainer_name: None,
        prev_stage_predictions,
    };
    let ending = model.json.file_ending.clone();
    let mut found = crate::dataset::channel_files(&root.join("imagesTr"), &ending)?;
    let cases: Vec<(String, Vec<std::path::PathBuf>)> = cfg.val_ids.iter().map(|id| (id.clone(), found.remove(id).map(|f| f.into_values().collect()).unwrap_or_default())).collect();
    let out = cfg.out.join("validation");
    let t0 = std::time::Instant::now();
    println!("validation: predicting {} with checkpoint_final and mirror TTA into {}", crate::sysinfo::count(cases.len(), "case"), out.display());
    let bar = cases_bar();
    let predicted = crate::predict::predict_cases(be, &model, &cases, &out, crate::predict::PredictOptions { step: 0.5, tta: true, save_probabilities: npz, precision: crate::device::Precision::Auto }, &bar);
    bar.finish_and_clear();
    let (files, _) = predicted?;
    let pairs: Vec<_> = files.iter().zip(&cfg.val_ids).map(|(p, id)| (p.clone(), root.join("labelsTr").join(format!("{id}{ending}")))).collect();
    let s = crate::evaluate::evaluate_pairs(&pairs, Some(foreground_labels(&model.json)), model.json.ignore_label())?;
    write_json_atomic(&out.join("summary.json"), &s)?;
    print!("{}", crate::evaluate::table(&s));
    println!("validation: {} in {:.1} s; wrote {}", crate::sysinfo::count(files.len(), "case"), t0.elapsed().as_secs_f64(), out.join("summary.json").display());
    // The next stages of a cascade train on these predictions (nnU-Net's predicted_next_stage).
    for next in crate::cascade::next_stages(plans, configuration) {
        let dir = crate::cascade::next_stage_dir(model_dir, &next);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for f in &files {
            // Under a hidden name first: a cascade fold reading the folder never sees half a file.
            let name = f.file_name().unwrap_or_default().to_string_lossy().to_string();
            let (tmp, dst) = (dir.join(format!(".{name}.{}.tmp", std::process::id())), dir.join(&name));
            std::fs::copy(f, &tmp).with_context(|| format!("copying {} to {}", f.display(), tmp.display()))?;
            std::fs::rename(&tmp, &dst).with_context(|| format!("renaming {} to {}", tmp.display(), dst.display()))?;
        }
        println!("validation: the {} predictions are also {next}'s inputs, in {}", files.len(), dir.display());
    }
    Ok(())
}

pub struct TrainOpts {
    pub epochs: usize,
    pub iters_per_epoch: usize,
    pub val_iters: usize,
    pub checkpointing: String,
    pub save_every: usize,
    pub resume: bool,
    pub pretrained: Option<std::path::PathBuf>,
    pub validation: bool,
    /// Validation writes probabilities too (nnU-Net's --npz).
    pub npz: bool,
    pub workers: Option<usize>,
    pub seed: u64,
    /// What the convolutions multiply (`--precision`).
    pub precision: crate::device::Precision,
}

/// Ctrl-C or `kill` (SIGINT, SIGTERM): inside the training loop, save checkpoint_latest and
/// stop at the next step; anywhere else (planning, preprocessing, validation), or at a second
/// signal, stop at once, as without the handler.
#[cfg(unix)]
pub fn stop_on_signals() {
    extern "C" fn on_signal(signum: i32) {
        use std::sync::atomic::Ordering::Relaxed;
        // SAFETY (both blocks): write and _exit are async-signal-safe.
        if crate::train::STEPPING.load(Relaxed) && !crate::train::STOP.swap(true, Relaxed) {
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
pub fn run_train(ex: &Experiment, configuration: &str, fold: &str, plans_name: Option<&str>, device: &str, o: TrainOpts, preprocessed: Option<std::path::PathBuf>, out: Option<std::path::PathBuf>) -> Result<()> {
    anyhow::ensure!(
        ["2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"].contains(&configuration),
        "configuration {configuration:?}: segk trains nnU-Net's 2d, 3d_fullres, 3d_lowres and 3d_cascade_fullres"
    );
    let fold_name = fold;
    let fold: crate::preprocess::splits::Fold = fold.parse()?;
    anyhow::ensure!(["auto", "0", "1", "2"].contains(&o.checkpointing.as_str()), "--checkpointing must be auto, 0, 1 or 2");
    #[cfg(unix)]
    stop_on_signals();
    anyhow::ensure!(o.epochs > 0 && o.iters_per_epoch > 0 && o.val_iters > 0, "--epochs, --iters-per-epoch and --val-iters must be at least 1");
    anyhow::ensure!(o.workers != Some(0), "--workers must be at least 1");
    if device != "auto" {
        crate::device::parse(device)?;
    }
    let root = ex.root.as_path();
    let plans_name = plans_name.unwrap_or(crate::plan::nnunet::PLANNERS[0].plans_name);
    // Several ranks (srun, mpirun, torchrun-style variables, --devices): meet first; rank 0
    // prepares (preprocessing, splits, the model folder) while the others wait.
    let world = crate::dist::World::from_process_env()?;
    // SEGK_GROUP=1 (which --devices sets) takes the ranks' path even for one rank: the
    // rendezvous and NCCL at world size 1.
    let grouped = !world.is_single() || std::env::var("SEGK_GROUP").is_ok_and(|v| v == "1");
    let (group, device) = if !grouped {
        (None, device.to_string())
    } else {
        let device = rank_device(device, &world)?;
        let run = format!(
            "{} {configuration} {plans_name} fold {fold_name} epochs {}x{} val {} seed {} resume {} segk {}",
            dataset_name(root),
            o.epochs,
            o.iters_per_epoch,
            o.val_iters,
            o.seed,
            o.resume,
            env!("CARGO_PKG_VERSION")
        ) + &std::env::var("SEGK_GRAD_BUCKET_KB").map(|b| format!(" buckets {b} KB")).unwrap_or_default();
        let g = crate::dist::group::Group::connect(&world, &run, crate::dist::group::Limits::from_env()?)?;
        println!("rank {} of {} ({}) on {device}, rendezvous at {}:{}", world.rank, world.size, world.launcher, world.master_addr, world.master_port);
        if world.rank != 0 {
            println!("rank {}: from here only rank 0 prints; errors still reach stderr", world.rank);
            quiet_stdout();
            g.sync("prepared", &[])?;
        }
        (Some(std::sync::Arc::new(g)), device)
    };
    let lead = world.rank == 0;
    let r = train_prepared(ex, configuration, fold, plans_name, &device, o, preprocessed, out, group.clone(), lead);
    if let Some(g) = &group {
        match &r {
            Ok(()) => g.finish(),
            Err(e) => g.fail(e),
        }
    }
    r
}

/// The device of one rank: `--device cuda:N` as given (`--devices` gives each rank its own),
/// else the GPU of its local rank.
fn rank_device(device: &str, world: &crate::dist::World) -> Result<String> {
    // A launcher that gives each rank its own GPUs (srun --gpus-per-task) leaves fewer visible
    // than the node's ranks.
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok().map(|v| v.split(',').filter(|d| !d.trim().is_empty()).count()).filter(|&n| n > 0);
    match device {
        "auto" | "cuda" => Ok(format!("cuda:{}", visible.map_or(world.local_rank, |n| world.local_rank % n))),
        d if d.starts_with("cuda:") => Ok(d.to_string()),
        d => anyhow::bail!("--device {d}: training on several ranks ({} of them, from {}) needs GPUs (NCCL)", world.size, world.launcher),
    }
}

/// Ranks other than 0 print nothing (their lines would repeat rank 0's); stderr stays.
fn quiet_stdout() {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    // SAFETY: opens /dev/null and puts it in place of fd 1; no Rust object owns fd 1.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if fd >= 0 {
            libc::dup2(fd, 1);
            libc::close(fd);
        }
    }
}

/// `run_train` from the preparation on; `lead`: this process writes (the only rank, or rank 0).
#[allow(clippy::too_many_arguments)]
fn train_prepared(ex: &Experiment, configuration: &str, fold: crate::preprocess::splits::Fold, plans_name: &str, device: &str, o: TrainOpts, preprocessed: Option<std::path::PathBuf>, out: Option<std::path::PathBuf>, group: Option<std::sync::Arc<crate::dist::group::Group>>, lead: bool) -> Result<()> {
    use crate::preprocess::splits;
    let TrainOpts { epochs, iters_per_epoch, val_iters, checkpointing, save_every, resume, pretrained, validation, npz, workers, seed, precision } = o;
    let checkpointing = match checkpointing.as_str() {
        "auto" => None,
        l => Some(crate::model::Checkpointing::from_level(l.parse().map_err(|_| anyhow::anyhow!("--checkpointing must be auto, 0, 1 or 2"))?)?),
    };
    let root = ex.root.as_path();
    let pre = preprocessed.unwrap_or_else(|| preprocessed_dir(root));
    let ds = ex.dataset()?;
    let ids: Vec<String> = ds.cases.iter().map(|c| c.id.clone()).collect();
    let plans = open_plans(ex, &pre, plans_name)?;
    let plan = crate::plan::plans::from_nnunet(&plans, configuration, &ds.json).with_context(|| format!("{}", crate::plan::nnunet::plans_path(&pre, plans_name).display()))?;
    let store = pre.join(crate::plan::plans::store_dir(&plans, configuration)?);
    let (stale, dtype) = crate::preprocess::stale_cases(&store, &ids, &ds.json, &plans, configuration)?;
    if !stale.is_empty() && !lead {
        anyhow::bail!(
            "this rank does not see the store rank 0 prepared at {} ({} of {} cases missing or stale): every node needs the preprocessed and results folders at the same paths (a shared filesystem)",
            store.display(),
            stale.len(),
            ids.len()
        );
    }
    if !stale.is_empty() {
        println!("the store at {} is missing {} of {} cases or holds them under other settings: preprocessing first", store.display(), stale.len(), ids.len());
        run_preprocess(ex, None, dtype == crate::store::ImageDtype::F16, plans_name, &[configuration.to_string()], Some(pre.clone()))?;
    }
    // `all` needs no split (and works with fewer cases than folds).
    let folds = if fold == splits::Fold::All { Vec::new() } else { splits::load_or_create(&pre, &ids)? };
    let split = splits::select(&folds, &ids, fold)?;
    let fold_name = match fold {
        splits::Fold::All => "all".to_string(),
        splits::Fold::Index(k) => k.to_string(),
    };
    let out = out.unwrap_or_else(|| match std::env::var_os("nnUNet_results") {
        Some(r) => std::path::PathBuf::from(r).join(dataset_name(root)).join(model_folder_name(plans_name, configuration)).join(format!("fold_{fold_name}")),
        None => beside(root).join("segk_results").join(dataset_name(root)).join(model_folder_name(plans_name, configuration)).join(format!("fold_{fold_name}")),
    });
    // The model folder (the fold's parent) carries what prediction needs; rank 0 writes it.
    let model_dir = out.parent().unwrap_or(&out).to_path_buf();
    if lead {
        if !resume {
            refuse_to_replace_a_run(&out)?;
        }
        refuse_another_plan(&model_dir, &plans)?;
        std::fs::create_dir_all(&model_dir).map_err(|e| anyhow::anyhow!("creating {}: {e}", model_dir.display()))?;
        // The plans file as it is on disk (its key order and any keys of its own kept).
        let source = crate::plan::nnunet::plans_path(&pre, plans_name);
        let bytes = std::fs::read(&source).map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", source.display()))?;
        crate::store::write_atomic_via(&model_dir.join(crate::predict::PLANS_FILE), &format!(".{}.tmp", std::process::id()), |w| std::io::Write::write_all(w, &bytes))?;
        std::fs::copy(root.join("dataset.json"), model_dir.join("dataset.json")).map_err(|e| anyhow::anyhow!("copying dataset.json to {}: {e}", model_dir.display()))?;
    }
    // A cascade stage trains on the previous stage's cross-validation predictions.
    let prev_stage = match crate::cascade::previous_stage(&plans, configuration)? {
        None => None,
        Some(p) => {
            let prev_model = model_dir.parent().unwrap_or(&model_dir).join(model_folder_name(plans_name, &p));
            let source = crate::cascade::next_stage_dir(&prev_model, configuration);
            let maps = model_dir.join("prev_stage_inputs");
            let mut all: Vec<String> = split.train.iter().chain(&split.val).cloned().collect();
            all.sort();
            all.dedup();
            println!("cascade: {configuration} takes {p}'s cross-validation predictions from {} (one-hot, per foreground label)", source.display());
            if lead {
                crate::cascade::prepare(&store, &all, &source, &ds.json.file_ending, &maps)?;
            }
            Some((source, maps))
        }
    };
    // The others waited for this (they passed their `prepared` at the start).
    if let (Some(g), true) = (&group, lead) {
        g.sync("prepared", &[])?;
    }
    let t = &plan.topology;
    let net = if t.is_residual() { format!("ResidualEncoderUNet, blocks {:?}", t.blocks_per_stage) } else { "PlainConvUNet".to_string() };
    println!(
        "training {configuration} of {plans_name} ({net}), fold {fold_name}: patch {:?}, batch {}, {} epochs x {} iterations, output {}",
        plan.patch_size,
        plan.batch_size,
        epochs,
        iters_per_epoch,
        out.display()
    );
    let cfg = crate::train::TrainConfig {
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
        lr: crate::train::INITIAL_LR,
        save_every,
        resume,
        pretrained,
        prev_stage: prev_stage.as_ref().map(|(_, maps)| (maps.clone(), ds.json.foreground_values())),
        group,
    };
    // Validation after training runs on rank 0 (nnU-Net's DDP spreads it; here the others end).
    let validate = (validation && lead).then(|| root.to_path_buf());
    let logs = crate::device::run_on(device, precision, Train { cfg, plans, configuration: configuration.to_string(), validate, npz, prev_stage_predictions: prev_stage.map(|(source, _)| source) })?;
    if let Some(last) = logs.last() {
        println!("done: {} epochs run, final EMA pseudo-Dice {:.4}", logs.len(), last.ema_dice);
    }
    Ok(())
}

/// nnU-Net's TRAINER__PLANS__CONFIGURATION, with segk's trainer name: beside nnU-Net's own
/// nnUNetTrainer__... folders, never taken for one.
pub fn model_folder_name(plans: &str, configuration: &str) -> String {
    format!("segkTrainer__{plans}__{configuration}")
}

/// The model folder nnU-Net's predict names with -d -c -p -tr:
/// $nnUNet_results/DatasetXXX_Name/TRAINER__PLANS__CONFIGURATION, the dataset given by ID or name.
pub fn model_folder(dataset: &str, configuration: &str, plans: &str, trainer: &str) -> Result<PathBuf> {
    let results = std::env::var_os("nnUNet_results").map(PathBuf::from).ok_or_else(|| anyhow::anyhow!("-d {dataset}: set $nnUNet_results (where `segk train` puts model folders), or give the model folder with -m"))?;
    let dataset_dir = find_dataset(&results, "$nnUNet_results", dataset)?;
    let dir = dataset_dir.join(format!("{trainer}__{plans}__{configuration}"));
    anyhow::ensure!(dir.is_dir(), "{}: no such model folder (segk train writes segkTrainer__PLANS__CONFIGURATION; for nnU-Net's own, give -tr nnUNetTrainer)", dir.display());
    Ok(dir)
}

/// A fold folder that holds checkpoints is a run: starting again there without --resume would
/// replace them.
pub fn refuse_to_replace_a_run(out: &std::path::Path) -> Result<()> {
    use crate::checkpoint;
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
pub fn refuse_another_plan(model_dir: &std::path::Path, plans: &crate::plan::plans_json::PlansJson) -> Result<()> {
    let path = model_dir.join(crate::predict::PLANS_FILE);
    let Ok(bytes) = std::fs::read(&path) else { return Ok(()) };
    let there = crate::plan::plans::parse_plans(&bytes, &path.display().to_string());
    anyhow::ensure!(
        there.as_ref().is_ok_and(|t| t == plans),
        "{} holds another plan than this training's (the folds trained with it would no longer load): train into another model folder (--out OTHER/fold_N), or delete that one",
        path.display()
    );
    Ok(())
}

/// Progress over cases (drawn on a terminal only).
pub fn cases_bar() -> indicatif::ProgressBar {
    indicatif::ProgressBar::new(0).with_style(indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {elapsed_precise}  {msg}").unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()))
}

struct Predict {
    model: crate::predict::Model,
    cases: Vec<(String, Vec<std::path::PathBuf>)>,
    output: std::path::PathBuf,
    opt: crate::predict::PredictOptions,
}

impl Job for Predict {
    type Out = (Vec<std::path::PathBuf>, u64);
    fn bf16_on_cpu_by_default(&self) -> bool {
        true
    }
    fn run<B: Backend>(self, be: &B) -> Result<Self::Out> {
        println!("device {}", be.name());
        let bar = cases_bar();
        let r = crate::predict::predict_cases(be, &self.model, &self.cases, &self.output, self.opt, &bar);
        bar.finish_and_clear();
        r
    }
}

/// Which of the input's cases one `segk predict` job takes: part `part_id` of `num_parts`
/// (nnU-Net's --part_id / --num_parts), and with `continue_prediction` not those already in
/// the output folder.
#[derive(Clone, Copy, Debug)]
pub struct CaseSelection {
    pub part_id: usize,
    pub num_parts: usize,
    pub continue_prediction: bool,
}

#[allow(clippy::too_many_arguments)]
pub fn run_predict(input: &std::path::Path, output: &std::path::Path, model: &std::path::Path, folds: Option<Vec<String>>, checkpoint: &str, opt: crate::predict::PredictOptions, select: CaseSelection, device: &str, prev_stage: Option<std::path::PathBuf>) -> Result<()> {
    anyhow::ensure!(opt.step > 0.0 && opt.step <= 1.0, "--step must be in (0, 1]");
    anyhow::ensure!(select.num_parts >= 1 && select.part_id < select.num_parts, "--part-id must be below --num-parts (got part {} of {})", select.part_id, select.num_parts);
    // Predictions written into the input folder would be read as images by the next run.
    let same = |a: &std::path::Path, b: &std::path::Path| matches!((std::fs::canonicalize(a), std::fs::canonicalize(b)), (Ok(x), Ok(y)) if x == y);
    anyhow::ensure!(!same(input, output), "-o {} is the input folder: write the predictions elsewhere", output.display());
    let mut m = crate::predict::Model::open(model, folds.as_deref(), checkpoint)?;
    if let Some(p) = &prev_stage {
        anyhow::ensure!(p.is_dir(), "--prev-stage-predictions {}: not a folder", p.display());
        println!("previous stage: its label maps in {} become {} one-hot input channels", p.display(), m.prev_stage_labels().len());
    }
    m.prev_stage_predictions = prev_stage;
    let on = |b: bool| if b { "on" } else { "off" };
    let names: Vec<String> = m.checkpoints.iter().filter_map(|(d, _)| d.file_name().map(|n| n.to_string_lossy().to_string())).collect();
    let file = match m.checkpoints.first().map(|c| &c.1) {
        Some(crate::checkpoint::WeightsFile::Torch(p)) => format!("nnU-Net's {}, trainer {}", p.file_name().unwrap_or_default().to_string_lossy(), m.trainer_name.as_deref().unwrap_or("unnamed")),
        _ => checkpoint.to_string(),
    };
    let tta = match (opt.tta, m.mirror_axes.as_slice()) {
        (false, _) | (true, []) => "off".to_string(),
        (true, [0, 1, 2]) => "on".to_string(),
        (true, axes) if m.trainer_name.is_some() => format!("on, axes {axes:?} (the checkpoint's)"),
        (true, axes) => format!("on, axes {axes:?} (in-plane)"),
    };
    println!("predicting {} with {} ({file}), step {}, mirror TTA {tta}, probabilities {}", input.display(), names.join(", "), opt.step, on(opt.save_probabilities));
    let threads = crate::threads::global();
    println!("threads: {} compute threads (from {})", threads.n, threads.from);
    let unread = crate::predict::unread_files(input, m.json.channels(), &m.json.file_ending);
    if !unread.is_empty() {
        println!("  not read: {}", unread.join(", "));
    }
    // As nnU-Net: the prediction folder carries the model's dataset.json and plans.json
    // (`segk ensemble` and nnUNetv2_ensemble read them there).
    std::fs::create_dir_all(output).with_context(|| format!("creating {}", output.display()))?;
    for f in ["dataset.json", crate::predict::PLANS_FILE] {
        std::fs::copy(model.join(f), output.join(f)).with_context(|| format!("copying {} into {}", model.join(f).display(), output.display()))?;
    }
    let all = crate::predict::find_cases(input, m.json.channels(), &m.json.file_ending)?;
    let n_all = all.len();
    let mut cases = crate::predict::part_of(all, select.part_id, select.num_parts)?;
    if select.num_parts > 1 {
        println!("  part {} of {}: {} of the {n_all} cases", select.part_id, select.num_parts, cases.len());
    }
    if select.continue_prediction {
        let before = cases.len();
        cases.retain(|(id, _)| !crate::predict::is_predicted(output, id, &m.json.file_ending, opt.save_probabilities));
        println!("  --continue: {} already predicted in {}, {} to do", before - cases.len(), output.display(), cases.len());
    }
    let t0 = std::time::Instant::now();
    let job = Predict { model: m, cases, output: output.to_path_buf(), opt };
    let (files, bound) = crate::device::run_on(device, opt.precision, job)?;
    let mapped = if opt.save_probabilities { "; RSS includes the mapped probability files" } else { "" };
    let peak = crate::sysinfo::peak_rss().map(|b| format!(", peak RSS {:.0} MiB (bound {:.0} MiB{mapped})", b as f64 / (1 << 20) as f64, bound as f64 / (1 << 20) as f64)).unwrap_or_default();
    println!("wrote {} to {} in {:.1} s{peak}", crate::sysinfo::count(files.len(), "label map"), output.display(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// What nnU-Net scores: the foreground regions of a region dataset, else every label value
/// but background and the ignore label.
pub fn foreground_labels(json: &crate::dataset::DatasetJson) -> Vec<Vec<i64>> {
    if json.has_regions() {
        return json.regions();
    }
    json.foreground_values().into_iter().map(|v| vec![v]).collect()
}

/// `segk evaluate`: the labels from `--labels`, else the dataset.json's labels or regions (`dataset_json`), else
/// those in the references; the ignore label from `--ignore-label`, else the dataset.json's.
pub fn run_evaluate(pred: &std::path::Path, gt: &std::path::Path, labels: Option<Vec<i64>>, ignore: Option<i64>, dataset_json: Option<&Path>, out: Option<std::path::PathBuf>) -> Result<()> {
    for dir in [pred, gt] {
        anyhow::ensure!(dir.is_dir(), "{}: no such folder", dir.display());
    }
    let json = match dataset_json {
        Some(f) => Some(crate::dataset::read_json_file(f)?),
        None => None,
    };
    let labels = labels.map(|l| l.into_iter().map(|v| vec![v]).collect()).or_else(|| json.as_ref().map(foreground_labels));
    let ignore = ignore.or_else(|| json.as_ref().and_then(|j| j.ignore_label()));
    let out = out.unwrap_or_else(|| pred.join("summary.json"));
    crate::store::prepare_output_file(&out)?;
    let s = crate::evaluate::evaluate(pred, gt, labels, ignore)?;
    write_json_atomic(&out, &s)?;
    print!("{}", crate::evaluate::table(&s));
    println!("{}; wrote {}", crate::sysinfo::count(s.metric_per_case.len(), "case"), out.display());
    Ok(())
}

pub fn run_fingerprint(ex: &Experiment, out: Option<std::path::PathBuf>) -> Result<()> {
    let root = ex.root.as_path();
    let ds = ex.dataset()?;
    let out = out.unwrap_or_else(|| preprocessed_dir(root).join(crate::plan::fingerprint::FILE));
    crate::store::prepare_output_file(&out)?;
    let t0 = std::time::Instant::now();
    let fp = crate::plan::fingerprint::fingerprint(&ds, crate::plan::fingerprint::FOREGROUND_SAMPLES)?;
    write_json_atomic(&out, &fp)?;
    for (c, s) in fp.foreground_intensity_properties_per_channel.iter().enumerate() {
        println!("channel {c}: foreground mean {:.3} std {:.3} p0.5 {:.3} p99.5 {:.3}", s.mean, s.std, s.percentile_00_5, s.percentile_99_5);
    }
    println!("wrote {} ({} cases, {:.1} s)", out.display(), fp.spacings.len(), t0.elapsed().as_secs_f64());
    Ok(())
}

/// The dataset.json for a folder of predictions: the one given, else the folder's own (segk and
/// nnU-Net copy it there), else the one beside `fallback` (a labelsTr's parent).
fn prediction_json(folder: &Path, given: Option<&Path>, fallback: Option<&Path>) -> Result<crate::dataset::DatasetJson> {
    let candidates: Vec<PathBuf> = match given {
        Some(g) => vec![g.to_path_buf()],
        None => std::iter::once(folder.join("dataset.json")).chain(fallback.and_then(Path::parent).map(|p| p.join("dataset.json"))).collect(),
    };
    let path = candidates.iter().find(|p| p.is_file()).with_context(|| format!("no dataset.json at {} (give --dataset-json)", candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(" or ")))?;
    crate::dataset::read_json_file(path)
}

/// `segk determine-postprocessing -i PRED --ref GT`.
pub fn run_determine_postprocessing(pred: &Path, gt: &Path, dataset_json: Option<&Path>) -> Result<()> {
    let json = prediction_json(pred, dataset_json, Some(gt))?;
    let d = crate::postprocess::determine(pred, gt, &json)?;
    for line in &d.log {
        println!("  {line}");
    }
    let file = pred.join("postprocessing.json");
    crate::postprocess::write_json(&file, &d)?;
    let n = crate::postprocess::apply_folder(pred, &pred.join("postprocessed"), &d.steps, &json.file_ending)?;
    println!(
        "foreground mean Dice {:.5} -> {:.5} with {} step(s); wrote {} and {} postprocessed maps into {}",
        d.before.1.dice.unwrap_or(0.0),
        d.after.1.dice.unwrap_or(0.0),
        d.steps.len(),
        file.display(),
        n,
        pred.join("postprocessed").display()
    );
    Ok(())
}

/// `segk postprocess -i IN -o OUT --pp-json FILE`.
pub fn run_postprocess(input: &Path, output: &Path, pp_json: &Path, dataset_json: Option<&Path>) -> Result<()> {
    let json = prediction_json(input, dataset_json, None)?;
    let steps = crate::postprocess::read_steps(pp_json)?;
    let n = crate::postprocess::apply_folder(input, output, &steps, &json.file_ending)?;
    println!("applied {} postprocessing step(s) of {} to {n} label maps into {}", steps.len(), pp_json.display(), output.display());
    Ok(())
}

/// `segk find-best-configuration DATASET -c ..`: nnU-Net's model selection over the trained
/// configurations' cross-validation results (see [`crate::select`]).
pub fn run_find_best(ex: &Experiment, configurations: &[String], plans: &str, trainer: &str, folds: &[String], ensembling: bool) -> Result<()> {
    let root = ex.root.as_path();
    let results = match std::env::var_os("nnUNet_results") {
        Some(r) => PathBuf::from(r).join(dataset_name(root)),
        None => beside(root).join("segk_results").join(dataset_name(root)),
    };
    let candidates: Vec<crate::select::Candidate> = configurations.iter().map(|c| crate::select::Candidate { trainer: trainer.to_string(), plans: plans.to_string(), configuration: c.clone() }).collect();
    println!("comparing {} on folds {} in {}", configurations.join(", "), folds.join(" "), results.display());
    crate::select::find_best(&dataset_name(root), &results, &root.join("labelsTr"), &candidates, folds, ensembling)?;
    println!("wrote {} and {}", results.join("inference_information.json").display(), results.join("inference_instructions.txt").display());
    Ok(())
}
