//! What the kernels' unit tests share: random tensors and comparing a rewritten graph's outputs
//! with tract's.

use tract_onnx::tract_core::internal::*;

use crate::int8::Lcg;

/// Uniform in ±2·`scale`.
pub(crate) fn random_tensor(rng: &mut Lcg, shape: &[usize], scale: f32) -> TractResult<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| (rng.unit() * 4.0 - 2.0) * scale).collect();
    Tensor::from_shape(shape, &v)
}

/// Every f32 output within 1e-5, relative above 1, of tract's.
pub(crate) fn assert_outputs_close(name: &str, got: &[TValue], want: &[TValue]) -> TractResult<()> {
    assert_eq!(got.len(), want.len(), "{name}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.shape(), w.shape(), "{name}");
        let g = g.try_as_plain_ram()?.as_slice::<f32>()?;
        let w = w.try_as_plain_ram()?.as_slice::<f32>()?;
        for (i, (g, w)) in g.iter().zip(w).enumerate() {
            assert!(
                (g - w).abs() <= 1e-5 * (1.0 + w.abs()),
                "{name}, at {i}: {g} vs {w}"
            );
        }
    }
    Ok(())
}
