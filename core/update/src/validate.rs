//! Validation of a model before it serves: it loads, it runs, and when the manifest names a
//! self-test vector, it reproduces the outputs the publisher recorded.
//!
//! Shared by ternd's fleet agent and the app bindings' model store (feature `validate`, which
//! brings in tern-core).

use std::path::Path;

use crate::selftest::{compare, NamedTensor, SelfTest};
use tern_core::{DType, Model, ModelOptions, Tensor};
use tern_proto::FailureCode;

/// Why a candidate failed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub code: FailureCode,
    pub message: String,
}

fn invalid(code: FailureCode, message: impl Into<String>) -> Invalid {
    Invalid {
        code,
        message: message.into(),
    }
}

fn npy(t: &NamedTensor) -> Result<Tensor, String> {
    tern_core::npy::read(t.npy.as_slice()).map_err(|e| format!("tensor `{}`: {e}", t.name))
}

/// Loads `model_file` and runs it: a zero warm-up, then the self-test vector if any.
pub fn validate(
    model_file: &Path,
    options: &ModelOptions,
    selftest: Option<&SelfTest>,
) -> Result<(), Invalid> {
    let model = Model::load(model_file, options)
        .map_err(|e| invalid(FailureCode::LoadFailed, e.to_string()))?;
    let mut session = model
        .session()
        .map_err(|e| invalid(FailureCode::LoadFailed, e.to_string()))?;
    session
        .warm_up()
        .map_err(|e| invalid(FailureCode::LoadFailed, format!("warm-up: {e}")))?;
    let Some(st) = selftest else {
        return Ok(());
    };
    run_selftest(&model, st).map_err(|m| invalid(FailureCode::SelfTestFailed, m))
}

/// Runs a self-test vector: inputs in the model's order, every expected output compared.
pub fn run_selftest(model: &Model, st: &SelfTest) -> Result<(), String> {
    let info = model.info();
    let mut inputs: Vec<Option<Tensor>> = vec![None; info.inputs.len()];
    for t in &st.inputs {
        let ix = info.input_index(&t.name).map_err(|e| e.to_string())?;
        inputs[ix] = Some(npy(t)?);
    }
    let inputs: Vec<Tensor> = inputs
        .into_iter()
        .zip(&info.inputs)
        .map(|(t, i)| t.ok_or_else(|| format!("the vector lacks input `{}`", i.name)))
        .collect::<Result<_, _>>()?;
    let views: Vec<_> = inputs.iter().map(Tensor::view).collect();
    let mut session = model.session().map_err(|e| e.to_string())?;
    let outputs = session.run(&views).map_err(|e| e.to_string())?;
    for want in &st.expected {
        let expected = npy(want)?;
        let got = outputs
            .by_name(&want.name)
            .ok_or_else(|| format!("the model has no output `{}`", want.name))?;
        if got.dtype() != expected.dtype() || got.shape() != expected.shape() {
            return Err(format!(
                "output `{}`: {:?} {}, expected {:?} {}",
                want.name,
                got.shape(),
                got.dtype().name(),
                expected.shape(),
                expected.dtype().name()
            ));
        }
        let result = if got.dtype() == DType::F32 {
            compare(
                got.as_slice::<f32>().map_err(|e| e.to_string())?,
                expected
                    .view()
                    .as_slice::<f32>()
                    .map_err(|e| e.to_string())?,
                st.atol,
                st.rtol,
            )
        } else if got.bytes() == expected.bytes() {
            Ok(())
        } else {
            Err("values differ".into())
        };
        result.map_err(|m| format!("output `{}`: {m}", want.name))?;
    }
    Ok(())
}

/// Records a self-test vector by running `model` on `inputs` (name, tensor): the publisher's
/// side of the check.
pub fn record_selftest(
    model: &Model,
    inputs: &[(String, Tensor)],
    atol: f32,
    rtol: f32,
) -> Result<SelfTest, String> {
    let info = model.info();
    let mut ordered: Vec<Option<&Tensor>> = vec![None; info.inputs.len()];
    for (name, t) in inputs {
        ordered[info.input_index(name).map_err(|e| e.to_string())?] = Some(t);
    }
    let views = ordered
        .iter()
        .zip(&info.inputs)
        .map(|(t, i)| {
            t.map(Tensor::view)
                .ok_or_else(|| format!("missing self-test input `{}`", i.name))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut session = model.session().map_err(|e| e.to_string())?;
    let outputs = session.run(&views).map_err(|e| e.to_string())?;
    let to_npy = |name: &str, t: &Tensor| -> Result<NamedTensor, String> {
        let mut npy = vec![];
        tern_core::npy::write(&mut npy, t).map_err(|e| e.to_string())?;
        Ok(NamedTensor {
            name: name.into(),
            npy,
        })
    };
    Ok(SelfTest {
        inputs: inputs
            .iter()
            .map(|(n, t)| to_npy(n, t))
            .collect::<Result<_, _>>()?,
        expected: outputs
            .iter()
            .map(|(n, v)| to_npy(n, &v.to_tensor()))
            .collect::<Result<_, _>>()?,
        atol,
        rtol,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn models() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
    }

    #[test]
    fn a_model_reproduces_its_own_recorded_vector_and_another_model_does_not() {
        let input = tern_core::npy::read_file(models().join("testdata/digits_test_x.npy"))
            .expect("digits inputs");
        let opts = ModelOptions::default();
        let fp32 = Model::load(models().join("digits/1/model.onnx"), &opts).unwrap();
        let name = fp32.info().inputs[0].name.clone();
        let st = record_selftest(&fp32, &[(name, input)], 1e-4, 1e-4).unwrap();
        let file = models().join("digits/1/model.onnx");
        validate(&file, &opts, Some(&st)).unwrap();
        let other = models().join("resblock/1/model.onnx");
        let err = validate(&other, &opts, Some(&st)).unwrap_err();
        assert!(
            matches!(
                err.code,
                FailureCode::SelfTestFailed | FailureCode::LoadFailed
            ),
            "{err:?}"
        );
    }

    #[test]
    fn a_file_that_is_not_onnx_fails_to_load() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("model.onnx");
        std::fs::write(&f, b"definitely not a protobuf").unwrap();
        let err = validate(&f, &ModelOptions::default(), None).unwrap_err();
        assert_eq!(err.code, FailureCode::LoadFailed);
    }
}
