#![allow(dead_code)]
//! Shared test helpers: seeded random tensors (seed printed, fresh per run unless
//! SEGK_TEST_SEED is set) and error measures.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

pub fn rng(tag: &str) -> Pcg64 {
    let seed = std::env::var("SEGK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{tag}: seed {seed} (set SEGK_TEST_SEED={seed} to repeat)");
    Pcg64::seed_from_u64(seed)
}

/// Like [`rng`], but seeded with `default` unless SEGK_TEST_SEED is set: for checks where
/// some inputs are legitimately unusable (finite differences straddling a LeakyReLU kink deep
/// in a net) and a fresh seed would make CI flaky rather than find bugs.
pub fn rng_seeded(tag: &str, default: u64) -> Pcg64 {
    let seed = std::env::var("SEGK_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(default);
    eprintln!("{tag}: seed {seed} (set SEGK_TEST_SEED to try another)");
    Pcg64::seed_from_u64(seed)
}

pub fn randn(rng: &mut Pcg64, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
}

/// ||a - b|| / max(||b||, tiny); NaN anywhere gives infinity.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    if a.iter().chain(b).any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum::<f64>().sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Central finite differences of `f` at `x` for the listed indices.
pub fn numeric_grad(x: &mut [f64], idx: &[usize], f: &mut dyn FnMut(&[f64]) -> f64) -> Vec<f64> {
    let eps = 1e-6;
    idx.iter()
        .map(|&i| {
            let v = x[i];
            x[i] = v + eps;
            let fp = f(x);
            x[i] = v - eps;
            let fm = f(x);
            x[i] = v;
            (fp - fm) / (2.0 * eps)
        })
        .collect()
}

/// Up to `k` distinct random indices below `n`.
pub fn pick(rng: &mut Pcg64, n: usize, k: usize) -> Vec<usize> {
    if n <= k {
        return (0..n).collect();
    }
    let mut v: Vec<usize> = (0..k).map(|_| rng.random_range(0..n)).collect();
    v.sort();
    v.dedup();
    v
}

pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The fake NVIDIA driver of this build (kernels/emu/driver.c, whose GPU is the kernel
/// emulator): the environment that makes a child process load it for `--device cuda`, or why
/// there is none (no C compiler, no emulator, or no nvcc for the embedded kernels).
pub fn fake_driver_env(delay_us: u32) -> Result<Vec<(String, String)>, String> {
    let dir = option_env!("SEGK_FAKE_CUDA_DIR").unwrap_or("");
    if dir.is_empty() {
        return Err("this build has no fake driver (kernels/emu/driver.c did not build)".into());
    }
    if !segk::backend::cuda::KERNELS_EMBEDDED {
        return Err("built without nvcc: no kernels to load through the fake driver".into());
    }
    let report = std::path::Path::new(dir).parent().unwrap().join("ptxas-report.txt");
    Ok(vec![
        ("LD_LIBRARY_PATH".into(), dir.into()),
        ("FAKECUDA_PTXAS_REPORT".into(), report.display().to_string()),
        ("FAKECUDA_DELAY_US".into(), delay_us.to_string()),
    ])
}

/// Whether the body of test `name` should run here: true in the child this starts (the same
/// test binary, run with the fake driver loaded, which dlopen only picks up at process start,
/// each stream operation up to `delay_us` late);
/// false in the parent, after asserting the child passed, and when there is no fake driver
/// (printed as SKIPPED with the reason).
pub fn run_on_fake_driver(name: &str, delay_us: u32) -> bool {
    use std::io::Write;
    if std::env::var("SEGK_ON_FAKE_DRIVER").is_ok_and(|v| v == "1") {
        return true;
    }
    let env = match fake_driver_env(delay_us) {
        Ok(env) => env,
        Err(why) => {
            let _ = writeln!(std::io::stderr(), "SKIPPED {name}: {why}");
            return false;
        }
    };
    let out = std::process::Command::new(std::env::current_exe().unwrap()).args(["--exact", name, "--nocapture", "--test-threads", "1"]).envs(env).env("SEGK_ON_FAKE_DRIVER", "1").output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("1 passed"), "{name} on the fake driver:\n{stdout}\n{stderr}");
    false
}
