//! The ranks' control connections: each rank holds one TCP connection to rank 0 for the whole
//! run. Over it the ranks meet (rendezvous: same run, every rank present, NCCL's unique id
//! handed out), wait for each other ([`Group::sync`]) and watch each other: every second each
//! side sends a beat with its progress, and a connection that breaks, falls silent or stops
//! progressing stops every rank with the rank and cause named (NCCL aborted first, so no rank
//! stays blocked in a collective). Lines of text, so that a stuck run can be read with tcpdump.
//!
//! Messages: HELLO rank size pid host\trun | WELCOME pid host | REFUSE why | BEAT progress |
//! ARRIVE tag | GO tag hex | FAIL why (to rank 0) | STOP why (from rank 0) | SIGNAL | BYE.

use super::World;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Exit status of a rank stopped because another rank failed or the run stalled.
pub const EXIT_STOPPED: i32 = 3;

/// Steps, validation batches and epochs this rank has finished: what the beats carry.
static PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Counts one unit of progress (a step queued, a validation batch, an epoch) for the watchdog.
pub fn tick() {
    PROGRESS.fetch_add(1, Relaxed);
}

/// What the ranks are doing together, when rank 0 should stop a run that makes no progress
/// at it: the training loop (every rank progresses) and NCCL's setup. Elsewhere (preprocessing
/// on rank 0 while the others wait, the validation after training) work may outlast the timeout.
static WATCHED: Mutex<Option<&'static str>> = Mutex::new(None);

/// From here the stall watch applies to `phase` (None: not watched).
pub fn watch_phase(phase: Option<&'static str>) {
    *WATCHED.lock().unwrap_or_else(|p| p.into_inner()) = phase;
}

/// The training loop starts (true) or ends (false).
pub fn training(on: bool) {
    watch_phase(on.then_some("training"));
}

/// A peer that reported its own failure is given this long to be followed by rank 0's own end
/// (an error every rank meets at once, such as a bad label: rank 0 saves checkpoint_latest
/// first); past it rank 0 stops.
const PEER_FAILED_GRACE: Duration = Duration::from_secs(20);

type AbortHook = Box<dyn Fn() + Send + Sync>;
static ABORT_HOOKS: Mutex<Vec<AbortHook>> = Mutex::new(Vec::new());

/// Runs `f` before a rank exits on a fault (NCCL's abort: a blocked collective returns).
pub fn on_abort(f: impl Fn() + Send + Sync + 'static) {
    ABORT_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(f));
}

type CheckHook = Box<dyn Fn() -> Option<String> + Send + Sync>;
static CHECK_HOOKS: Mutex<Vec<CheckHook>> = Mutex::new(Vec::new());

/// `f` is asked every beat whether something failed asynchronously (NCCL's async error): a
/// message stops the run.
pub fn on_check(f: impl Fn() -> Option<String> + Send + Sync + 'static) {
    CHECK_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).push(Box::new(f));
}

/// Time limits: SEGK_DIST_TIMEOUT seconds (default 600) for the rendezvous and for a run that
/// makes no progress; a connection silent for 30 s (or the timeout, when shorter) is lost.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    pub silence: Duration,
}

impl Limits {
    pub fn from_env() -> Result<Limits> {
        let secs = match std::env::var("SEGK_DIST_TIMEOUT") {
            Ok(v) => v.trim().parse::<f64>().ok().filter(|s| *s > 0.0).with_context(|| format!("SEGK_DIST_TIMEOUT={v:?} is not a number of seconds"))?,
            Err(_) => 600.0,
        };
        let timeout = Duration::from_secs_f64(secs);
        Ok(Limits { timeout, silence: timeout.min(Duration::from_secs(30)) })
    }
}

/// One connection: to a peer (on rank 0) or to rank 0 (on a peer).
struct Link {
    rank: usize,
    pid: u32,
    host: String,
    out: Mutex<TcpStream>,
    heard: Mutex<Instant>,
    progress: AtomicU64,
    /// The other side said BYE: its end is not a fault.
    finished: AtomicBool,
}

impl Link {
    fn who(&self) -> String {
        format!("rank {} (pid {} on {})", self.rank, self.pid, self.host)
    }
    fn send(&self, line: &str) {
        let mut s = self.out.lock().unwrap_or_else(|p| p.into_inner());
        let _ = s.write_all(format!("{line}\n").as_bytes());
    }
}

