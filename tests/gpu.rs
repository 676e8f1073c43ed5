//! GPU checks: every CUDA kernel against its CPU twin and whole training steps, through
//! `selftest`. Without a GPU they print why they skip (straight to stderr, past the test
//! harness's capture) and the selftest harness itself runs on the f32 CPU backend.

mod common;

use segk::backend::cpu::CpuBackend;
use segk::backend::cuda::{unavailable_reason, CudaBackend};
use segk::selftest::{self, Bounds, Check};
use std::io::Write;

fn seed() -> u64 {
    std::env::var("SEGK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64)
}

fn assert_all_pass(checks: &[Check], what: &str) {
    assert!(checks.len() > 60, "{what}: only {} checks ran", checks.len());
    let failed: Vec<String> = checks.iter().filter(|c| !c.passed()).map(|c| format!("{} err {:.3e} > {:.0e}", c.name, c.err, c.bound)).collect();
    assert!(failed.is_empty(), "{what}: {} failed:\n{}", failed.len(), failed.join("\n"));
}

#[test]
fn selftest_harness_on_cpu_f32() {
    let s = seed();
    eprintln!("seed {s}");
    let checks = selftest::run(&CpuBackend::<f32>::new(), &Bounds::CPU_F32, s).unwrap();
    assert_all_pass(&checks, "cpu f32 vs f64");
}

/// The CPU's bf16 convolutions (AVX512-BF16) through every check the GPU takes.
#[test]
fn selftest_on_cpu_bf16() {
    let Some(be) = CpuBackend::<f32>::with_bf16_products() else {
        println!("SKIPPED selftest_on_cpu_bf16: this CPU has no AVX512-BF16");
        return;
    };
    let s = seed();
    eprintln!("seed {s}");
    let checks = selftest::run(&be, &Bounds::CPU_BF16, s).unwrap();
    assert_all_pass(&checks, "cpu bf16 vs f64");
}

#[test]
fn selftest_rejects_nan_and_mismatch() {
    assert_eq!(selftest::rel_err(&[f32::NAN, 1.0], &[1.0, 1.0]), f64::INFINITY);
    assert!(selftest::rel_err(&[1.1], &[1.0]) > 0.09);
    assert!(!Check { name: "x".into(), err: f64::INFINITY, bound: 1.0 }.passed());
}

#[test]
fn cuda_kernels_match_cpu_twins() {
    if let Some(why) = unavailable_reason() {
        let _ = writeln!(std::io::stderr(), "SKIPPED cuda_kernels_match_cpu_twins: {why}");
        return;
    }
    let be = CudaBackend::new(0).unwrap();
    let s = seed();
    let _ = writeln!(std::io::stderr(), "cuda selftest on {} (seed {s})", segk::backend::Backend::name(&be));
    let mut be = be;
    let checks = selftest::run_cuda(&mut be, s).unwrap();
    selftest::report(&checks);
    assert_all_pass(&checks, "cuda vs cpu");
}

/// The CUDA backend with every kernel run by the CPU emulator (kernels/emu): the kernels'
/// indexing, tails, barriers and mma fragment layout, the backend's launches and workspace, and
/// whole steps at checkpoint levels 0/1/2, against the CPU twins, on any machine with a C++
/// compiler at build time.
#[test]
fn emulated_cuda_kernels_match_cpu_twins() {
    let be = match CudaBackend::emulated() {
        Ok(be) => be,
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED emulated_cuda_kernels_match_cpu_twins: {e}");
            return;
        }
    };
    let s = seed();
    let _ = writeln!(std::io::stderr(), "emulated cuda selftest (seed {s})");
    let mut be = be;
    let checks = selftest::run_cuda(&mut be, s).unwrap();
    assert_all_pass(&checks, "emulated cuda vs cpu");
}

