//! GPU checks: every CUDA kernel against its CPU twin and whole training steps, through
//! `selftest`. Without a GPU they print why they skip (straight to stderr, past the test
//! harness's capture) and the selftest harness itself runs on the f32 CPU backend.

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

/// The emulator reports a kernel whose threads wait at barriers that cannot open, and an
/// unknown kernel, as errors instead of hanging.
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
}
