//! The check every request passes before it reaches a model.

use std::fmt::Write as _;

use crate::error::{TensorError, TensorResult};
use crate::tensor::{fmt_shape, DType, Dim, TensorInfo, TensorView};

/// Checks `inputs` against the `declared` inputs of a model, in order, and returns the batch
/// size (1 when no input has a batch dimension).
///
/// Refused: a different number of inputs; a different element type or rank; a fixed dimension
/// of another size; a batch of 0, above `max_batch`, or differing between inputs; bytes that do
/// not match shape × element size (overflow included); bool bytes other than 0 or 1. Symbolic
/// dimensions other than the batch take any size. Allocates only to write an error message.
pub fn check_inputs(
    declared: &[TensorInfo],
    max_batch: Option<usize>,
    inputs: &[TensorView<'_>],
) -> TensorResult<usize> {
    if inputs.len() != declared.len() {
        let mut names = String::new();
        for (i, d) in declared.iter().enumerate() {
            let _ = write!(names, "{}`{}`", if i > 0 { ", " } else { "" }, d.name);
        }
        return Err(TensorError::Invalid(format!(
            "expected {} input(s) ({names}), got {}",
            declared.len(),
            inputs.len()
        )));
    }
    let mut batch: Option<usize> = None;
    for (d, v) in declared.iter().zip(inputs) {
        let mismatch = || {
            let mut got = String::new();
            let _ = fmt_shape(&mut got, v.shape().iter());
            let mut want = String::new();
            let _ = fmt_shape(&mut want, d.shape.iter());
            TensorError::Invalid(format!(
                "input `{}`: expected shape {want} {}, got {got} {}",
                d.name,
                d.dtype,
                v.dtype()
            ))
        };
        if v.dtype() != d.dtype || v.shape().len() != d.shape.len() {
            return Err(mismatch());
        }
        for (dim, &got) in d.shape.iter().zip(v.shape()) {
            match dim {
                Dim::Fixed(n) if *n != got => return Err(mismatch()),
                Dim::Batch(_) => {
                    if got == 0 {
                        return Err(TensorError::Invalid(format!(
                            "input `{}`: batch size must be at least 1",
                            d.name
                        )));
                    }
                    if let Some(max) = max_batch.filter(|m| got > *m) {
                        return Err(TensorError::BatchTooLarge { got, max });
                    }
                    match batch {
                        Some(b) if b != got => {
                            return Err(TensorError::Invalid(format!(
                                "input `{}`: batch size {got} differs from {b} in the other inputs",
                                d.name
                            )))
                        }
                        _ => batch = Some(got),
                    }
                }
                _ => {}
            }
        }
        let expected = d.dtype.byte_len(v.shape());
        if expected != Some(v.bytes().len()) {
            return Err(TensorError::Invalid(format!(
                "input `{}`: shape {:?} {} needs {} bytes, got {}",
                d.name,
                v.shape(),
                d.dtype,
                expected
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "more than addressable".into()),
                v.bytes().len()
            )));
        }
        if d.dtype == DType::Bool && v.bytes().iter().any(|&b| b > 1) {
            return Err(TensorError::Invalid(format!(
                "input `{}`: bool elements must be 0 or 1",
                d.name
            )));
        }
    }
    Ok(batch.unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> TensorInfo {
        TensorInfo {
            name: "x".into(),
            dtype: DType::F32,
            shape: vec![Dim::Batch("N".into()), Dim::Fixed(2)],
        }
    }

    #[test]
    fn a_good_batch_gives_its_size() {
        let data = [0f32; 6];
        let got = check_inputs(&[image()], Some(4), &[TensorView::new(&[3, 2], &data)]);
        assert_eq!(got.unwrap(), 3);
    }

    #[test]
    fn a_batch_above_the_maximum_is_its_own_error() {
        let data = [0f32; 10];
        let err = check_inputs(&[image()], Some(4), &[TensorView::new(&[5, 2], &data)]);
        assert!(matches!(
            err,
            Err(TensorError::BatchTooLarge { got: 5, max: 4 })
        ));
    }

    #[test]
    fn a_shape_whose_size_overflows_is_refused_not_wrapped() {
        let shape = [usize::MAX / 2 + 1, 2];
        let v = TensorView::from_bytes(DType::F32, &shape, &[]);
        let err = check_inputs(&[image()], None, &[v])
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than addressable"), "{err}");
    }

    /// Found by the `core_input` fuzz target: `[huge, 0]` was refused and `[0, huge]` passed.
    #[test]
    fn an_empty_tensor_is_judged_the_same_whatever_the_order_of_its_dimensions() {
        let huge = usize::MAX / 2 + 1;
        for (dtype, ok) in [(DType::U8, true), (DType::F32, false)] {
            let info = TensorInfo {
                name: "x".into(),
                dtype,
                shape: vec![Dim::Symbol("A".into()), Dim::Symbol("B".into())],
            };
            for shape in [[huge, 0], [0, huge]] {
                let got = check_inputs(
                    std::slice::from_ref(&info),
                    None,
                    &[TensorView::from_bytes(dtype, &shape, &[])],
                );
                assert_eq!(got.is_ok(), ok, "{dtype} {shape:?}: {got:?}");
            }
        }
    }

    #[test]
    fn bool_bytes_must_be_zero_or_one() {
        let info = TensorInfo {
            name: "mask".into(),
            dtype: DType::Bool,
            shape: vec![Dim::Fixed(3)],
        };
        let err = check_inputs(
            &[info],
            None,
            &[TensorView::from_bytes(DType::Bool, &[3], &[0, 1, 2])],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("0 or 1"), "{err}");
    }
}
