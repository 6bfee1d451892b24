//! A sensor node's side of the fleet protocol, as firmware: every frame is encoded into and
//! decoded from buffers reserved once at start-up, with no allocator anywhere.
//!
//! The loop samples a (simulated) accelerometer into a window, sends a `SensorFrame`, answers a
//! retained `DesiredState` with a `DeviceReport`. On hardware the bytes would go to a radio or
//! UART; here they go through `black_box` so the optimiser keeps the work that real I/O needs.

#![no_std]
#![no_main]

use core::hint::black_box;

use cortex_m_rt::entry;
use panic_halt as _;
use tern_proto::{
    decode, encode, DeviceReport, Frame, ModelReport, Name, SensorFrame, UpdateState, MAX_SAMPLES,
};

/// A retained desired state as the broker delivers it: generation 7, model `kws` version 3,
/// 100% of devices, no downgrade (see core/proto/SPEC.md for the layout).
static DESIRED: [u8; 43] = [
    1, 1, 7, 1, 3, b'k', b'w', b's', 3, // version, tag, generation, 1 model, name, version
    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
    0xab, // artifact
    0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab,
    100, 0, // percent, allow_downgrade
];

/// Stand-in for an I2C accelerometer read: a deterministic triangle wave per axis.
fn sample(t: u32) -> [i16; 3] {
    let tri = |p: u32| ((t.wrapping_add(p) % 64) as i16 - 32) * 512;
    [tri(0), tri(21), tri(42)]
}

#[entry]
fn main() -> ! {
    // Reserved once: the only memory the protocol ever touches.
    let tx: &'static mut [u8; 512] =
        cortex_m::singleton!(: [u8; 512] = [0; 512]).expect("taken once at start-up");
    let rx: &'static mut [u8; 512] =
        cortex_m::singleton!(: [u8; 512] = [0; 512]).expect("taken once at start-up");
    let mut seq: u32 = 0;
    let mut active: Option<u32> = None;
    loop {
        let mut samples = heapless::Vec::<i16, MAX_SAMPLES>::new();
        for i in 0..(MAX_SAMPLES as u32 / 3) {
            for v in sample(seq.wrapping_mul(21).wrapping_add(i)) {
                // Capacity is a multiple of 3: never full here.
                let _ = samples.push(v);
            }
        }
        let frame = Frame::Sensor(SensorFrame {
            sensor: 1,
            seq,
            samples,
        });
        if let Ok(n) = encode(&frame, &mut tx[..]) {
            black_box(&tx[..n]);
        }

        // A desired state arrives (here: the retained bytes above, copied as a radio would).
        rx[..DESIRED.len()].copy_from_slice(&DESIRED);
        let incoming = black_box(&rx[..DESIRED.len()]);
        if let Ok(Frame::Desired(d)) = decode(incoming) {
            let mut models = heapless::Vec::new();
            for m in d.models.iter() {
                active = Some(m.version);
                let _ = models.push(ModelReport {
                    name: m.name.clone(),
                    active_version: active,
                    state: UpdateState::Active { version: m.version },
                });
            }
            let report = Frame::Report(DeviceReport {
                device: Name::try_from("mcu-01").unwrap_or_default(),
                generation: d.generation,
                models,
            });
            if let Ok(n) = encode(&report, &mut tx[..]) {
                black_box(&tx[..n]);
            }
        }
        black_box(active);
        seq = seq.wrapping_add(1);
        cortex_m::asm::wfi();
    }
}
