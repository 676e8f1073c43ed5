//! Training on several ranks without GPUs: each rank a `segk train` process on the fake driver
//! (kernels/emu/driver.c, the kernels emulated), their collectives through the fake NCCL
//! (kernels/emu/nccl.c, shared memory), met over segk's TCP rendezvous. A tiny plan (features
//! 4 and 8, patch 16^3, batch 4) keeps the emulated steps at a second or two.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `segk` with the fake driver and NCCL and `devices` fake GPUs, or None (SKIPPED printed).
fn segk(test: &str, devices: usize) -> Option<Command> {
    let env = match common::fake_driver_env(0) {
        Ok(env) => env,
        Err(why) => {
            eprintln!("SKIPPED {test}: {why}");
            return None;
        }
    };
    let mut c = Command::new(env!("CARGO_BIN_EXE_segk"));
    c.envs(env).env("FAKECUDA_DEVICES", devices.to_string());
    for v in ["nnUNet_preprocessed", "nnUNet_results", "nnUNet_raw", "WORLD_SIZE", "RANK", "LOCAL_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SEGK_GROUP"] {
        c.env_remove(v);
    }
    Some(c)
}

/// A generated dataset with a tiny plans file `tinyPlans` beside nnUNetPlans.
fn tiny_dataset(tag: &str) -> PathBuf {
    let base = std::env::temp_dir().join(format!("segk-dist-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset041_Ranks");
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_segk")).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_raw").output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["synth", root.to_str().unwrap(), "--cases", "5", "--shape", "20,20,20", "--spacing", "1,1,1"]);
    run(&["plan", root.to_str().unwrap()]);
    let pre = base.join("segk_preprocessed/Dataset041_Ranks");
    let mut plans: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(pre.join("nnUNetPlans.json")).unwrap()).unwrap();
    plans["plans_name"] = "tinyPlans".into();
    let c = &mut plans["configurations"]["3d_fullres"];
    c["batch_size"] = 4.into();
    c["patch_size"] = serde_json::json!([16, 16, 16]);
    c["data_identifier"] = "tinyPlans_3d_fullres".into();
    let a = &mut c["architecture"]["arch_kwargs"];
    a["n_stages"] = 2.into();
    a["features_per_stage"] = serde_json::json!([4, 8]);
    a["kernel_sizes"] = serde_json::json!([[3, 3, 3], [3, 3, 3]]);
    a["strides"] = serde_json::json!([[1, 1, 1], [2, 2, 2]]);
    a["n_conv_per_stage"] = serde_json::json!([2, 2]);
    a["n_conv_per_stage_decoder"] = serde_json::json!([2]);
    std::fs::write(pre.join("tinyPlans.json"), serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    // nnU-Net plans per-sample Dice for this 3d_fullres (no lowres); the same with batch Dice.
    assert_eq!(plans["configurations"]["3d_fullres"]["batch_dice"], false);
    plans["plans_name"] = "tinyBatchPlans".into();
    plans["configurations"]["3d_fullres"]["batch_dice"] = true.into();
    plans["configurations"]["3d_fullres"]["data_identifier"] = "tinyBatchPlans_3d_fullres".into();
    std::fs::write(pre.join("tinyBatchPlans.json"), serde_json::to_string_pretty(&plans).unwrap()).unwrap();
    root
}

fn train_args(root: &Path, out: &Path, epochs: usize, iters: usize) -> Vec<String> {
    let mut a: Vec<String> = ["train", root.to_str().unwrap(), "3d_fullres", "all", "-p", "tinyPlans", "--val-iters", "1", "--workers", "1", "--no-validation", "--seed", "7"].iter().map(|s| s.to_string()).collect();
    a.extend(["--epochs".into(), epochs.to_string(), "--iters-per-epoch".into(), iters.to_string(), "--out".into(), out.display().to_string()]);
    a
}

fn ok(out: Output, what: &str) -> String {
    let text = format!("{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what}:\n{text}");
    text
}