struct Shared {
    world: World,
    links: Vec<Arc<Link>>,
    limits: Limits,
    /// This rank finished or failed on its own: broken connections are expected from here on.
    leaving: AtomicBool,
    fatal: AtomicBool,
    /// A peer's own failure (its FAIL) and when it came.
    peer_failed: Mutex<Option<(String, Instant)>>,
}

impl Shared {
    /// Stops this rank for a fault elsewhere (or a stall): tells the others when it is rank 0,
    /// aborts NCCL, exits. Never returns.
    fn fatal(&self, why: &str) -> ! {
        if self.fatal.swap(true, Relaxed) {
            // Another thread is stopping the rank: it exits once it has said why.
            loop {
                std::thread::park();
            }
        }
        if self.world.rank == 0 {
            for l in &self.links {
                l.send(&format!("STOP {}", one_line(why)));
            }
        }
        eprintln!("error: rank {} of {}: {why}; stopping this rank (checkpoints already written stay loadable: continue with --resume)", self.world.rank, self.world.size);
        for hook in ABORT_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook();
        }
        let _ = std::io::stdout().flush();
        // SAFETY: ends the process without running exit handlers, which could wait on the
        // device the other threads are blocked in.
        unsafe { libc::_exit(EXIT_STOPPED) }
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], "; ")
}

/// The ranks of one run, connected.
pub struct Group {
    shared: Arc<Shared>,
    inbox: Mutex<Receiver<(usize, String)>>,
    done: AtomicBool,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "rank {} of {}", self.shared.world.rank, self.shared.world.size)
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "?".into())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Result<Vec<u8>> {
    anyhow::ensure!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).context("not hex")).collect()
}

impl Group {
    /// Brings the ranks of `world` together at rank 0's address: every rank must arrive within
    /// the timeout and describe the same `run` (plans, configuration, fold, batch: ranks of two
    /// different trainings must not meet). Starts the watchdog.
    pub fn connect(world: &World, run: &str, limits: Limits) -> Result<Group> {
        let run = one_line(run);
        let (tx, inbox) = channel();
        let links = if world.rank == 0 { Self::host(world, &run, limits)? } else { vec![Self::join(world, &run, limits)?] };
        let shared = Arc::new(Shared { world: world.clone(), links, limits, leaving: AtomicBool::new(false), fatal: AtomicBool::new(false), peer_failed: Mutex::new(None) });
        for l in &shared.links {
            let (s, l, tx) = (shared.clone(), l.clone(), tx.clone());
            let reader = l.out.lock().unwrap_or_else(|p| p.into_inner()).try_clone()?;
            std::thread::Builder::new().name(format!("segk-link-{}", l.rank)).spawn(move || read_link(&s, &l, reader, tx))?;
        }
        let s = shared.clone();
        std::thread::Builder::new().name("segk-watchdog".into()).spawn(move || watch(&s))?;
        Ok(Group { shared, inbox: Mutex::new(inbox), done: AtomicBool::new(false) })
    }

    /// Rank 0: listens and takes every other rank's HELLO.
    fn host(world: &World, run: &str, limits: Limits) -> Result<Vec<Arc<Link>>> {
        let addr = format!("0.0.0.0:{}", world.master_port);
        let listener = TcpListener::bind(&addr).with_context(|| format!("rank 0: listening on port {} for the other ranks (MASTER_PORT)", world.master_port))?;
        listener.set_nonblocking(true)?;
        let deadline = Instant::now() + limits.timeout;
        let mut links: Vec<Option<Arc<Link>>> = vec![None; world.size];
        let mut refused = Vec::new();
        while links.iter().skip(1).any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => match hello(stream, world, run, &links) {
                    Ok(link) => {
                        let r = link.rank;
                        links[r] = Some(Arc::new(link));
                    }
                    // Refused alone (a rank of another run, a port scanner): the run goes on waiting.
                    Err(e) => {
                        eprintln!("rank 0: refused a connection from {from}: {e:#}");
                        refused.push(format!("{from}: {e:#}"));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(e).context("rank 0: accepting a rank"),
            }
            if Instant::now() > deadline {
                let missing: Vec<String> = (1..world.size).filter(|&r| links[r].is_none()).map(|r| r.to_string()).collect();
                for l in links.iter().flatten() {
                    l.send("REFUSE the run was called off at rank 0");
                }
                let refused = if refused.is_empty() { String::new() } else { format!("; refused meanwhile: {}", refused.join("; ")) };
                bail!(
                    "ranks {} did not join rank 0 at port {} within {:.0} s (started? MASTER_ADDR={} reachable from them? SEGK_DIST_TIMEOUT sets the wait){refused}",
                    missing.join(", "),
                    world.master_port,
                    limits.timeout.as_secs_f64(),
                    world.master_addr
                );
            }
        }
        let links: Vec<Arc<Link>> = links.into_iter().flatten().collect();
        for l in &links {
            l.send(&format!("WELCOME {} {}", std::process::id(), hostname()));
        }
        Ok(links)
    }

