//! Training on several GPUs: one process per GPU (a rank), started by `segk train --devices`,
//! by `srun`, by `mpirun` or with torchrun-style variables. This module knows who the ranks
//! are ([`World`], from the launcher's variables), brings them together over TCP
//! ([`group::Group`]: rendezvous, NCCL's unique id, barriers) and watches them (a rank that dies,
//! hangs or fails stops every rank with its name). The collectives themselves are NCCL's, on
//! the backend's stream (`backend::cuda::nccl`).

pub mod group;
pub mod spawn;

use anyhow::{bail, Context, Result};

/// The default rendezvous port (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

/// This process's place among the ranks of one training run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct World {
    pub rank: usize,
    pub size: usize,
    /// The rank's index among the ranks on its node: the GPU it takes, unless --device says.
    pub local_rank: usize,
    /// Ranks on this node (1 when the launcher does not say): they share its CPUs.
    pub local_size: usize,
    /// Where rank 0 listens for the others.
    pub master_addr: String,
    pub master_port: u16,
    /// Whose variables said so, for messages.
    pub launcher: &'static str,
}

impl World {
    /// One process alone.
    pub fn single() -> World {
        World { rank: 0, size: 1, local_rank: 0, local_size: 1, master_addr: "127.0.0.1".into(), master_port: DEFAULT_PORT, launcher: "a single process" }
    }
    pub fn is_single(&self) -> bool {
        self.size == 1
    }

