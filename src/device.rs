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

/// `--precision`: what the convolutions multiply. Norms, losses, the optimizer and master
/// weights are f32 in every case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// The device's default: bf16 on a GPU (tensor cores); on a CPU with AVX512-BF16, bf16
    /// to predict and f32 to train; f32 elsewhere.
    #[default]
    Auto,
    /// f32 products (the CPU only: the CUDA backend's convolutions run on bf16 tensor cores).
    F32,
    /// bf16 operands, f32 sums; on a CPU without AVX512-BF16, f32 with a note.
    Bf16,
}

impl Precision {
    /// auto, f32 or bf16.
    pub fn parse(s: &str) -> Result<Precision> {
        <Precision as clap::ValueEnum>::from_str(s, true).map_err(|_| anyhow::anyhow!("unknown precision {s:?}: use auto, f32 or bf16"))
    }

    /// The f32 CPU backend this precision asks for on this CPU, for a job that does or does
    /// not take bf16 by default.
    fn cpu(self, bf16_by_default: bool) -> CpuBackend<f32> {
        match self {
            Precision::F32 => CpuBackend::new(),
            Precision::Auto if !bf16_by_default => CpuBackend::new(),
            Precision::Auto => CpuBackend::with_bf16_products().unwrap_or_default(),
            Precision::Bf16 => CpuBackend::with_bf16_products().unwrap_or_else(|| {
                println!("--precision bf16: this CPU has no AVX512-BF16 (vdpbf16ps): computing in f32");
                CpuBackend::new()
            }),
        }
    }

    /// The CUDA backend computes its convolutions in bf16 only.
    fn check_cuda(self) -> Result<()> {
        if self == Precision::F32 {
            bail!("--precision f32: the CUDA backend multiplies in bf16 on tensor cores (f32 sums); f32 products are the CPU's (--device cpu)");
        }
        Ok(())
    }
}

/// A job that runs on any backend.
pub trait Job {
    type Out;
    fn run<B: crate::backend::Backend>(self, be: &B) -> Result<Self::Out>;
    /// Whether `--precision auto` means bf16 on a CPU that has it (prediction: yes; training
    /// and checks: f32 unless asked).
    fn bf16_on_cpu_by_default(&self) -> bool {
        false
    }
}

/// Runs `job` on the device `s` names at `precision`: the f32 CPU backend (bf16 products
/// where asked and available), a CUDA GPU, or (`auto`) GPU 0 when one is usable, else the CPU
/// with the reason printed.
pub fn run_on<J: Job>(s: &str, precision: Precision, job: J) -> Result<J::Out> {
    if s == "auto" {
        return match CudaBackend::new(0) {
            Ok(be) => {
                precision.check_cuda()?;
                job.run(&be)
            }
            Err(e) => {
                println!("no usable GPU ({e:#}): running on the CPU");
                let be = precision.cpu(job.bf16_on_cpu_by_default());
                job.run(&be)
            }
        };
    }
    match parse(s)? {
        Device::Cpu => {
            let be = precision.cpu(job.bf16_on_cpu_by_default());
            job.run(&be)
        }
        Device::Cuda(i) => {
            precision.check_cuda()?;
            job.run(&CudaBackend::new(i)?)
        }
        Device::Emu => {
            precision.check_cuda()?;
            job.run(&CudaBackend::emulated()?)
        }
    }
}