    /// A rank other than 0: connects (retrying until the timeout: rank 0 may start later).
    fn join(world: &World, run: &str, limits: Limits) -> Result<Arc<Link>> {
        let deadline = Instant::now() + limits.timeout;
        let target = format!("{}:{}", world.master_addr, world.master_port);
        let stream = loop {
            // Every address the name resolves to (rank 0 listens on IPv4: "localhost" may come as ::1 first).
            let tried = target.to_socket_addrs().map_err(anyhow::Error::from).and_then(|addrs| {
                let mut last = anyhow::anyhow!("{target} resolves to no address");
                for a in addrs {
                    match TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        Ok(s) => return Ok(s),
                        Err(e) => last = e.into(),
                    }
                }
                Err(last)
            });
            match tried {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    bail!("rank {}: rank 0 at {target} could not be reached within {:.0} s: {e:#} (is rank 0 running? SEGK_DIST_TIMEOUT sets the wait)", world.rank, limits.timeout.as_secs_f64())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        };
        stream.set_nodelay(true)?;
        // A peer that stopped reading must not block this rank's writes (beats, STOP) for long.
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut w = stream.try_clone()?;
        w.write_all(format!("HELLO {} {} {} {}\t{run}\n", world.rank, world.size, std::process::id(), hostname()).as_bytes())?;
        stream.set_read_timeout(Some(deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1))))?;
        let line = read_line_unbuffered(&stream).with_context(|| format!("rank {}: waiting for rank 0 at {target} to admit it", world.rank))?;
        stream.set_read_timeout(None)?;
        let line = line.trim_end();
        if let Some(why) = line.strip_prefix("REFUSE ") {
            bail!("rank {}: rank 0 at {target} refused it: {why}", world.rank);
        }
        let mut f = line.strip_prefix("WELCOME ").with_context(|| format!("rank {}: rank 0 at {target} answered {line:?}", world.rank))?.splitn(2, ' ');
        let pid = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let host = f.next().unwrap_or("?").to_string();
        Ok(Arc::new(Link { rank: 0, pid, host, out: Mutex::new(stream), heard: Mutex::new(Instant::now()), progress: AtomicU64::new(0), finished: AtomicBool::new(false) }))
    }

    pub fn world(&self) -> &World {
        &self.shared.world
    }

    /// Waits until every rank has called `sync` with this `tag`, and returns rank 0's `payload`
    /// on every rank (NCCL's unique id; or nothing, for a plain barrier). No time limit: the
    /// watchdog stops the run when a rank is lost meanwhile.
    pub fn sync(&self, tag: &str, payload: &[u8]) -> Result<Vec<u8>> {
        self.reduce(tag, &[], |_| payload.to_vec())
    }

    /// Every rank's `mine`, in rank order, combined on rank 0 by `combine`; the result on
    /// every rank. For the small numbers of an epoch (validation counts), not for tensors.
    pub fn reduce(&self, tag: &str, mine: &[u8], combine: impl FnOnce(&[Vec<u8>]) -> Vec<u8>) -> Result<Vec<u8>> {
        let s = &self.shared;
        let inbox = self.inbox.lock().unwrap_or_else(|p| p.into_inner());
        if s.world.rank == 0 {
            let mut parts: Vec<Option<Vec<u8>>> = vec![None; s.world.size];
            parts[0] = Some(mine.to_vec());
            while parts.iter().any(Option::is_none) {
                let (rank, msg) = inbox.recv().context("the watchdog ended")?;
                let mut f = msg.splitn(3, ' ');
                match (f.next(), f.next(), f.next()) {
                    (Some("ARRIVE"), Some(t), data) if t == tag => parts[rank] = Some(unhex(data.unwrap_or("")).with_context(|| format!("rank {rank} sent a malformed {tag}"))?),
                    _ => bail!("rank {rank} is at {msg:?}, rank 0 at {tag:?}: the ranks run different steps"),
                }
            }
            let parts: Vec<Vec<u8>> = parts.into_iter().flatten().collect();
            let out = combine(&parts);
            for l in &s.links {
                l.send(&format!("GO {tag} {}", hex(&out)));
            }
            return Ok(out);
        }
        s.links[0].send(&format!("ARRIVE {tag} {}", hex(mine)));
        let (_, msg) = inbox.recv().context("the watchdog ended")?;
        let mut f = msg.splitn(3, ' ');
        match (f.next(), f.next(), f.next()) {
            (Some("GO"), Some(t), data) if t == tag => unhex(data.unwrap_or("")).context("rank 0 sent a malformed payload"),
            _ => bail!("rank {} is at {tag:?}, rank 0 answered {msg:?}: the ranks run different steps", s.world.rank),
        }
    }

    /// The ranks whose `mine` differs from rank 0's, with theirs (every rank gets the answer):
    /// for state all ranks must share (where they resume, their parameters).
    pub fn disagreeing(&self, tag: &str, mine: &str) -> Result<(String, Vec<(usize, String)>)> {
        let all = self.reduce(tag, mine.as_bytes(), |parts| parts.join(&b'\n'))?;
        let all = String::from_utf8_lossy(&all).into_owned();
        let values: Vec<&str> = all.split('\n').collect();
        let odd = values.iter().enumerate().filter(|(_, v)| **v != values[0]).map(|(r, v)| (r, v.to_string())).collect();
        Ok((values[0].to_string(), odd))
    }

    /// Element-wise sums of every rank's `mine` (all the same length), in rank order.
    pub fn sum_u64(&self, tag: &str, mine: &[u64]) -> Result<Vec<u64>> {
        let bytes: Vec<u8> = mine.iter().flat_map(|v| v.to_le_bytes()).collect();
        let n = mine.len();
        let out = self.reduce(tag, &bytes, |parts| {
            let mut sum = vec![0u64; n];
            for p in parts {
                for (k, c) in p.chunks_exact(8).take(n).enumerate() {
                    sum[k] += u64::from_le_bytes(c.try_into().expect("8 bytes"));
                }
            }
            sum.iter().flat_map(|v| v.to_le_bytes()).collect()
        })?;
        anyhow::ensure!(out.len() == 8 * n, "{tag}: rank 0 summed {} bytes, expected {}", out.len(), 8 * n);
        Ok(out.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
    }

    /// This rank is done: the others may end their connections from here.
    pub fn finish(&self) {
        self.leave("BYE");
    }

    /// This rank stops with `e`: rank 0 stops the others with it; another rank tells rank 0.
    pub fn fail(&self, e: &anyhow::Error) {
        let why = one_line(&format!("{e:#}"));
        if self.shared.world.rank == 0 {
            let how = if crate::train::STOP.load(Relaxed) { "stopped the run" } else { "failed" };
            self.leave(&format!("STOP rank 0 {how}: {why}"));
        } else {
            self.leave(&format!("FAIL {why}"));
        }
    }

    fn leave(&self, last: &str) {
        if self.done.swap(true, Relaxed) {
            return;
        }
        self.shared.leaving.store(true, Relaxed);
        for l in &self.shared.links {
            l.send(last);
            let _ = l.out.lock().unwrap_or_else(|p| p.into_inner()).flush();
        }
    }
}

