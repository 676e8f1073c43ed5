pub mod topology; pub mod unet;
