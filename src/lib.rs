//! segk: a training engine for nnU-Net-style 3D U-Nets.
//!
//! Layers, top to bottom: cli (main.rs) -> train / predict / demo / bench -> model -> backend.
//! The model asks a [`backend::Backend`] for ops and never knows which one it has.
//! Data: dataset (raw nnU-Net folders) -> plan -> preprocess -> store -> loader (batches).

#![allow(clippy::too_many_arguments, clippy::needless_range_loop)]

pub mod backend;
pub mod bench_kernels;
pub mod bench_loader;
pub mod bench_step;
pub mod cascade;
pub mod checkpoint;
pub mod dataset;
pub mod ensemble;
pub mod demo;
pub mod device;
pub mod dist;
pub mod evaluate;
pub mod experiment;
pub mod feed;
pub mod fuzz;
pub mod hostmem;
pub mod imageio;
pub mod loader;
pub mod model;
pub mod morphology;
pub mod ordered;
pub mod plan;
pub mod plot;
pub mod postprocess;
pub mod predict;
pub mod preprocess;
pub mod pth;
pub mod select;
pub mod selftest;
pub mod store;
pub mod sysinfo;
pub mod synth;
pub mod tensor;
pub mod threads;
pub mod train;