impl Drop for Group {
    /// A rank that leaves without `finish` (a panic) is a failure the others must hear of.
    fn drop(&mut self) {
        if !self.done.load(Relaxed) {
            let e = anyhow::anyhow!("rank {} ended without finishing (a panic?)", self.shared.world.rank);
            let last = if self.shared.world.rank == 0 { format!("STOP rank 0 failed: {e}") } else { format!("FAIL {e}") };
            self.leave(&last);
        }
    }
}

/// One line, read a byte at a time: what follows it stays in the socket for the link's reader.
fn read_line_unbuffered(mut s: &TcpStream) -> Result<String> {
    use std::io::Read;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while line.len() < 1 << 16 {
        match s.read(&mut b)? {
            0 => bail!("the connection closed"),
            _ if b[0] == b'\n' => break,
            _ => line.push(b[0]),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}

/// Rank 0 reads a new connection's HELLO and checks it against the run.
fn hello(stream: TcpStream, world: &World, run: &str, links: &[Option<Arc<Link>>]) -> Result<Link> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let line = read_line_unbuffered(&stream).context("reading its HELLO")?;
    stream.set_read_timeout(None)?;
    let refuse = |why: String| -> Result<Link> {
        let _ = (&stream).write_all(format!("REFUSE {why}\n").as_bytes());
        bail!(why)
    };
    let Some((head, their_run)) = line.trim_end_matches(['\n', '\r']).strip_prefix("HELLO ").and_then(|l| l.split_once('\t')) else {
        return refuse(format!("it did not say HELLO (sent {:?}): another program on port {}?", line.trim_end(), world.master_port));
    };
    let f: Vec<&str> = head.splitn(4, ' ').collect();
    let (Some(rank), Some(size), Some(pid)) = (f.first().and_then(|v| v.parse::<usize>().ok()), f.get(1).and_then(|v| v.parse::<usize>().ok()), f.get(2).and_then(|v| v.parse::<u32>().ok())) else {
        return refuse(format!("malformed HELLO {head:?}"));
    };
    let host = f.get(3).unwrap_or(&"?").to_string();
    if size != world.size {
        return refuse(format!("rank {rank} (pid {pid} on {host}) counts {size} ranks, rank 0 counts {}", world.size));
    }
    if rank == 0 || rank >= size || links[rank].is_some() {
        return refuse(format!("rank {rank} (pid {pid} on {host}) is not a free rank of 1..{size}: two processes with the same rank?"));
    }
    if their_run != run {
        return refuse(format!(
            "rank {rank} (pid {pid} on {host}) runs another training: {their_run:?}, rank 0 runs {run:?} (separate trainings started by one srun or mpirun, such as one fold per task, take SEGK_DIST=0)"
        ));
    }
    Ok(Link { rank, pid, host, out: Mutex::new(stream), heard: Mutex::new(Instant::now()), progress: AtomicU64::new(0), finished: AtomicBool::new(false) })
}

/// Reads one connection until it ends: beats, the other side's end, and messages for `sync`.
fn read_link(s: &Shared, l: &Link, stream: TcpStream, inbox: Sender<(usize, String)>) {
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        *l.heard.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        let (kind, rest) = line.split_once(' ').unwrap_or((line.as_str(), ""));
        match kind {
            "BEAT" => l.progress.store(rest.parse().unwrap_or(0), Relaxed),
            "BYE" => l.finished.store(true, Relaxed),
            "SIGNAL" => crate::train::STOP.store(true, Relaxed),
            "FAIL" => {
                // Its connection ends next; the watchdog stops this rank unless it ends first.
                l.finished.store(true, Relaxed);
                s.peer_failed.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert((format!("{} failed: {rest}", l.who()), Instant::now()));
            }
            "STOP" if !s.leaving.load(Relaxed) => s.fatal(rest),
            "STOP" => l.finished.store(true, Relaxed),
            _ => {
                let _ = inbox.send((l.rank, line.clone()));
            }
        }
    }
    if !l.finished.load(Relaxed) && !s.leaving.load(Relaxed) {
        s.fatal(&format!("{} exited or lost its connection", l.who()));
    }
}