/// The emulator reports a kernel whose threads wait at barriers that cannot open, an unknown
/// kernel, and a misaligned vector access as errors instead of hanging or passing.
#[test]
fn the_emulator_reports_bad_launches() {
    let Ok(_) = CudaBackend::emulated() else {
        let _ = writeln!(std::io::stderr(), "SKIPPED the_emulator_reports_bad_launches: no emulator in this build");
        return;
    };
    let cfg = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (32, 1, 1), shared_mem_bytes: 0 };
    let e = unsafe { segk::backend::cuda::emu::launch("segk_no_such_kernel", cfg, &mut []) }.unwrap_err().to_string();
    assert!(e.contains("no kernel named segk_no_such_kernel"), "{e}");
    let bad = cudarc::driver::LaunchConfig { grid_dim: (1, 1, 1), block_dim: (2048, 1, 1), shared_mem_bytes: 0 };
    let e = unsafe { segk::backend::cuda::emu::launch("segk_fill_f32", bad, &mut []) }.unwrap_err().to_string();
    assert!(e.contains("invalid"), "{e}");
    let mut out = [0i32; 32];
    let ptr = out.as_mut_ptr();
    let e = unsafe { segk::backend::cuda::emu::launch("segk_emu_check_divergent", cfg, &mut [&ptr as *const _ as *mut std::ffi::c_void]) }.unwrap_err().to_string();
    assert!(e.contains("divergent"), "{e}");
    let mut f = [0f64; 2];
    let ptr = f.as_mut_ptr();
    let e = unsafe { segk::backend::cuda::emu::launch("segk_emu_check_misaligned", cfg, &mut [&ptr as *const _ as *mut std::ffi::c_void]) }.unwrap_err().to_string();
    assert!(e.contains("misaligned address: a 8-byte access"), "{e}");
}

/// GPU reductions sum in a fixed order: whole training steps (every kernel of forward, loss,
/// backward, gradient norm and update, bf16 and f32 activations) give the same bits when the
/// emulator runs the blocks of each launch, and the warps between barriers, in two different
/// shuffled orders -- as they run in a different order from run to run on a GPU. (A float
/// atomicAdd into shared memory in the loss, as it was, fails this.)
#[test]
fn training_steps_are_bit_identical_under_shuffled_schedules() {
    use segk::backend::cuda::{emu, Dt};
    use segk::backend::Backend;
    use segk::model::unet::Acts;
    use segk::model::{Checkpointing, Topology, UNet};
    let Ok(mut be) = CudaBackend::emulated() else {
        let _ = writeln!(std::io::stderr(), "SKIPPED training_steps_are_bit_identical_under_shuffled_schedules: no emulator in this build");
        return;
    };
    let topo = Topology::isotropic(1, 3, vec![8, 16, 32]);
    let (patch, batch) = ([16, 16, 16], 2);
    let vox = batch * 16 * 16 * 16;
    let image: Vec<f32> = (0..vox).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 250.0).collect();
    let labels: Vec<u8> = (0..vox).map(|i| ((i / 301) % 3) as u8).collect();
    for dt in [Dt::Bf16, Dt::F32] {
        be.set_activations(dt);
        let run = |seed: u64| {
            emu::set_schedule(seed).unwrap();
            let mut net = UNet::new(&be, topo.clone(), 7).unwrap();
            let acts = Acts::new(&be, &topo, patch, batch, Checkpointing::Level1, true).unwrap();
            let losses: Vec<u64> = (0..2).map(|_| net.train_step(&be, &acts, &image, &labels, 0.01).unwrap().total.to_bits()).collect();
            let mut params = vec![0f32; net.n_params()];
            be.download(net.params(&be), &mut params).unwrap();
            (losses, params.iter().map(|v| v.to_bits()).collect::<Vec<u32>>())
        };
        let (a, b) = (run(1), run(2));
        assert_eq!(a.0, b.0, "{dt:?}: losses differ between schedules");
        let differ = a.1.iter().zip(&b.1).filter(|(x, y)| x != y).count();
        assert_eq!(differ, 0, "{dt:?}: {differ} of {} parameters differ between schedules", a.1.len());
    }
    // The schedules are really shuffled: the turn each thread of 4 blocks of 64 gets.
    let order = |seed: u64| {
        emu::set_schedule(seed).unwrap();
        let mut out = vec![0i32; 1 + 256];
        let ptr = out.as_mut_ptr();
        let cfg = cudarc::driver::LaunchConfig { grid_dim: (4, 1, 1), block_dim: (64, 1, 1), shared_mem_bytes: 0 };
        unsafe { emu::launch("segk_emu_check_order", cfg, &mut [&ptr as *const _ as *mut std::ffi::c_void]) }.unwrap();
        out[1..].to_vec()
    };
    let (plain, one, two) = (order(0), order(1), order(2));
    assert_eq!(plain, (1..=256).collect::<Vec<i32>>(), "seed 0: grid and thread order");
    assert!(one != plain && two != plain && one != two, "shuffled orders differ");
    // Threads within a block are shuffled; blocks too, though a launch may draw grid order
    // (1 in 24 for 4 blocks, and the draw depends on every launch before it, other tests'
    // included): one of eight launches in another block order.
    assert!(one[..64].windows(2).any(|w| w[1] < w[0]), "threads shuffled: {:?}", &one[..64]);
    let block_order = |o: &[i32]| o.chunks(64).map(|c| (c[0] - 1) / 64).collect::<Vec<i32>>();
    assert!((0..8).any(|_| block_order(&order(1)) != vec![0, 1, 2, 3]), "blocks shuffled");
    let mut sorted = one.clone();
    sorted.sort();
    assert_eq!(sorted, plain, "every thread ran once");
    emu::set_schedule(0).unwrap();
}

