//! scripts/gpu-check.sh itself, run end to end at toy sizes (SMOKE=1) on the fake driver
//! (kernels/emu/driver.c), so that a lent GPU's minutes go to measuring: its three output
//! files and nothing else, the selftest's count line and each bench step's median in the
//! summary, one JSON object per step in results.json, and steps past the deadline skipped
//! with their lines. Without a fake driver both tests print why they skip.

mod common;

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `segk bench step` steps of the script, in its order.
const BENCH_STEPS: [&str; 6] = [
    "step-6stage-128cube-ckpt1",
    "step-5stage-80x96x80-ckpt0",
    "step-6stage-128cube-ckpt1-simple-conv",
    "step-6stage-128cube-ckpt0",
    "step-6stage-128cube-ckpt2",
    "kernels",
];

/// Every step the script records in results.json whatever happens (nvidia-smi only where it
/// is on PATH; the reruns only after a failed selftest).
const STEPS: [&str; 13] = [
    "version",
    "doctor",
    "selftest",
    "step-6stage-128cube-ckpt1",
    "torch-6stage-128cube",
    "step-5stage-80x96x80-ckpt0",
    "torch-5stage-80x96x80",
    "kernels",
    "step-6stage-128cube-ckpt1-simple-conv",
    "step-6stage-128cube-ckpt0",
    "step-6stage-128cube-ckpt2",
    "criterion-gpu",
    "racecheck-conv",
];

struct Run {
    code: Option<i32>,
    files: BTreeSet<String>,
    summary: String,
    log: String,
    results: Vec<serde_json::Map<String, serde_json::Value>>,
    output: String,
}

impl Run {
    fn step(&self, name: &str) -> &serde_json::Map<String, serde_json::Value> {
        self.results.iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no {name} in results.json:\n{}", self.dump()))
    }

    fn status(&self, name: &str) -> &str {
        self.step(name)["status"].as_str().unwrap()
    }

    /// The summary's lines of step `name`: its status line and the indented lines under it.
    fn summary_of(&self, name: &str) -> Vec<&str> {
        let is_its_line = |l: &str| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w.as_slice() {
                ["ok" | "FAILED" | "CUT", n, ..] | ["TIMED", "OUT", n, ..] => *n == name,
                _ => l.starts_with(&format!("skipped {name}: ")),
            }
        };
        let mut lines = self.summary.lines().skip_while(|l| !is_its_line(*l));
        let first = lines.next().unwrap_or_else(|| panic!("no line for {name} in summary.txt:\n{}", self.dump()));
        std::iter::once(first).chain(lines.take_while(|l| l.starts_with("    "))).collect()
    }

    fn dump(&self) -> String {
        let tail: Vec<&str> = self.log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        format!("exit {:?}, files {:?}\n--- summary.txt\n{}\n--- all.log (last 40 lines)\n{}\n--- the script's output\n{}", self.code, self.files, self.summary, tail.join("\n"), self.output)
    }
}

fn fake_env_or_skip(name: &str) -> Option<Vec<(String, String)>> {
    common::fake_driver_env(20).map_err(|why| writeln!(std::io::stderr(), "SKIPPED {name}: {why}")).ok()
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("segk-gpu-check-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// `bash scripts/gpu-check.sh DIR` with SMOKE=1, this build's segk, the fake driver's
/// environment and `extra` (killed after 300 s, so a hang fails with exit 124).
fn run_script(dir: &Path, env: &[(String, String)], extra: &[(&str, &str)]) -> Run {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/gpu-check.sh");
    let out = std::process::Command::new("timeout")
        .arg("300")
        .arg("bash")
        .arg(&script)
        .arg(dir)
        .env("SEGK_BIN", env!("CARGO_BIN_EXE_segk"))
        .env("SMOKE", "1")
        // No sanitizer on the fake driver, whatever this machine has.
        .env("COMPUTE_SANITIZER", "none")
        .env_remove("DEADLINE")
        .env_remove("SEGK_GPU_BENCH_BIN")
        .env_remove("SELFTEST_ONLY")
        .envs(env.iter().cloned())
        .envs(extra.iter().map(|&(k, v)| (k.to_string(), v.to_string())))
        .output()
        .unwrap();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let files: BTreeSet<String> = std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let (summary, log, results_text) = (read("summary.txt"), read("all.log"), read("results.json"));
    let mut run = Run { code: out.status.code(), files, summary, log, results: Vec::new(), output };
    for (i, line) in results_text.lines().enumerate() {
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(m)) => run.results.push(m),
            other => panic!("results.json line {}: not a JSON object ({other:?}): {line}\n{}", i + 1, run.dump()),
        }
    }
    run
}

