//! Sensor input for Tern: samples from an accelerometer on an I2C bus, gathered into the
//! windows a model consumes.
//!
//! `no_std` and allocation-free, so the same driver and window run on a microcontroller and in
//! `ternd`: the driver is generic over `embedded_hal::i2c::I2c`, and [`Window`] keeps its
//! samples in a fixed-capacity ring. With the `linux` feature, [`linux::open`] reads a sensor
//! on `/dev/i2c-N`.
#![cfg_attr(not(feature = "linux"), no_std)]

mod mpu6050;
mod window;

pub use mpu6050::{Error, Mpu6050};
pub use window::{Window, WindowError};

/// Something that yields 3-axis accelerometer samples, in g.
pub trait Accelerometer {
    type Error: core::fmt::Debug;
    fn read(&mut self) -> Result<[f32; 3], Self::Error>;
}

#[cfg(feature = "linux")]
pub mod linux {
    //! An MPU-6050 on a Linux I2C bus.
    use linux_embedded_hal::I2cdev;

    use crate::Mpu6050;

    /// Opens `/dev/i2c-N` and the MPU-6050 at `address` on it (0x68, or 0x69 with AD0 high).
    pub fn open(
        bus: &str,
        address: u8,
    ) -> Result<Mpu6050<I2cdev>, Box<dyn std::error::Error + Send + Sync>> {
        let i2c = I2cdev::new(bus).map_err(|e| format!("opening {bus}: {e}"))?;
        Mpu6050::new(i2c, address)
            .map_err(|e| format!("MPU-6050 at {address:#04x} on {bus}: {e:?}").into())
    }
}