/// Beats every second; stops the run when a connection falls silent, or (rank 0) when no rank
/// has made progress within the timeout; passes a peer's Ctrl-C on to rank 0.
fn watch(s: &Shared) {
    let mut last = (PROGRESS.load(Relaxed), s.links.iter().map(|l| l.progress.load(Relaxed)).collect::<Vec<_>>());
    let mut moved = Instant::now();
    let mut signalled = false;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        if s.leaving.load(Relaxed) {
            return;
        }
        let mine = PROGRESS.load(Relaxed);
        for l in &s.links {
            l.send(&format!("BEAT {mine}"));
        }
        let failed = s.peer_failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((why, at)) = failed.filter(|f| f.1.elapsed() > PEER_FAILED_GRACE) {
            s.fatal(&format!("{why} ({:.0} s ago)", at.elapsed().as_secs_f64()));
        }
        // NCCL's own word, while a peer is still in the run (after every peer's end it may
        // report their leaving).
        if s.links.iter().any(|l| !l.finished.load(Relaxed)) {
            let failed = CHECK_HOOKS.lock().unwrap_or_else(|p| p.into_inner()).iter().find_map(|check| check());
            if let Some(why) = failed {
                s.fatal(&why);
            }
        }
        if s.world.rank != 0 && !signalled && crate::train::STOP.load(Relaxed) {
            // Rank 0 decides where the run stops and saves; this rank follows its STOP.
            signalled = true;
            s.links[0].send("SIGNAL");
        }
        for l in s.links.iter().filter(|l| !l.finished.load(Relaxed)) {
            let quiet = l.heard.lock().unwrap_or_else(|p| p.into_inner()).elapsed();
            if quiet > s.limits.silence {
                s.fatal(&format!("{} sent nothing for {:.0} s (stopped, or its node is unreachable)", l.who(), quiet.as_secs_f64()));
            }
        }
        if s.world.rank != 0 {
            continue;
        }
        let now = (mine, s.links.iter().map(|l| l.progress.load(Relaxed)).collect::<Vec<_>>());
        let phase = *WATCHED.lock().unwrap_or_else(|p| p.into_inner());
        if now != last || phase.is_none() {
            (last, moved) = (now, Instant::now());
            continue;
        }
        if moved.elapsed() > s.limits.timeout {
            let at: Vec<(usize, u64)> = std::iter::once((0, mine)).chain(s.links.iter().map(|l| (l.rank, l.progress.load(Relaxed)))).collect();
            let least = at.iter().map(|a| a.1).min().unwrap_or(0);
            let behind: Vec<String> = at.iter().filter(|a| a.1 == least).map(|a| a.0.to_string()).collect();
            let phase = phase.unwrap_or("training");
            let why = if behind.len() == at.len() {
                format!("no rank made progress in {phase} for {:.0} s (all at {least}): a collective never completed (NCCL stuck? NCCL_DEBUG=WARN says more)", moved.elapsed().as_secs_f64())
            } else {
                format!("rank(s) {} made no progress in {phase} for {:.0} s (at {least}; the others waited for them)", behind.join(", "), moved.elapsed().as_secs_f64())
            };
            s.fatal(&why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    fn world(rank: usize, size: usize, port: u16) -> World {
        World { rank, size, local_rank: rank, local_size: size, master_addr: "127.0.0.1".into(), master_port: port, launcher: "test" }
    }

    const LIMITS: Limits = Limits { timeout: Duration::from_secs(20), silence: Duration::from_secs(20) };

    /// Three ranks meet (the peers before rank 0 listens), share rank 0's payload, pass a
    /// barrier and finish without a fault.
    #[test]
    fn ranks_meet_and_share_rank_0s_id() {
        let port = free_port();
        let peers: Vec<_> = (1..3)
            .map(|r| {
                std::thread::spawn(move || {
                    let g = Group::connect(&world(r, 3, port), "run A", LIMITS).unwrap();
                    let id = g.sync("nccl-id", &[]).unwrap();
                    g.sync("prepared", &[]).unwrap();
                    g.finish();
                    id
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let g = Group::connect(&world(0, 3, port), "run A", LIMITS).unwrap();
        assert_eq!(g.sync("nccl-id", &[1, 2, 255]).unwrap(), vec![1, 2, 255]);
        g.sync("prepared", &[]).unwrap();
        g.finish();
        for p in peers {
            assert_eq!(p.join().unwrap(), vec![1, 2, 255]);
        }
    }

    /// A rank of another training is refused, and both sides say why; rank 0 goes on waiting
    /// for its own rank 1 (which here never comes) and names the refusal when the wait ends.
    #[test]
    fn a_rank_of_another_run_is_refused() {
        let port = free_port();
        let peer = std::thread::spawn(move || Group::connect(&world(1, 2, port), "run B", LIMITS).err().map(|e| e.to_string()));
        let short = Limits { timeout: Duration::from_secs(3), silence: Duration::from_secs(3) };
        let e = Group::connect(&world(0, 2, port), "run A", short).err().unwrap().to_string();
        assert!(e.contains("ranks 1 did not join") && e.contains("runs another training") && e.contains("run B"), "{e}");
        let p = peer.join().unwrap().unwrap();
        assert!(p.contains("refused") && p.contains("another training") && p.contains("SEGK_DIST=0"), "{p}");
    }

    /// A rank that never comes is named when the wait ends.
    #[test]
    fn a_missing_rank_is_named() {
        let port = free_port();
        let short = Limits { timeout: Duration::from_millis(500), silence: Duration::from_millis(500) };
        let e = Group::connect(&world(0, 3, port), "run", short).err().unwrap().to_string();
        assert!(e.contains("ranks 1, 2 did not join"), "{e}");
        let e = Group::connect(&world(2, 3, free_port()), "run", short).err().unwrap().to_string();
        assert!(e.contains("could not be reached"), "{e}");
    }
}
