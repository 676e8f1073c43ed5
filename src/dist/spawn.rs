//! `--devices cuda:0,cuda:1,...` on one node: segk starts one process per GPU (itself, with
//! the torchrun-style variables for training, or one part of the cases each for prediction)
//! and watches them; the first to fail is named, and the others are stopped if their own
//! watchdog has not stopped them already.

use anyhow::{bail, Context, Result};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// The GPU ordinals of `--devices`: "cuda:0,cuda:1", "0,1", or "cuda:0-3".
pub fn parse_devices(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let p = part.strip_prefix("cuda:").unwrap_or(part);
        let bad = || anyhow::anyhow!("--devices: {part:?} is not a GPU (use cuda:0,cuda:1,... or cuda:0-3)");
        match p.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                anyhow::ensure!(a <= b, bad());
                out.extend(a..=b);
            }
            None => out.push(p.parse().map_err(|_| bad())?),
        }
    }
    anyhow::ensure!(!out.is_empty(), "--devices {s:?} names no GPU");
    let mut seen = out.clone();
    seen.sort_unstable();
    seen.dedup();
    anyhow::ensure!(seen.len() == out.len(), "--devices {s:?} names a GPU twice: NCCL runs one rank per GPU");
    Ok(out)
}

/// This command line without `--devices`, `--device` and `--num-gpus` (and their values).
pub fn strip_device_flags(args: &[String]) -> Vec<String> {
    const FLAGS: [&str; 4] = ["--devices", "--device", "--num-gpus", "--num_gpus"];
    let mut out = Vec::new();
    let mut skip = false;
    for a in args {
        if std::mem::take(&mut skip) {
            continue;
        }
        match a.split_once('=') {
            _ if FLAGS.contains(&a.as_str()) => skip = true,
            Some((flag, _)) if FLAGS.contains(&flag) => {}
            _ => out.push(a.clone()),
        }
    }
    out
}

/// A free TCP port on this host for the ranks' rendezvous.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port for the ranks")?.local_addr()?.port())
}

static TERMINATE: AtomicBool = AtomicBool::new(false);

/// SIGTERM to this process reaches the ranks; SIGINT (a terminal's Ctrl-C reaches every
/// process of the group by itself) is left to them. Set once the ranks run: they must not
/// inherit an ignored SIGINT.
#[cfg(unix)]
fn forward_signals() {
    extern "C" fn on_term(_: i32) {
        TERMINATE.store(true, Relaxed);
    }
    // SAFETY: the handler only stores an atomic.
    unsafe {
        libc::signal(libc::SIGTERM, on_term as extern "C" fn(i32) as libc::sighandler_t);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}

/// Runs one process per device: `argv(k, device)` is rank k's command line (after the
/// program) and `env(k)` its extra variables. Returns when all have ended; an error names the
/// first rank that failed.
pub fn run(what: &str, devices: &[usize], argv: impl Fn(usize, usize) -> Vec<String>, env: impl Fn(usize) -> Vec<(String, String)>) -> Result<()> {
    let exe = std::env::current_exe().context("finding segk's own executable")?;
    let mut ranks: Vec<(usize, Child)> = Vec::new();
    for (k, &d) in devices.iter().enumerate() {
        let child = Command::new(&exe).args(argv(k, d)).envs(env(k)).spawn().with_context(|| format!("starting rank {k} on cuda:{d}"));
        match child {
            Ok(c) => ranks.push((d, c)),
            Err(e) => {
                for (_, c) in &mut ranks {
                    let _ = c.kill();
                }
                return Err(e);
            }
        }
    }
    #[cfg(unix)]
    forward_signals();
    println!("{what}: {} processes, one per GPU ({})", ranks.len(), devices.iter().map(|d| format!("cuda:{d}")).collect::<Vec<_>>().join(", "));
    let mut ended: Vec<Option<ExitStatus>> = vec![None; ranks.len()];
    let mut first_failure: Option<(usize, ExitStatus, Instant)> = None;
    // After a failure the others' watchdogs stop them within their silence limit; past this
    // they are killed.
    let grace = Duration::from_secs(60);
    while ended.iter().any(Option::is_none) {
        std::thread::sleep(Duration::from_millis(100));
        if TERMINATE.swap(false, Relaxed) {
            for (_, c) in ranks.iter().enumerate().filter(|(k, _)| ended[*k].is_none()).map(|(_, r)| r) {
                // SAFETY: sends a signal to a child we started and have not reaped.
                unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            }
        }
        for (k, (_, c)) in ranks.iter_mut().enumerate() {
            if ended[k].is_some() {
                continue;
            }
            if let Some(st) = c.try_wait()? {
                ended[k] = Some(st);
                // A rank stopped for another's fault (status 3) is not the one to name.
                let stopped = st.code() == Some(crate::dist::group::EXIT_STOPPED);
                match &first_failure {
                    _ if st.success() => {}
                    None => first_failure = Some((k, st, Instant::now())),
                    Some((_, f, at)) if f.code() == Some(crate::dist::group::EXIT_STOPPED) && !stopped => first_failure = Some((k, st, *at)),
                    Some(_) => {}
                }
            }
        }
        if let Some((_, _, at)) = first_failure {
            if at.elapsed() > grace {
                for (k, (_, c)) in ranks.iter_mut().enumerate().filter(|(k, _)| ended[*k].is_none()) {
                    eprintln!("{what}: rank {k} still running {:.0} s after the first failure: killed", grace.as_secs_f64());
                    let _ = c.kill();
                }
            }
        }
    }
    if let Some((k, st, _)) = first_failure {
        bail!("{what}: rank {k} (cuda:{}) failed first ({st}); its error is above", ranks[k].0);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_lists() {
        assert_eq!(parse_devices("cuda:0,cuda:1").unwrap(), vec![0, 1]);
        assert_eq!(parse_devices("2,5").unwrap(), vec![2, 5]);
        assert_eq!(parse_devices("cuda:0-3").unwrap(), vec![0, 1, 2, 3]);
        assert!(parse_devices("cuda:0,cuda:0").unwrap_err().to_string().contains("twice"));
        assert!(parse_devices("cpu").unwrap_err().to_string().contains("not a GPU"));
        assert!(parse_devices("").is_err());
    }

    #[test]
    fn device_flags_are_stripped() {
        let a: Vec<String> = ["train", "D", "3d_fullres", "0", "--devices", "cuda:0,cuda:1", "--device=cuda", "--epochs", "2", "--device", "cpu", "--num-gpus", "2", "--num_gpus=2"].iter().map(|s| s.to_string()).collect();
        assert_eq!(strip_device_flags(&a), ["train", "D", "3d_fullres", "0", "--epochs", "2"]);
    }
}