/// A driver older than the kernels' CUDA release refuses the module: the error says both
/// versions and what to do (the fake driver plays a CUDA 12.4 driver).
#[test]
fn an_old_driver_is_named_with_both_versions() {
    let Some(mut env) = fake_env_or_skip("an_old_driver_is_named_with_both_versions", 0) else { return };
    env.push(("FAKECUDA_DRIVER_VERSION".into(), "12040".into()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["selftest", "--device", "cuda", "--only", "misc"]).envs(env).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let built = format!("built by nvcc {}", option_env!("SEGK_NVCC_RELEASE").unwrap_or("?"));
    assert!(stderr.contains("CUDA_ERROR_UNSUPPORTED_PTX_VERSION") && stderr.contains("supports CUDA 12.4") && stderr.contains(&built) && stderr.contains("update the NVIDIA driver"), "{stderr}");
    assert!(stderr.contains("fakecuda/libcuda.so"), "names the library loaded: {stderr}");
}

/// The CUDA toolkit's stub libcuda (every call answers CUDA_ERROR_STUB_LIBRARY) is named as a
/// stub, with its path, by doctor and by --device cuda.
#[test]
fn the_stub_libcuda_is_named_as_such() {
    let Some(mut env) = fake_env_or_skip("the_stub_libcuda_is_named_as_such", 0) else { return };
    env.push(("FAKECUDA_STUB".into(), "1".into()));
    let doctor = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("doctor").envs(env.clone()).output().unwrap();
    let stdout = String::from_utf8_lossy(&doctor.stdout);
    assert!(stdout.contains("the CUDA toolkit's stub") && stdout.contains("fakecuda/libcuda.so"), "{stdout}");
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["selftest", "--device", "cuda"]).envs(env).output().unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("the CUDA toolkit's stub"), "{stderr}");
}

/// The fake driver's environment for a child process, or None after printing why the test
/// `name` skips.
fn fake_env_or_skip(name: &str, delay_us: u32) -> Option<Vec<(String, String)>> {
    common::fake_driver_env(delay_us).map_err(|why| writeln!(std::io::stderr(), "SKIPPED {name}: {why}")).ok()
}

/// A generated raw dataset of 3 small cases under a fresh temporary `base`: (base, root).
fn tiny_dataset(tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = std::env::temp_dir().join(format!("segk-fake-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset034_Fake");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["synth", "--cases", "3", "--shape", "24,32,32", "--spacing", "1,1,1"]).arg(&root).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (base, root)
}

