//! PlainConvUNet: topology, parameter layout, activation plan, forward and backward.

pub mod ledger;
pub mod params;
pub mod plan;
mod resenc;
pub mod topology;
pub mod unet;

pub use plan::Checkpointing;
pub use topology::Topology;
pub use unet::UNet;