    /// The world the launcher's variables describe (`var` reads one; the process environment
    /// in use), or `single` when none does. In order: torchrun-style (WORLD_SIZE, RANK,
    /// LOCAL_RANK, MASTER_ADDR, MASTER_PORT, which `--devices` also sets), Open MPI's mpirun
    /// (OMPI_COMM_WORLD_*), MPICH/Intel MPI (PMI_RANK), srun (SLURM_PROCID within a job step;
    /// after MPI: mpirun inside an allocation leaves the srun variables of its daemons).
    /// SEGK_DIST=0: one process, whatever the launcher says (separate trainings, such as one
    /// fold per task, started by one srun).
    pub fn from_env(var: &dyn Fn(&str) -> Option<String>) -> Result<World> {
        if var("SEGK_DIST").is_some_and(|v| v.trim() == "0") {
            return Ok(World::single());
        }
        let num = |name: &str| -> Result<Option<usize>> {
            match var(name).filter(|v| !v.trim().is_empty()) {
                None => Ok(None),
                Some(v) => v.trim().parse::<usize>().map(Some).with_context(|| format!("{name}={v:?} is not a number")),
            }
        };
        let need = |name: &str, launcher: &str| -> Result<usize> { num(name)?.with_context(|| format!("{launcher} set some of its variables but not {name}")) };
        let port = |fallback: u16| -> Result<u16> {
            match var("MASTER_PORT").filter(|v| !v.trim().is_empty()) {
                None => Ok(fallback),
                Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p:?} is not a port number")),
            }
        };
        let master = var("MASTER_ADDR").filter(|v| !v.trim().is_empty()).map(|v| v.trim().to_string());
        let first_num = |name: &str| var(name).and_then(|v| v.split(|c: char| !c.is_ascii_digit()).next().and_then(|d| d.parse::<usize>().ok()));
        let local_size = num("LOCAL_WORLD_SIZE")?
            .or(num("OMPI_COMM_WORLD_LOCAL_SIZE")?)
            .or(num("MPI_LOCALNRANKS")?)
            .or(num("SLURM_NTASKS_PER_NODE")?)
            .or_else(|| first_num("SLURM_STEP_TASKS_PER_NODE"))
            .unwrap_or(1)
            .max(1);
        let (rank, size, local_rank, addr, port, launcher) = if let Some(size) = num("WORLD_SIZE")? {
            let launcher = "torchrun-style variables";
            let rank = need("RANK", launcher)?;
            let local = match num("LOCAL_RANK")? {
                Some(l) => l,
                None if size == 1 => 0,
                None => bail!("WORLD_SIZE={size} and RANK={rank} are set but not LOCAL_RANK, the rank's GPU on its node"),
            };
            let addr = match master {
                Some(a) => a,
                None if size == 1 => "127.0.0.1".into(),
                None => bail!("WORLD_SIZE={size} is set but not MASTER_ADDR, the host of rank 0"),
            };
            (rank, size, local, addr, port(DEFAULT_PORT)?, launcher)
        } else if let Some(size) = num("OMPI_COMM_WORLD_SIZE")? {
            let launcher = "mpirun (OMPI_COMM_WORLD_* variables)";
            let rank = need("OMPI_COMM_WORLD_RANK", launcher)?;
            let local = need("OMPI_COMM_WORLD_LOCAL_RANK", launcher)?;
            let one_node = num("OMPI_COMM_WORLD_LOCAL_SIZE")? == Some(size);
            (rank, size, local, mpi_master(master, one_node, size)?, port(DEFAULT_PORT)?, launcher)
        } else if let Some(size) = num("PMI_SIZE")? {
            let launcher = "mpirun (PMI_* variables, MPICH or Intel MPI)";
            let rank = need("PMI_RANK", launcher)?;
            let local = num("MPI_LOCALRANKID")?.unwrap_or(if size == 1 { 0 } else { usize::MAX });
            anyhow::ensure!(local != usize::MAX, "{launcher}: MPI_LOCALRANKID (the rank's GPU on its node) is not set");
            let one_node = num("MPI_LOCALNRANKS")? == Some(size);
            (rank, size, local, mpi_master(master, one_node, size)?, port(DEFAULT_PORT)?, launcher)
        } else if let (Some(rank), Some(size)) = (num("SLURM_PROCID")?, num("SLURM_STEP_NUM_TASKS")?) {
            // SLURM_STEP_NUM_TASKS is set by srun only: a batch script's own shell (SLURM_NTASKS
            // set, no step) is not a rank of a multi-task run.
            let launcher = "srun (SLURM_* variables)";
            let local = need("SLURM_LOCALID", launcher)?;
            let addr = match master {
                Some(a) => a,
                None => {
                    let list = var("SLURM_STEP_NODELIST").or_else(|| var("SLURM_JOB_NODELIST")).context("srun set SLURM_PROCID but no SLURM_STEP_NODELIST or SLURM_JOB_NODELIST to find rank 0's host in (set MASTER_ADDR)")?;
                    first_host(&list)?
                }
            };
            // Jobs (and job steps) sharing a node must not share a port.
            let step = num("SLURM_STEP_ID")?.unwrap_or(0);
            let fallback = DEFAULT_PORT + ((num("SLURM_JOB_ID")?.unwrap_or(0) * 7 + step) % 1000) as u16;
            (rank, size, local, addr, port(fallback)?, launcher)
        } else {
            return Ok(World::single());
        };
        anyhow::ensure!(size >= 1, "{launcher}: a world of 0 ranks");
        anyhow::ensure!(rank < size, "{launcher}: rank {rank} is not below the world size {size}");
        Ok(World { rank, size, local_rank, local_size: local_size.min(size), master_addr: addr, master_port: port, launcher })
    }

    /// The process's own environment.
    pub fn from_process_env() -> Result<World> {
        World::from_env(&|k| std::env::var(k).ok())
    }

    /// The samples of each global batch this rank takes: `global / size` of them, starting
    /// at `rank * global / size`.
    pub fn share(&self, global_batch: usize) -> Result<std::ops::Range<usize>> {
        if !global_batch.is_multiple_of(self.size) {
            bail!(
                "the batch of {global_batch} cannot be split over {} ranks: use a number of GPUs that divides it (segk splits each batch evenly, where nnU-Net's DDP gives some ranks one sample more)",
                self.size
            );
        }
        let n = global_batch / self.size;
        Ok(self.rank * n..(self.rank + 1) * n)
    }
}

/// An MPI launch names no rendezvous host: one node's ranks meet on it; across nodes the user
/// says where (`mpirun -x MASTER_ADDR=...`).
fn mpi_master(master: Option<String>, one_node: bool, size: usize) -> Result<String> {
    match master {
        Some(a) => Ok(a),
        None if one_node || size == 1 => Ok("127.0.0.1".into()),
        None => bail!("mpirun across nodes: set MASTER_ADDR to the host of rank 0 (mpirun -x MASTER_ADDR=host)"),
    }
}

