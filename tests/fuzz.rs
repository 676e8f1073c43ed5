//! Every fuzz target (segk::fuzz, run under AFL++ by fuzz/run) replayed on its seed corpus
//! and on random mutations of it for a few seconds (SEGK_FUZZ_SECONDS, default 2 per
//! target): no input may panic or take long. Not coverage-guided; that is fuzz/run's job.
//! A failing input is written to the temporary folder and named; every input AFL++ once
//! found failing stays in tests/fixtures/fuzz_regressions/TARGET/ and is replayed first. A
//! watchdog ends the run, naming the input, when one input takes over 30 s.

use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

fn mutate(r: &mut rand_pcg::Pcg64, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..r.random_range(1..=4) {
        let n = v.len();
        let at = if n == 0 { 0 } else { r.random_range(0..n) };
        match r.random_range(0..7) {
            0 if n > 0 => v[at] ^= 1 << r.random_range(0..8),
            1 if n > 0 => v[at] = [0, 1, 0x7f, 0x80, 0xff][r.random_range(0..5)],
            2 if n >= 4 => {
                let at = at.min(n - 4);
                let x: u32 = [0, u32::MAX, i32::MAX as u32, 1 << 30, 65535, 0x8000_0000][r.random_range(0..6)];
                v[at..at + 4].copy_from_slice(&x.to_le_bytes());
            }
            3 => v.truncate(at),
            4 => {
                let k = r.random_range(1..64);
                let bytes: Vec<u8> = (0..k).map(|_| r.random()).collect();
                v.splice(at..at, bytes);
            }
            5 if n > 0 => {
                let end = (at + r.random_range(1..256)).min(n);
                v.drain(at..end);
            }
            _ if n > 0 => {
                // An ASCII digit run: headers are text, numbers are where sizes hide.
                let digits = ["0", "-1", "999999999", "4294967296", "1e308", "nan", "2"][r.random_range(0..7)];
                v.splice(at..at, digits.bytes());
            }
            _ => v.push(r.random()),
        }
    }
    v
}

/// The input being run (target, bytes) and when it started, for the watchdog.
static CURRENT: std::sync::Mutex<Option<(&'static str, Vec<u8>, Instant)>> = std::sync::Mutex::new(None);

fn watchdog() {
    std::thread::spawn(|| loop {
        std::thread::sleep(Duration::from_secs(1));
        let guard = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((target, input, t0)) = guard.as_ref() {
            if t0.elapsed() > Duration::from_secs(30) {
                let keep = std::env::temp_dir().join(format!("segk-fuzz-hang-{target}.bin"));
                let _ = std::fs::write(&keep, input);
                eprintln!("{target}: input {} has run for over 30 s", keep.display());
                std::process::exit(1);
            }
        }
    });
}

/// The inputs that once failed, by target.
fn regressions(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz_regressions").join(target);
    let mut files: Vec<_> = std::fs::read_dir(dir).map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    files.sort();
    files.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

#[test]
fn every_fuzz_target_survives_its_corpus_and_mutations() {
    watchdog();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let seconds: f64 = std::env::var("SEGK_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(2.0);
    let dir = segk::fuzz::scratch();
    let mut r = rand_pcg::Pcg64::seed_from_u64(2026);
    let mut report = Vec::new();
    for (target, _) in segk::fuzz::TARGETS {
        let seeds = segk::fuzz::seeds(target, &fixtures);
        assert!(!seeds.is_empty(), "{target}: no seeds");
        let replay = [regressions(target), seeds.clone()].concat();
        let t0 = Instant::now();
        let mut runs = 0usize;
        let mut accepted = 0usize;
        let mut i = 0usize;
        while i < replay.len() || t0.elapsed().as_secs_f64() < seconds {
            let input = match replay.get(i) {
                Some(s) => s.clone(),
                None => {
                    let k = r.random_range(0..seeds.len());
                    mutate(&mut r, &seeds[k])
                }
            };
            i += 1;
            let t = Instant::now();
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = Some((target, input.clone(), t));
            let result = std::panic::catch_unwind(|| segk::fuzz::run(target, &input, &dir));
            *CURRENT.lock().unwrap_or_else(|e| e.into_inner()) = None;
            let slow = t.elapsed() > Duration::from_secs(10);
            if result.is_err() || slow {
                let keep = std::env::temp_dir().join(format!("segk-fuzz-failure-{target}-{runs}.bin"));
                std::fs::write(&keep, &input).unwrap();
                panic!("{target}: input {} {}", keep.display(), if slow { "took over 10 s" } else { "panicked" });
            }
            accepted += matches!(result, Ok(Ok(()))) as usize;
            runs += 1;
        }
        // The seeds themselves are valid files: the target reads them.
        report.push(format!("{target}: {runs} inputs, {accepted} read, {} seeds", seeds.len()));
        assert!(accepted >= seeds.len().min(1), "{target}: no input was read");
    }
    eprintln!("{}", report.join("\n"));
    let _ = std::fs::remove_dir_all(&dir);
}