/// The weight tensors of a checkpoint (the conv and head weights; biases before a norm and
/// norm parameters are compared too, in absolute terms).
fn tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut v: Vec<(String, Vec<f32>)> = st.tensors().into_iter().filter(|(n, _)| !n.starts_with("momentum")).map(|(n, t)| (n, t.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Largest difference between two checkpoints, relative to each tensor's largest value (at
/// least 1e-2, so that tensors of near-zero values count in absolute terms).
fn largest_difference(a: &Path, b: &Path) -> f64 {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(ta.len(), tb.len());
    let mut worst: f64 = 0.0;
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        let scale = va.iter().map(|v| v.abs() as f64).fold(1e-2, f64::max);
        let d = va.iter().zip(vb).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max);
        worst = worst.max(d / scale);
    }
    worst
}

fn train_losses(log: &Path) -> Vec<f64> {
    let text = std::fs::read_to_string(log).unwrap_or_else(|e| panic!("{}: {e}", log.display()));
    text.lines().filter(|l| l.starts_with("epoch")).map(|l| l.split("train loss ").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap()).collect()
}

/// Starts a rank with a launcher's variables `vars`.
fn launch(cmd: Command, args: &[String], vars: &[(&str, String)], timeout_s: &str) -> Child {
    let mut c = cmd;
    c.args(args).envs(vars.iter().map(|(k, v)| (*k, v.as_str()))).env("SEGK_DIST_TIMEOUT", timeout_s).env("SEGK_GROUP", "1").stdout(Stdio::piped()).stderr(Stdio::piped());
    c.spawn().unwrap()
}

