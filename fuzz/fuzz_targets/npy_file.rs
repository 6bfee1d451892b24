//! Any bytes as a `.npy` file (the CLI's inputs, the test tensors inside a model update):
//! reading never panics nor allocates for a shape the bytes do not hold, and what reads writes
//! back to a file that reads as the same tensor.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tern_tensor::npy::read(data) else {
        return;
    };
    let mut out = Vec::new();
    tern_tensor::npy::write(&mut out, &t).expect("a tensor that was read can be written");
    let back = tern_tensor::npy::read(out.as_slice()).expect("what was written reads back");
    assert_eq!(back.dtype(), t.dtype());
    assert_eq!(back.shape(), t.shape());
    assert_eq!(back.bytes(), t.bytes());
});
