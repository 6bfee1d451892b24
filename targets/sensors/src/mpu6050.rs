//! InvenSense MPU-6050 (and register-compatible parts): 3-axis accelerometer at ±2 g.

use embedded_hal::i2c::I2c;

use crate::Accelerometer;

const WHO_AM_I: u8 = 0x75;
const PWR_MGMT_1: u8 = 0x6B;
const ACCEL_CONFIG: u8 = 0x1C;
const ACCEL_XOUT_H: u8 = 0x3B;
/// LSB per g at the ±2 g full-scale range.
const LSB_PER_G: f32 = 16384.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error<E> {
    /// The bus failed (no device answering, arbitration lost, …).
    I2c(E),
    /// `WHO_AM_I` did not identify an MPU-6050: another part sits at that address.
    WrongDevice(u8),
}

#[derive(Debug)]
pub struct Mpu6050<I2C> {
    i2c: I2C,
    address: u8,
}

impl<I2C: I2c> Mpu6050<I2C> {
    /// AD0 low; 0x69 with AD0 high.
    pub const DEFAULT_ADDRESS: u8 = 0x68;

    /// Checks the part's identity, wakes it from sleep (its power-on state) and sets ±2 g.
    pub fn new(mut i2c: I2C, address: u8) -> Result<Self, Error<I2C::Error>> {
        let mut id = [0u8];
        i2c.write_read(address, &[WHO_AM_I], &mut id)
            .map_err(Error::I2c)?;
        // Bits 6..1 hold the address (0x68) whatever AD0 is.
        if id[0] & 0x7E != 0x68 {
            return Err(Error::WrongDevice(id[0]));
        }
        i2c.write(address, &[PWR_MGMT_1, 0x00])
            .map_err(Error::I2c)?;
        i2c.write(address, &[ACCEL_CONFIG, 0x00])
            .map_err(Error::I2c)?;
        Ok(Mpu6050 { i2c, address })
    }

    /// Gives the bus back.
    pub fn release(self) -> I2C {
        self.i2c
    }
}

impl<I2C: I2c> Accelerometer for Mpu6050<I2C> {
    type Error = Error<I2C::Error>;

    /// One burst read of the three big-endian axes, so they come from the same sample.
    fn read(&mut self) -> Result<[f32; 3], Self::Error> {
        let mut raw = [0u8; 6];
        self.i2c
            .write_read(self.address, &[ACCEL_XOUT_H], &mut raw)
            .map_err(Error::I2c)?;
        let axis =
            |i: usize| f32::from(i16::from_be_bytes([raw[2 * i], raw[2 * i + 1]])) / LSB_PER_G;
        Ok([axis(0), axis(1), axis(2)])
    }
}

#[cfg(test)]
mod tests {
    use embedded_hal::i2c::ErrorKind;
    use embedded_hal_mock::eh1::i2c::{Mock, Transaction};

    use super::*;

    fn init(address: u8, id: u8) -> Vec<Transaction> {
        vec![
            Transaction::write_read(address, vec![WHO_AM_I], vec![id]),
            Transaction::write(address, vec![PWR_MGMT_1, 0x00]),
            Transaction::write(address, vec![ACCEL_CONFIG, 0x00]),
        ]
    }

    #[test]
    fn it_wakes_the_part_and_reads_g_from_big_endian_registers() {
        let mut t = init(0x68, 0x68);
        // x = +1 g, y = -0.5 g, z = 0.25 g
        t.push(Transaction::write_read(
            0x68,
            vec![ACCEL_XOUT_H],
            vec![0x40, 0x00, 0xE0, 0x00, 0x10, 0x00],
        ));
        let mut bus = Mock::new(&t);
        let mut imu = Mpu6050::new(bus.clone(), 0x68).unwrap();
        assert_eq!(imu.read().unwrap(), [1.0, -0.5, 0.25]);
        bus.done();
    }

    #[test]
    fn another_part_at_the_address_is_refused_and_bus_errors_pass_through() {
        let mut bus = Mock::new(&init(0x69, 0x19)[..1]);
        assert_eq!(
            Mpu6050::new(bus.clone(), 0x69).unwrap_err(),
            Error::WrongDevice(0x19)
        );
        bus.done();
        let mut bus = Mock::new(&[
            Transaction::write_read(0x68, vec![WHO_AM_I], vec![0]).with_error(ErrorKind::Other)
        ]);
        assert_eq!(
            Mpu6050::new(bus.clone(), 0x68).unwrap_err(),
            Error::I2c(ErrorKind::Other)
        );
        bus.done();
    }
}
