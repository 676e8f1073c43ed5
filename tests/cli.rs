//! The binary as users run it.

use std::process::Command;

fn segk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_segk")).args(args).output().expect("segk runs")
}

#[test]
fn bench_step_prints_stable_json() {
    let out = segk(&["bench", "step", "--features", "4,8,8", "--patch", "8x8x8", "--batch", "2", "--warmup", "0", "--steps", "2", "--checkpointing", "1", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    for key in ["step_median_s", "forward_median_s", "backward_median_s", "gflops_per_s", "gflop_forward", "gflop_backward", "activation_bytes", "param_bytes", "params"] {
        assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{key} missing or not positive: {v}");
    }
    assert_eq!(v["checkpointing"], 1);
    assert_eq!(v["spec"]["patch"], serde_json::json!([8, 8, 8]));
}

#[test]
fn bench_step_table_names_every_figure() {
    let out = segk(&["bench", "step", "--features", "4,8", "--patch", "8,8,8", "--warmup", "0", "--steps", "1"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for label in ["device", "work/step", "step ", "forward+loss", "backward", "throughput", "memory"] {
        assert!(text.contains(label), "missing {label:?} in\n{text}");
    }
}

#[test]
fn bad_input_gets_one_clear_error() {
    let out = segk(&["bench", "step", "--features", "4,8", "--patch", "7,8,8", "--steps", "1"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("error: ") && err.contains("not divisible"), "{err}");
    if let Some(why) = segk::backend::cuda::unavailable_reason() {
        let out = segk(&["bench", "step", "--device", "cuda", "--features", "4,8", "--patch", "8,8,8"]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--device cuda") && err.contains(&why), "{err}");
    }
    let out = segk(&["bench", "step", "--device", "tpu"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device \"tpu\""));
    let out = segk(&["bench", "step", "--plans", "/nonexistent/plans.json"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/plans.json"));
}

#[test]
fn version_names_commit_and_kernels() {
    let out = segk(&["--version"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with(&format!("segk {}", env!("CARGO_PKG_VERSION"))), "{text}");
    assert!(text.contains("commit "), "{text}");
    let expect = if segk::backend::cuda::KERNELS_EMBEDDED { "CUDA kernels: embedded, sm_80 sm_90" } else { "CUDA kernels: none" };
    assert!(text.contains(expect), "{text}");
}

#[test]
fn doctor_reports_cpus_memory_gpus_and_worker_counts() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_segk")).arg("doctor").env_remove("SEGK_WORKERS").env_remove("nnUNet_n_proc_DA").env("SEGK_PROCESSES", "3").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for want in ["CPUs:", "usable by this process", "memory:", "CUDA", "3 preprocessing workers (from SEGK_PROCESSES)", "augmentation workers"] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
}
