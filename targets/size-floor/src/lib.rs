//! One exported function: load a model file, optimize it for one input shape, run it on one
//! f32 input, copy out the first output. Everything tract needs for that is linked; nothing of
//! Tern's is. Its stripped size is the floor under Tern's app library and `ternd`.

use std::ffi::{c_char, CStr};

use tract_nnef::prelude::*;

/// Runs the model at `path` (NNEF `.tar`, or `.onnx` with the `onnx` feature) on `input`
/// shaped `shape[..rank]`; writes up to `out_len` floats of the first output. Returns the
/// number of output values, or -1 on any error.
///
/// # Safety
/// `path` is a NUL-terminated string; `shape`, `input` and `out` point to `rank`, `len` and
/// `out_len` values.
#[no_mangle]
pub unsafe extern "C" fn floor_run(
    path: *const c_char,
    shape: *const usize,
    rank: usize,
    input: *const f32,
    len: usize,
    out: *mut f32,
    out_len: usize,
) -> isize {
    let Ok(path) = CStr::from_ptr(path).to_str() else {
        return -1;
    };
    let shape = std::slice::from_raw_parts(shape, rank);
    let input = std::slice::from_raw_parts(input, len);
    let out = std::slice::from_raw_parts_mut(out, out_len);
    match run(path, shape, input, out) {
        Ok(n) => n as isize,
        Err(_) => -1,
    }
}

pub fn run(path: &str, shape: &[usize], input: &[f32], out: &mut [f32]) -> TractResult<usize> {
    let mut model = load(path, shape)?;
    model.set_input_fact(0, f32::fact(shape))?;
    let plan = model.into_optimized()?.into_runnable()?;
    let x = tract_ndarray::ArrayD::from_shape_vec(shape.to_vec(), input.to_vec())?;
    let result = plan.run(tvec!(Tensor::from(x).into()))?;
    let y = result[0].to_plain_array_view::<f32>()?;
    for (o, v) in out.iter_mut().zip(y.iter()) {
        *o = *v;
    }
    Ok(y.len().min(out.len()))
}

#[cfg(feature = "onnx")]
fn load(path: &str, shape: &[usize]) -> TractResult<TypedModel> {
    use tract_onnx::prelude::{Framework as _, InferenceModelExt};
    if path.ends_with(".onnx") {
        return tract_onnx::onnx()
            .model_for_path(path)?
            .with_input_fact(0, f32::fact(shape).into())?
            .into_typed();
    }
    nnef(path)
}

#[cfg(not(feature = "onnx"))]
fn load(path: &str, _shape: &[usize]) -> TractResult<TypedModel> {
    nnef(path)
}

fn nnef(path: &str) -> TractResult<TypedModel> {
    tract_nnef::nnef().model_for_path(path)
}