/// What every run must hold: only the three files, a status for every step, the exit status
/// that the statuses call for, and the closing line.
fn assert_well_formed(run: &Run) {
    let allowed: BTreeSet<String> = ["summary.txt", "all.log", "results.json"].iter().map(|s| s.to_string()).collect();
    assert!(run.files == allowed, "expected exactly {allowed:?}\n{}", run.dump());
    for r in &run.results {
        assert!(r.get("name").is_some_and(|v| v.is_string()) && r.get("command").is_some_and(|v| v.is_string()), "{r:?}\n{}", run.dump());
        let status = r.get("status").and_then(|v| v.as_str()).unwrap_or("");
        assert!(["ok", "failed", "skipped", "timeout", "cut"].contains(&status), "status {status:?} in {r:?}");
        assert!(r.get("seconds").is_some_and(|v| v.is_number()), "{r:?}");
        assert!(r.contains_key("exit_code"), "{r:?}");
        if status == "skipped" {
            let name = r["name"].as_str().unwrap();
            let reason = r.get("reason").and_then(|v| v.as_str()).unwrap_or_else(|| panic!("{name} skipped with no reason: {r:?}"));
            assert!(run.summary.contains(&format!("skipped {name}: {reason}")), "no skip line for {name}\n{}", run.dump());
        }
    }
    for name in STEPS {
        run.step(name);
    }
    let bad = run.results.iter().any(|r| r["status"] == "failed" || r["status"] == "timeout");
    assert_eq!(run.code, Some(if bad { 1 } else { 0 }), "exit status against the steps' statuses\n{}", run.dump());
    let last = run.summary.lines().last().unwrap_or("");
    assert!(last.starts_with("done in ") && last.ends_with(&format!("exit {}", run.code.unwrap())), "closing line {last:?}\n{}", run.dump());
}

#[test]
fn gpu_check_script_runs_end_to_end_on_the_fake_driver() {
    let Some(env) = fake_env_or_skip("gpu_check_script_runs_end_to_end_on_the_fake_driver") else { return };
    let dir = out_dir("smoke");
    // One quick selftest family (under a second; the whole selftest through the fake driver
    // takes a minute): this checks the script, tests/gpu.rs the selftest.
    let run = run_script(&dir, &env, &[("SELFTEST_ONLY", "loss")]);
    assert_eq!(run.code, Some(0), "{}", run.dump());
    assert_well_formed(&run);
    assert_eq!(run.status("version"), "ok");
    assert_eq!(run.status("doctor"), "ok");
    assert!(run.summary_of("doctor").iter().any(|l| l.contains("GPU cuda:0: fake GPU")), "{}", run.dump());

    // The selftest: its count line in the summary, its counts in results.json.
    assert_eq!(run.status("selftest"), "ok", "{}", run.dump());
    let counts: Vec<&str> = run.summary_of("selftest").into_iter().filter(|l| l.trim_start().split_once(" passed, ").is_some_and(|(p, f)| p.parse::<usize>().is_ok() && f == "0 failed")).collect();
    assert_eq!(counts.len(), 1, "no 'N passed, 0 failed' line under the selftest\n{}", run.dump());
    let s = run.step("selftest");
    assert!(s["passed"].as_u64().is_some_and(|n| n > 0) && s["failed"] == 0, "{s:?}");

    // Every bench step ran, with its median line and memory line in the summary and its median
    // in results.json.
    for name in BENCH_STEPS {
        assert_eq!(run.status(name), "ok", "{name}\n{}", run.dump());
        if name == "kernels" {
            continue;
        }
        let lines = run.summary_of(name);
        assert!(lines.iter().any(|l| l.trim_start().starts_with("step median ")), "{name}: no median line\n{}", run.dump());
        assert!(lines.iter().any(|l| l.trim_start().starts_with("memory ")), "{name}: no memory line\n{}", run.dump());
        assert!(run.step(name)["step_median_s"].as_f64().is_some_and(|v| v > 0.0), "{name}: {:?}", run.step(name));
    }
    assert!(run.summary_of("step-6stage-128cube-ckpt1-simple-conv").iter().any(|l| l.contains("simple conv")), "SEGK_CONV=simple did not take\n{}", run.dump());

    // No GPU here: no torch step can run, and no sanitizer was given.
    for name in ["torch-6stage-128cube", "torch-5stage-80x96x80", "criterion-gpu", "racecheck-conv"] {
        assert_eq!(run.status(name), "skipped", "{name}\n{}", run.dump());
    }
    // all.log: every step that ran under a header line with its command.
    for r in run.results.iter().filter(|r| r["status"] != "skipped") {
        let (name, cmd) = (r["name"].as_str().unwrap(), r["command"].as_str().unwrap());
        assert!(run.log.lines().any(|l| l.starts_with("==== ") && l.contains(&format!(" {name} (timeout ")) && l.ends_with(cmd)), "no header for {name} in all.log\n{}", run.dump());
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gpu_check_script_skips_what_its_deadline_leaves_no_time_for() {
    let Some(env) = fake_env_or_skip("gpu_check_script_skips_what_its_deadline_leaves_no_time_for") else { return };
    let dir = out_dir("deadline");
    let run = run_script(&dir, &env, &[("DEADLINE", "3")]);
    assert_well_formed(&run);
    // The selftest needs more than the whole deadline, the last bench step comes after others.
    for name in ["selftest", "step-6stage-128cube-ckpt2"] {
        assert_eq!(run.status(name), "skipped", "{name}\n{}", run.dump());
        let line = run.summary_of(name)[0];
        assert!(line.starts_with(&format!("skipped {name}: ")) && line.contains(" s left, needs ~") && line.ends_with(" s"), "{line}\n{}", run.dump());
    }
    assert!(run.summary.lines().next().is_some_and(|l| l.starts_with("segk GPU check ") && l.contains("deadline 3 s")), "{}", run.dump());
    let _ = std::fs::remove_dir_all(&dir);
}