/// Starts rank `rank` of `size` with torchrun-style variables.
fn rank(cmd: Command, args: &[String], rank: usize, size: usize, port: u16, timeout_s: &str) -> Child {
    let vars = [("WORLD_SIZE", size.to_string()), ("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string()), ("MASTER_ADDR", "127.0.0.1".into()), ("MASTER_PORT", port.to_string())];
    launch(cmd, args, &vars, timeout_s)
}

/// Until the ranks have met (the output folder is made once NCCL is joined) and trained a little.
fn wait_until_training(out: &Path) {
    let t0 = Instant::now();
    while !out.exists() {
        assert!(t0.elapsed() < Duration::from_secs(120), "the ranks never started training");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Two ranks (`--devices`; srun's and mpirun's variables: the same bits) and four
/// (torchrun-style variables, one sample each) train as one process with the same global batch: the same samples and the same first loss, bit for bit
/// (every rank merges all ranks' loss partials in sample order), and weights equal up to the
/// order of the sums over the batch inside the weight gradients (a rank sums its own samples,
/// NCCL sums the ranks): stated as 1e-3 of each tensor's scale after two steps (measured
/// 3e-4; a gradient wrong by even 10 % would move the norm biases by 1e-2 of theirs). One rank
/// through the ranks' path (SEGK_GROUP=1: rendezvous, NCCL at world size 1) is bit-identical,
/// and so are gradients summed in many small buckets overlapped with the backward pass.
/// Only rank 0 writes.
#[test]
fn ranks_train_as_one_process_with_the_same_global_batch() {
    let name = "ranks_train_as_one_process_with_the_same_global_batch";
    let Some(_) = segk(name, 4) else { return };
    let root = tiny_dataset("same");
    let base = root.parent().unwrap().to_path_buf();
    let run = |tag: &str| base.join(format!("runs/{tag}/fold_all"));
    let one = ok(segk(name, 4).unwrap().args(train_args(&root, &run("one"), 1, 2)).args(["--device", "cuda:0"]).output().unwrap(), "one process");
    assert!(!one.contains("rank 0 of"), "{one}");
    let two = ok(segk(name, 4).unwrap().args(train_args(&root, &run("two"), 1, 2)).args(["--devices", "cuda:0,cuda:1"]).output().unwrap(), "--devices cuda:0,cuda:1");
    assert!(two.contains("training: 2 processes, one per GPU (cuda:0, cuda:1)") && two.contains("rank 0 of 2") && two.contains("samples 0..2 of each batch of 4"), "{two}");
    assert_eq!(two.matches("epoch    0").count(), 1, "only rank 0 prints epochs:\n{two}");
    // Gradients summed in 1 KB buckets while the backward pass goes on (each stream operation
    // up to 300 us late, to widen the windows an ordering mistake would show in): the same bits.
    let buckets = segk(name, 4).unwrap().args(train_args(&root, &run("buckets"), 1, 2)).args(["--devices", "cuda:0,cuda:1"]).env("SEGK_GRAD_BUCKET_KB", "1").env("FAKECUDA_DELAY_US", "300").output().unwrap();
    ok(buckets, "1 KB buckets");
    assert_eq!(tensors(&run("two").join("checkpoint_final.safetensors")), tensors(&run("buckets").join("checkpoint_final.safetensors")), "buckets change no bit");
    // The same two ranks started by srun and by Open MPI's mpirun (their variables): the same bits.
    for launcher in ["srun", "mpirun"] {
        let (args, port) = (train_args(&root, &run(launcher), 1, 2), free_port());
        let children: Vec<Child> = (0..2)
            .map(|r| {
                let vars = match launcher {
                    "srun" => vec![("SLURM_PROCID", r.to_string()), ("SLURM_STEP_NUM_TASKS", "2".into()), ("SLURM_LOCALID", r.to_string()), ("SLURM_STEP_NODELIST", "localhost".into()), ("MASTER_PORT", port.to_string())],
                    _ => vec![("OMPI_COMM_WORLD_RANK", r.to_string()), ("OMPI_COMM_WORLD_SIZE", "2".into()), ("OMPI_COMM_WORLD_LOCAL_RANK", r.to_string()), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2".into()), ("MASTER_PORT", port.to_string())],
                };
                launch(segk(name, 4).unwrap(), &args, &vars, "120")
            })
            .collect();
        let texts: Vec<String> = children.into_iter().enumerate().map(|(r, c)| ok(c.wait_with_output().unwrap(), &format!("{launcher} rank {r}"))).collect();
        assert!(texts[0].contains(&format!("rank 0 of 2 ({launcher}")), "{}", texts[0]);
        assert_eq!(tensors(&run("two").join("checkpoint_final.safetensors")), tensors(&run(launcher).join("checkpoint_final.safetensors")), "two ranks by {launcher}");
    }
    let port = free_port();
    let args = train_args(&root, &run("four"), 1, 2);
    let children: Vec<Child> = (0..4).map(|r| rank(segk(name, 4).unwrap(), &args, r, 4, port, "120")).collect();
    for (r, c) in children.into_iter().enumerate() {
        ok(c.wait_with_output().unwrap(), &format!("rank {r} of 4"));
    }
    let (l1, l2, l4) = (train_losses(&run("one").join("training_log.txt")), train_losses(&run("two").join("training_log.txt")), train_losses(&run("four").join("training_log.txt")));
    assert_eq!(l1.len(), 1);
    assert!((l1[0] - l2[0]).abs() < 1e-3 && (l1[0] - l4[0]).abs() < 1e-3, "train loss: one process {l1:?}, two ranks {l2:?}, four {l4:?}");
    for tag in ["two", "four"] {
        let d = largest_difference(&run("one").join("checkpoint_final.safetensors"), &run(tag).join("checkpoint_final.safetensors"));
        eprintln!("{tag} ranks vs one process: largest weight difference {d:.2e} of the tensor's scale");
        assert!(d < 1e-3, "{tag} ranks: weights {d:.2e} apart from one process's");
    }
    // Batch Dice (one set of Dice terms over the global batch) as well as per-sample Dice.
    let batch_dice = |tag: &str, extra: &[&str]| {
        let mut a = train_args(&root, &run(tag), 1, 2);
        a[5] = "tinyBatchPlans".into();
        ok(segk(name, 4).unwrap().args(a).args(extra).output().unwrap(), tag);
        train_losses(&run(tag).join("training_log.txt"))
    };
    let (b1, b2) = (batch_dice("batch-one", &["--device", "cuda:0"]), batch_dice("batch-two", &["--devices", "cuda:0,cuda:1"]));
    assert!((b1[0] - b2[0]).abs() < 1e-3, "batch Dice: one process {b1:?}, two ranks {b2:?}");
    let d = largest_difference(&run("batch-one").join("checkpoint_final.safetensors"), &run("batch-two").join("checkpoint_final.safetensors"));
    assert!(d < 1e-3, "batch Dice, two ranks: weights {d:.2e} apart");
    // One rank through the ranks' path: the same bits as the plain process.
    let alone = rank(segk(name, 4).unwrap(), &train_args(&root, &run("group1"), 1, 2), 0, 1, free_port(), "120");
    let text = ok(alone.wait_with_output().unwrap(), "one rank through NCCL");
    assert!(text.contains("rank 0 of 1"), "{text}");
    assert_eq!(tensors(&run("one").join("checkpoint_final.safetensors")), tensors(&run("group1").join("checkpoint_final.safetensors")), "world size 1 through NCCL");
    // A resumed run may change the number of ranks: 2 ranks for the first epoch, 1 for the second.
    let mixed = run("mixed");
    ok(segk(name, 4).unwrap().args(train_args(&root, &mixed, 1, 2)).args(["--devices", "cuda:0,cuda:1"]).output().unwrap(), "first epoch on two ranks");
    ok(segk(name, 4).unwrap().args(train_args(&root, &mixed, 2, 2)).args(["--device", "cuda:0", "--resume"]).output().unwrap(), "second epoch on one");
    ok(segk(name, 4).unwrap().args(train_args(&root, &run("one2"), 2, 2)).args(["--device", "cuda:0"]).output().unwrap(), "two epochs on one");
    let d = largest_difference(&run("one2").join("checkpoint_final.safetensors"), &mixed.join("checkpoint_final.safetensors"));
    assert!(d < 2e-3, "resumed on another number of ranks: weights {d:.2e} apart");
    // Prediction on two GPUs: each process a part of the cases, together every case, each as
    // one process predicts it.
    let model = run("one").parent().unwrap().to_path_buf();
    let predict = |out: &str, devices: &[&str]| {
        let o = segk(name, 4).unwrap().args(["predict", "-i", root.join("imagesTr").to_str().unwrap(), "-o", base.join(out).to_str().unwrap(), "-m", model.to_str().unwrap(), "--no-tta"]).args(devices).output().unwrap();
        ok(o, out)
    };
    predict("pred1", &["--device", "cuda:0"]);
    let text = predict("pred2", &["--devices", "cuda:0,cuda:1"]);
    assert!(text.contains("prediction: 2 processes"), "{text}");
    for k in 0..5 {
        let f = format!("case_{k:04}.nii.gz");
        let (a, b) = (segk::imageio::read(&base.join("pred1").join(&f)).unwrap(), segk::imageio::read(&base.join("pred2").join(&f)).unwrap());
        assert!(a.data == b.data, "{f}: predicted on two GPUs unlike on one");
    }
    // A batch the ranks cannot share evenly is refused with the reason.
    let three = segk(name, 4).unwrap().args(train_args(&root, &run("three"), 1, 1)).args(["--devices", "cuda:0-2"]).output().unwrap();
    let err = String::from_utf8_lossy(&three.stderr);
    assert!(!three.status.success() && err.contains("batch of 4 cannot be split over 3 ranks") && err.contains("failed first"), "{err}");
}

/// A rank killed mid-run, or one that stops answering (SIGSTOP), stops every other rank
/// within the time limits, the lost rank named; a collective that never completes stops every
/// rank after the timeout; none hangs. Ctrl-C at a rank other than 0 stops the run where rank 0
/// saves it.
#[test]
fn a_lost_rank_stops_the_others_with_its_name() {
    let name = "a_lost_rank_stops_the_others_with_its_name";
    let Some(_) = segk(name, 2) else { return };
    let root = tiny_dataset("lost");
    let base = root.parent().unwrap().to_path_buf();
    for (victim, signal, says) in [(1usize, "KILL", "rank 1 (pid"), (0, "STOP", "rank 0 (pid")] {
        let out = base.join(format!("runs/{signal}/fold_all"));
        let args = train_args(&root, &out, 3, 100);
        let port = free_port();
        let mut ranks: Vec<Child> = (0..2).map(|r| rank(segk(name, 2).unwrap(), &args, r, 2, port, "6")).collect();
        wait_until_training(&out);
        let pid = ranks[victim].id().to_string();
        assert!(Command::new("kill").args(["-s", signal, &pid]).status().unwrap().success());
        let t0 = Instant::now();
        let survivor = ranks.remove(1 - victim);
        let o = survivor.wait_with_output().unwrap();
        let waited = t0.elapsed();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert_eq!(o.status.code(), Some(3), "the survivor exits with status 3 after {signal}:\n{err}");
        assert!(err.contains(says) && err.contains(&pid), "the lost rank is named:\n{err}");
        let cause = if signal == "KILL" { "exited or lost its connection" } else { "sent nothing for" };
        assert!(err.contains(cause), "{err}");
        assert!(waited < Duration::from_secs(30), "stopped after {waited:?}");
        let mut victim = ranks.remove(0);
        let _ = victim.kill();
        let _ = Command::new("kill").args(["-s", "CONT", &pid]).status();
        let _ = victim.wait();
    }
    // A collective that never completes (rank 1's fifth: FAKENCCL_HANG_AT), so no rank makes
    // progress: rank 0 stops the run after the timeout, NCCL aborted on every rank.
    let out = base.join("runs/HANG/fold_all");
    let args = train_args(&root, &out, 3, 100);
    let port = free_port();
    let ranks: Vec<Child> = (0..2)
        .map(|r| {
            let mut cmd = segk(name, 2).unwrap();
            if r == 1 {
                cmd.env("FAKENCCL_HANG_AT", "5");
            }
            rank(cmd, &args, r, 2, port, "6")
        })
        .collect();
    let t0 = Instant::now();
    let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let err: Vec<String> = outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert_eq!((outs[0].status.code(), outs[1].status.code()), (Some(3), Some(3)), "{err:?}");
    // "no rank made progress" or, when one rank got further before it blocked, "rank(s) k made none".
    assert!(err[0].contains("progress in training for"), "{}", err[0]);
    assert!(err[1].contains("collective 5 hangs") && err[1].contains("progress in training for"), "{}", err[1]);
    assert!(t0.elapsed() < Duration::from_secs(90), "stopped after {:?}", t0.elapsed());
    // Ctrl-C at any rank: rank 0 stops the run at its next step, saves checkpoint_latest, and
    // the others stop with rank 0's word.
    let out = base.join("runs/INT/fold_all");
    let args = train_args(&root, &out, 3, 100);
    let port = free_port();
    let ranks: Vec<Child> = (0..2).map(|r| rank(segk(name, 2).unwrap(), &args, r, 2, port, "30")).collect();
    wait_until_training(&out);
    assert!(Command::new("kill").args(["-s", "INT", &ranks[1].id().to_string()]).status().unwrap().success());
    let outs: Vec<Output> = ranks.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let err: Vec<String> = outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    assert_eq!((outs[0].status.code(), outs[1].status.code()), (Some(1), Some(3)), "{err:?}");
    assert!(err[0].contains("interrupted at epoch 0") && err[0].contains("saved checkpoint_latest"), "{}", err[0]);
    assert!(err[1].contains("rank 0 stopped the run: interrupted"), "{}", err[1]);
    assert!(out.join("checkpoint_latest.safetensors").exists());
}