/// The first host of a SLURM host list ("gpu[01-04,07],cpu3" -> "gpu01").
pub fn first_host(list: &str) -> Result<String> {
    let list = list.trim();
    let first = match list.find([',', '[']) {
        Some(i) if list.as_bytes()[i] == b',' => &list[..i],
        Some(i) => {
            let close = list[i..].find(']').map(|j| i + j).with_context(|| format!("host list {list:?}: unclosed '['"))?;
            let inner = &list[i + 1..close];
            let first = inner.split([',', '-']).next().unwrap_or("");
            let rest = &list[close + 1..];
            let suffix = rest.split(',').next().unwrap_or("");
            return Ok(format!("{}{first}{suffix}", &list[..i]));
        }
        None => list,
    };
    anyhow::ensure!(!first.is_empty(), "host list {list:?} names no host");
    Ok(first.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(vars: &[(&str, &str)]) -> Result<World> {
        let map: std::collections::HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        World::from_env(&|k| map.get(k).cloned())
    }

    #[test]
    fn torchrun_variables() {
        let w = world(&[("WORLD_SIZE", "8"), ("RANK", "5"), ("LOCAL_RANK", "1"), ("LOCAL_WORLD_SIZE", "4"), ("MASTER_ADDR", "node7"), ("MASTER_PORT", "1234")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.local_size, w.master_addr.as_str(), w.master_port), (5, 8, 1, 4, "node7", 1234));
        let e = world(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "a")]).unwrap_err().to_string();
        assert!(e.contains("LOCAL_RANK"), "{e}");
        let e = world(&[("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = world(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "a")]).unwrap_err().to_string();
        assert!(e.contains("rank 2 is not below"), "{e}");
        let e = world(&[("WORLD_SIZE", "two")]).unwrap_err().to_string();
        assert!(e.contains("WORLD_SIZE=\"two\""), "{e}");
        assert_eq!(world(&[("WORLD_SIZE", "1"), ("RANK", "0")]).unwrap().size, 1);
    }

    #[test]
    fn srun_variables() {
        let base = [("SLURM_PROCID", "3"), ("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_LOCALID", "1"), ("SLURM_STEP_NODELIST", "gpu[07-08]"), ("SLURM_JOB_ID", "123456"), ("SLURM_STEP_TASKS_PER_NODE", "2(x2)")];
        let w = world(&base).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.local_size, w.master_addr.as_str(), w.master_port), (3, 4, 1, 2, "gpu07", DEFAULT_PORT + (123456 * 7 % 1000) as u16));
        let mut with_master = base.to_vec();
        with_master.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "4000")]);
        let w = world(&with_master).unwrap();
        assert_eq!((w.master_addr.as_str(), w.master_port), ("head", 4000));
        // A batch script's own shell: SLURM_NTASKS but no job step.
        assert!(world(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "4"), ("SLURM_LOCALID", "0")]).unwrap().is_single());
        // Separate trainings started by one srun say so.
        let mut separate = base.to_vec();
        separate.push(("SEGK_DIST", "0"));
        assert!(world(&separate).unwrap().is_single());
        // mpirun inside an allocation: its ranks, not the srun step of its daemons.
        let mut mpi = base.to_vec();
        mpi.extend([("OMPI_COMM_WORLD_SIZE", "8"), ("OMPI_COMM_WORLD_RANK", "6"), ("OMPI_COMM_WORLD_LOCAL_RANK", "2"), ("MASTER_ADDR", "head")]);
        let w = world(&mpi).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank), (6, 8, 2));
    }

    #[test]
    fn mpirun_variables() {
        let w = world(&[("OMPI_COMM_WORLD_SIZE", "2"), ("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]).unwrap();
        assert_eq!((w.rank, w.size, w.local_rank, w.master_addr.as_str()), (1, 2, 1, "127.0.0.1"));
        let e = world(&[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_RANK", "1"), ("OMPI_COMM_WORLD_LOCAL_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let w = world(&[("PMI_SIZE", "2"), ("PMI_RANK", "0"), ("MPI_LOCALRANKID", "0"), ("MPI_LOCALNRANKS", "2")]).unwrap();
        assert_eq!((w.rank, w.size, w.master_addr.as_str()), (0, 2, "127.0.0.1"));
        assert!(world(&[]).unwrap().is_single());
    }

    #[test]
    fn slurm_host_lists() {
        assert_eq!(first_host("gpu[01-04,07],cpu3").unwrap(), "gpu01");
        assert_eq!(first_host("node12").unwrap(), "node12");
        assert_eq!(first_host("a-b-1,a-b-2").unwrap(), "a-b-1");
        assert_eq!(first_host("n[3,5]-ib").unwrap(), "n3-ib");
        assert!(first_host("gpu[01").is_err());
        assert!(first_host("").is_err());
    }

    #[test]
    fn batches_split_evenly() {
        let w = World { rank: 1, size: 2, ..World::single() };
        assert_eq!(w.share(4).unwrap(), 2..4);
        let e = w.share(3).unwrap_err().to_string();
        assert!(e.contains("cannot be split over 2 ranks"), "{e}");
    }
}