/// `segk train ROOT all --device cuda` on the fake driver with `env` (killed after 120 s, so a
/// hang fails with exit 124): (exit code, stdout, stderr).
fn train_on_fake(root: &std::path::Path, out: &std::path::Path, iters: &str, env: &[(String, String)]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new("timeout")
        .arg("120")
        .arg(env!("CARGO_BIN_EXE_segk"))
        .arg("train")
        .arg(root)
        .args(["all", "--device", "cuda", "--epochs", "1", "--iters-per-epoch", iters, "--val-iters", "1", "--workers", "1", "--out"])
        .arg(out)
        .env_remove("nnUNet_preprocessed")
        .env_remove("nnUNet_results")
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// `segk selftest --device cuda` through the fake driver (kernels/emu/driver.c): the CUDA
/// backend's own driver path -- cudarc's context, module load of the embedded fatbin, function
/// lookup, launches with their arguments copied, stream-ordered allocation, copies and events,
/// with the kernels on the emulator, against the CPU twins.
#[test]
fn selftest_command_on_the_fake_driver() {
    let Some(env) = fake_env_or_skip("selftest_command_on_the_fake_driver", 20) else { return };
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["selftest", "--device", "cuda"]).envs(env).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("selftest on cuda:0 (fake GPU") && stdout.contains(" passed, 0 failed"), "{stdout}");
    assert!(!stderr.contains("fake libcuda"), "the fake driver refused something:\n{stderr}");
    // Each family announced before its checks, for every storage type.
    for family in ["-- conv [f32 acts]", "-- step [bf16 acts]", "-- conv [bf16 acts, simple conv]"] {
        assert!(stdout.contains(family), "{family}: {stdout}");
    }
}

