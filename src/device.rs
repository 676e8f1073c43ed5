//! `--device cpu | cuda[:N]`, and running a generic job on the chosen backend.

use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use anyhow::{bail, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
    /// The CUDA backend with its kernels run by the CPU emulator.
    Emu,
}

pub fn parse(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        "emu" => Ok(Device::Emu),
        _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => Ok(Device::Cuda(i)),
            _ => bail!("unknown device {s:?}: use auto, cpu, cuda, cuda:N or emu"),
        },
    }
}

/// A job that runs on any backend.
pub trait Job {
    type Out;
    fn run<B: crate::backend::Backend>(self, be: &B) -> Result<Self::Out>;
}

/// Runs `job` on the device `s` names: the f32 CPU backend, a CUDA GPU, or (`auto`) GPU 0
/// when one is usable, else the CPU with the reason printed.
pub fn run_on<J: Job>(s: &str, job: J) -> Result<J::Out> {
    if s == "auto" {
        return match CudaBackend::new(0) {
            Ok(be) => job.run(&be),
            Err(e) => {
                println!("no usable GPU ({e:#}): running on the CPU");
                job.run(&CpuBackend::<f32>::new())
            }
        };
    }
    match parse(s)? {
        Device::Cpu => job.run(&CpuBackend::<f32>::new()),
        Device::Cuda(i) => job.run(&CudaBackend::new(i)?),
        Device::Emu => job.run(&CudaBackend::emulated()?),
    }
}
