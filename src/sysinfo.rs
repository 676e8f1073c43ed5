//! What the machine offers this process: CPUs and memory, cgroup limits included.

/// Bytes of host memory this process may still use: MemAvailable, capped by a cgroup
/// (v2 memory.max, or v1 limit_in_bytes) minus what the cgroup already uses.
pub fn host_memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let avail = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024;
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let cgroup = match (read("/sys/fs/cgroup/memory.max"), read("/sys/fs/cgroup/memory.current")) {
        (Some(max), Some(cur)) => Some(max.saturating_sub(cur)),
        _ => match (read("/sys/fs/cgroup/memory/memory.limit_in_bytes"), read("/sys/fs/cgroup/memory/memory.usage_in_bytes")) {
            (Some(max), Some(cur)) if max < (1 << 60) => Some(max.saturating_sub(cur)),
            _ => None,
        },
    };
    Some(cgroup.map_or(avail, |c| c.min(avail)))
}


/// CPUs the machine has (online), whatever this process may use.
pub fn online_cpus() -> usize {
    std::fs::read_to_string("/proc/cpuinfo").map(|s| s.lines().filter(|l| l.starts_with("processor")).count()).unwrap_or(0).max(1)
}

/// The cgroup CPU quota in CPUs, when one is set (v2 cpu.max, or v1 cfs quota/period).
pub fn cgroup_cpu_quota() -> Option<f64> {
    if let Ok(s) = std::fs::read_to_string("/sys/fs/cgroup/cpu.max") {
        let mut it = s.split_whitespace();
        let (q, p) = (it.next()?, it.next()?.parse::<f64>().ok()?);
        return q.parse::<f64>().ok().map(|q| q / p);
    }
    let read = |p: &str| std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<f64>().ok());
    match (read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")) {
        (Some(q), Some(p)) if q > 0.0 => Some(q / p),
        _ => None,
    }
}

/// MemTotal in bytes.
pub fn host_memory_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    Some(meminfo.lines().find(|l| l.starts_with("MemTotal:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Size of /dev/shm in bytes (what PyTorch's loaders need --ipc=host for; segk does not use it).
pub fn dev_shm_bytes() -> Option<u64> {
    let out = std::process::Command::new("df").args(["-k", "--output=size", "/dev/shm"]).output().ok()?;
    String::from_utf8_lossy(&out.stdout).lines().nth(1)?.trim().parse::<u64>().ok().map(|k| k * 1024)
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Bytes for messages: GiB with two decimals, MiB or KiB below (so a small request is not "0.00 GiB").
pub fn bytes_text(bytes: u64) -> String {
    let b = bytes as f64;
    if bytes >= 1 << 30 {
        format!("{:.2} GiB", gib(bytes))
    } else if bytes >= 1 << 20 {
        format!("{:.1} MiB", b / (1u64 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// This process's peak resident memory so far (VmHWM), in bytes.
pub fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

/// Where a progress bar cannot be drawn (output to a file, a batch job's log), one line per
/// item done instead, on stderr as the bar would be, so the log still shows progress and
/// stdout stays what the command prints (JSON included).
pub fn log_when_hidden(bar: &indicatif::ProgressBar, item: &str) {
    if bar.is_hidden() {
        eprintln!("  {item} done ({}/{}, {:.0} s)", bar.position(), bar.length().unwrap_or(0), bar.elapsed().as_secs_f64());
    }
}

/// "1 case", "2 cases": a count with its noun.
pub fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// `segk doctor`: what segk sees -- CPUs and quota, memory, /dev/shm, GPUs, the driver, and
/// the worker counts it would pick (`version`: segk's long version on one line).
pub fn doctor(version: &str) -> anyhow::Result<()> {
    println!("segk {version}");
    let cpus = crate::threads::Cpus::detect();
    println!("CPUs: {} online, {}", cpus.online, cpus.describe());
    match (host_memory_total(), host_memory_available()) {
        (Some(t), Some(a)) => println!("memory: {:.1} GiB total, {:.1} GiB available to this process (cgroup limit included)", gib(t), gib(a)),
        _ => println!("memory: unknown (/proc/meminfo unreadable)"),
    }
    match dev_shm_bytes() {
        Some(b) => println!("/dev/shm: {:.1} GiB (segk's workers are threads: it needs none, so no --ipc=host)", gib(b)),
        None => println!("/dev/shm: not found (segk does not need it)"),
    }
    match crate::backend::cuda::unavailable_reason() {
        Some(why) if !crate::backend::cuda::KERNELS_EMBEDDED => println!("CUDA: {why}"),
        _ => match crate::backend::cuda::gpus() {
            Ok(list) => {
                for g in list {
                    println!("GPU cuda:{}: {}, sm_{}{}, {:.1} GiB free of {:.1} GiB", g.ordinal, g.name, g.compute_capability.0, g.compute_capability.1, gib(g.free_bytes), gib(g.total_bytes));
                }
            }
            Err(why) => println!("CUDA: {why}"),
        },
    }
    if let Some(lib) = crate::backend::cuda::driver_library() {
        println!("NVIDIA driver: {lib}, CUDA {}", crate::backend::cuda::driver_cuda_version().unwrap_or_else(|| "?".into()));
    }
    match crate::backend::cuda::nccl::describe() {
        Ok(v) => println!("{v}: several GPUs can train one run (--devices, srun, mpirun; in a container NCCL wants /dev/shm of 1 GiB or more)"),
        Err(why) => println!("NCCL: {} (needed only to train on several GPUs)", why.trim_start_matches("NCCL ")),
    }
    println!("would use (override with --threads, --workers, --processes or the variables named):");
    for line in crate::threads::doctor_lines(&cpus, &crate::threads::global(), &crate::threads::process_env)? {
        println!("  {line}");
    }
    Ok(())
}