/// A kernel that faults mid-selftest: the checks done so far are already printed (each as it
/// completed), the closing line counts them, and the run names where it stopped.
#[test]
fn a_selftest_stopped_by_a_fault_says_where() {
    let Some(mut env) = fake_env_or_skip("a_selftest_stopped_by_a_fault_says_where", 0) else { return };
    // Launch 60 falls in the second conv case's passes.
    env.push(("FAKECUDA_FAIL_LAUNCH".into(), "60".into()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).args(["selftest", "--device", "cuda", "--only", "conv,loss"]).envs(env).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{stdout}");
    let ok_lines = stdout.lines().filter(|l| l.starts_with("  ok ")).count();
    assert!(ok_lines >= 1, "checks before the fault are printed: {stdout}");
    assert!(stdout.contains(&format!("{ok_lines} passed, 0 failed")), "{stdout}");
    assert!(stdout.contains("selftest stopped in conv [f32 acts] after check '[f32 acts] conv_"), "{stdout}");
    assert!(stdout.contains("CUDA_ERROR_LAUNCH_FAILED") && stderr.contains("CUDA_ERROR_LAUNCH_FAILED"), "{stdout}\n{stderr}");
    assert!(!stdout.contains("-- loss"), "the run stops at the fault: {stdout}");
}

/// The fake driver refuses what a GPU refuses, so that a run on it that passes means something:
/// more than 1024 threads, dynamic shared memory over 48 KiB not allowed first, more registers
/// than the SM has (from the ptxas report), a kernel not in the fatbin, pointers outside live
/// device memory, a write past the end of an allocation; and it runs a good launch.
#[test]
fn the_fake_driver_refuses_what_a_gpu_refuses() {
    if !common::run_on_fake_driver("the_fake_driver_refuses_what_a_gpu_refuses", 0) {
        return;
    }
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.new_stream().unwrap();
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_binary(segk::backend::cuda::FATBIN.to_vec())).unwrap();
    let fill = module.load_function("segk_fill_f32").unwrap();
    let buf = stream.alloc_zeros::<f32>(1000).unwrap();
    let (n, value) = (1000i64, 1.5f32);
    let cfg = |threads: u32, smem: u32| LaunchConfig { grid_dim: (2, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: smem };
    let launch = |f: &cudarc::driver::CudaFunction, cfg: LaunchConfig| {
        let mut b = stream.launch_builder(f);
        b.arg(&buf).arg(&n).arg(&value);
        unsafe { b.launch(cfg) }.map(|_| ()).map_err(|e| format!("{e:?}"))
    };
    launch(&fill, cfg(256, 0)).unwrap();
    assert!(stream.clone_dtoh(&buf).unwrap().iter().all(|&v| v == 1.5));
    assert!(launch(&fill, cfg(2048, 0)).unwrap_err().contains("INVALID_VALUE"));
    assert!(launch(&fill, cfg(256, 64 << 10)).unwrap_err().contains("INVALID_VALUE"));
    // 120-odd registers a thread: 1024 threads need twice the SM's 64K registers.
    let conv = module.load_function("segk_conv_fprop_pipe_n128").unwrap();
    assert!(launch(&conv, cfg(1024, 0)).unwrap_err().contains("OUT_OF_RESOURCES"));
    assert!(module.load_function("segk_no_such_kernel").is_err());
    // Pointer arguments must address live device memory: not host memory, not a freed buffer.
    let raw = |ptr: u64, n: i64| {
        let mut b = stream.launch_builder(&fill);
        b.arg(&ptr).arg(&n).arg(&value);
        unsafe { b.launch(cfg(256, 0)) }.map(|_| ()).map_err(|e| format!("{e:?}"))
    };
    let host = vec![0f32; 16];
    assert!(raw(host.as_ptr() as u64, 16).unwrap_err().contains("INVALID_VALUE"));
    let gone = stream.alloc_zeros::<f32>(16).unwrap();
    let gone_ptr = { cudarc::driver::DevicePtr::device_ptr(&gone, &stream).0 };
    drop(gone);
    assert!(raw(gone_ptr, 16).unwrap_err().contains("INVALID_VALUE"));
    // One value past the end of 1001 lands in the allocation's slack: the kernel is reported
    // and the context is lost, as after an out-of-bounds write on a GPU (the guard page beyond
    // the slack stops a process outright; README, "The fake driver").
    let odd = stream.alloc_zeros::<f32>(1001).unwrap();
    let odd_ptr = { cudarc::driver::DevicePtr::device_ptr(&odd, &stream).0 };
    raw(odd_ptr, 1001).unwrap();
    stream.synchronize().unwrap();
    raw(odd_ptr, 1002).unwrap();
    assert!(format!("{:?}", stream.synchronize().unwrap_err()).contains("LAUNCH_FAILED"));
}

/// Training on a GPU too small for the plan stops before the first step, with the numbers and
/// the remedies (a smaller patch, more checkpointing), on the fake driver's 30 MB GPU.
#[test]
fn train_refuses_a_gpu_too_small_with_numbers() {
    let Some(mut env) = fake_env_or_skip("train_refuses_a_gpu_too_small_with_numbers", 0) else { return };
    env.push(("FAKECUDA_MEM_BYTES".into(), "30000000".into()));
    let (base, root) = tiny_dataset("small");
    let (code, stdout, stderr) = train_on_fake(&root, &base.join("out"), "1", &env);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("fake GPU"), "{stdout}");
    // Every level was tried, so the advice is a smaller plan, not more checkpointing.
    assert!(stderr.contains("level 2:") && stderr.contains("GiB is free") && stderr.contains("--gpu-memory 0.") && !stderr.contains("--checkpointing 2"), "{stderr}");
    let _ = std::fs::remove_dir_all(&base);
}

/// Device faults in the middle of a run, on the fake driver: memory taken by someone else after
/// the pre-flight (every allocation fails once a kernel ran), and a kernel that faults. Each
/// stops training within seconds with one error saying what happened and what to do -- the
/// OOM after saving checkpoint_latest -- and no thread left hanging.
#[test]
fn device_faults_mid_run_stop_training_with_a_clear_error() {
    let Some(env) = fake_env_or_skip("device_faults_mid_run_stop_training_with_a_clear_error", 0) else { return };
    let (base, root) = tiny_dataset("fault");
    let with = |k: &str, v: &str| [env.clone(), vec![(k.to_string(), v.to_string())]].concat();
    let (code, _, oom) = train_on_fake(&root, &base.join("oom"), "2", &with("FAKECUDA_OOM_AFTER_LAUNCHES", "1"));
    assert_eq!(code, Some(1), "exit 124 is a hang\n{oom}");
    assert!(oom.contains("saved checkpoint_latest at epoch 0") && oom.contains("ran out of memory beyond what the pre-flight counted") && oom.contains("--checkpointing 2"), "{oom}");
    assert!(base.join("oom/checkpoint_latest.safetensors").exists(), "{oom}");
    // Steps do not wait for the device: the fault surfaces where the epoch's numbers are read.
    let (code, _, fault) = train_on_fake(&root, &base.join("fault"), "2", &with("FAKECUDA_FAIL_LAUNCH", "5"));
    assert_eq!(code, Some(1), "exit 124 is a hang\n{fault}");
    assert!(fault.contains("CUDA_ERROR_LAUNCH_FAILED") && fault.contains("GPU context is lost") && fault.contains("CUDA_LAUNCH_BLOCKING=1"), "{fault}");
    assert!(fault.contains("training stopped at epoch 0 iteration ") && fault.matches("CUDA_ERROR_LAUNCH_FAILED").count() == 1, "said once: {fault}");
    let _ = std::fs::remove_dir_all(&base);
}

/// nnU-Net's ResEnc M preset through the CUDA backend's driver path on the fake driver: `segk
/// train -p nnUNetResEncUNetMPlans --checkpointing 2` runs its ResidualEncoderUNet's steps and
/// `segk predict --device cuda` reads the model back; its labels agree with the CPU's
/// prediction of the same model (bf16 activations against f32: near-ties may differ).
#[test]
fn resenc_preset_trains_and_predicts_on_the_fake_driver() {
    let Some(env) = fake_env_or_skip("resenc_preset_trains_and_predicts_on_the_fake_driver", 0) else { return };
    let base = std::env::temp_dir().join(format!("segk-fake-resenc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let root = base.join("Dataset037_FakeResEnc");
    let segk = |args: &[&str], env: &[(String, String)]| {
        let out = std::process::Command::new("timeout").arg("300").arg(env!("CARGO_BIN_EXE_segk")).args(args).env_remove("nnUNet_preprocessed").env_remove("nnUNet_results").envs(env.iter().cloned()).output().unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "segk {args:?}: {text}");
        text
    };
    segk(&["synth", root.to_str().unwrap(), "--cases", "2", "--shape", "12,12,12", "--spacing", "1,1,1"], &[]);
    let model = base.join("segk_results/Dataset037_FakeResEnc/segkTrainer__nnUNetResEncUNetMPlans__3d_fullres");
    let text = segk(&["train", root.to_str().unwrap(), "3d_fullres", "all", "-p", "nnUNetResEncUNetMPlans", "--device", "cuda", "--checkpointing", "2", "--epochs", "1", "--iters-per-epoch", "1", "--val-iters", "1", "--workers", "1", "--no-validation"], &env);
    assert!(text.contains("ResidualEncoderUNet") && text.contains("fake GPU") && text.contains("checkpointing level 2"), "{text}");
    assert!(!text.contains("fake libcuda"), "the fake driver refused something:\n{text}");
    let images = root.join("imagesTr");
    let predict = |device: &str, env: &[(String, String)]| {
        let out = base.join(format!("pred-{device}"));
        segk(&["predict", "-i", images.to_str().unwrap(), "-o", out.to_str().unwrap(), "-m", model.to_str().unwrap(), "-f", "all", "--device", device, "--no-tta"], env);
        segk::imageio::read(&out.join("case_0000.nii.gz")).unwrap().data
    };
    let (gpu, cpu) = (predict("cuda", &env), predict("cpu", &[]));
    assert_eq!(gpu.len(), 12 * 12 * 12);
    let same = gpu.iter().zip(&cpu).filter(|(a, b)| a == b).count() as f64 / cpu.len() as f64;
    eprintln!("GPU and CPU labels agree on {:.1} % of voxels", 100.0 * same);
    assert!(same >= 0.98, "GPU and CPU labels agree on {:.1} % of voxels", 100.0 * same);
    let _ = std::fs::remove_dir_all(&base);
}
