use std::fmt::Write as _;
use std::sync::Arc;

use tract_onnx::prelude::{
    DatumType, IntoTValue, TValue, TVec, Tensor as TractTensor, TypedSimpleState,
};

use crate::error::{catch, chain, Error, Result};
use crate::model::Model;
use crate::tensor::{fmt_shape, DType, Dim, Tensor, TensorInfo, TensorView};

/// Per-worker run state for one [`Model`]: tract's state plus reusable input buffers.
///
/// A session is `Send` but not shared: give each worker thread its own. In steady state (same
/// input shapes as the previous call) `run` performs no heap allocation of its own; what remains
/// is tract's, measured by the allocation test against raw tract.
pub struct Session {
    model: Model,
    state: TypedSimpleState,
    /// One buffer per input, reused while the shape stays the same.
    inputs: Vec<Option<Arc<TractTensor>>>,
    /// Outputs of the last run, borrowed by [`Outputs`].
    outputs: TVec<TValue>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(model: Model) -> Result<Session> {
        let state =
            TypedSimpleState::new(&model.inner.plan).map_err(|e| Error::Prepare(chain(&e)))?;
        let inputs = vec![None; model.inner.info.inputs.len()];
        Ok(Session {
            model,
            state,
            inputs,
            outputs: TVec::new(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Runs one forward pass. `inputs` are given in the model's input order
    /// ([`crate::ModelInfo::inputs`]); every input must share the same batch size.
    pub fn run(&mut self, inputs: &[TensorView<'_>]) -> Result<Outputs<'_>> {
        let info = &self.model.inner.info;
        validate(&info.inputs, info.max_batch, inputs)?;
        let mut values: TVec<TValue> = TVec::new();
        for (ix, view) in inputs.iter().enumerate() {
            let dt = self.model.inner.input_dts[ix];
            let slot = &mut self.inputs[ix];
            let reusable = slot
                .as_mut()
                .is_some_and(|t| t.shape() == view.shape() && Arc::get_mut(t).is_some());
            if !reusable {
                // SAFETY: every byte is overwritten below before the tensor is read.
                let t = unsafe { TractTensor::uninitialized_dt(dt, view.shape()) }
                    .map_err(|e| Error::Internal(chain(&e)))?;
                *slot = Some(Arc::new(t));
            }
            let arc = slot.as_mut().expect("filled above");
            let t = Arc::get_mut(arc).expect("no other owner: checked or freshly made");
            let dst = t.as_bytes_mut();
            if dst.len() != view.bytes().len() {
                return Err(Error::Internal(format!(
                    "input buffer holds {} bytes, request {}",
                    dst.len(),
                    view.bytes().len()
                )));
            }
            dst.copy_from_slice(view.bytes());
            values.push(arc.clone().into_tvalue());
        }
        self.outputs.clear();
        let state = &mut self.state;
        let result = catch("running the model", || {
            state.run(values).map_err(|e| Error::Execution(chain(&e)))
        });
        match result {
            Ok(outputs) => {
                self.outputs = outputs;
                Ok(Outputs {
                    info: &self.model.inner.info.outputs,
                    values: &self.outputs,
                })
            }
            Err(e) => {
                // A failed run can leave tract's turn state half-written: start from a clean one.
                if let Ok(fresh) = TypedSimpleState::new(&self.model.inner.plan) {
                    self.state = fresh;
                }
                Err(e)
            }
        }
    }

    /// Runs zeros through the model once (batch 1), so the first real request does not pay for
    /// lazy initialisation. Models with symbolic dimensions other than the batch are skipped.
    pub fn warm_up(&mut self) -> Result<()> {
        let info = &self.model.inner.info;
        let mut tensors = Vec::with_capacity(info.inputs.len());
        for input in &info.inputs {
            let mut shape = Vec::with_capacity(input.shape.len());
            for d in &input.shape {
                match d {
                    Dim::Fixed(n) => shape.push(*n),
                    Dim::Batch(_) => shape.push(1),
                    Dim::Symbol(_) => {
                        log::info!(
                            "warm-up skipped: input `{}` has a symbolic dimension",
                            input.name
                        );
                        return Ok(());
                    }
                }
            }
            let bytes = vec![0u8; shape.iter().product::<usize>() * input.dtype.size()];
            tensors.push(Tensor::from_bytes(input.dtype, shape, bytes)?);
        }
        let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
        self.run(&views).map(|_| ())
    }
}

/// Checks inputs against the declared ones and returns the batch size (1 without a batch
/// dimension). Allocates only to write an error message.
pub(crate) fn validate(
    declared: &[TensorInfo],
    max_batch: Option<usize>,
    inputs: &[TensorView<'_>],
) -> Result<usize> {
    if inputs.len() != declared.len() {
        let mut names = String::new();
        for (i, d) in declared.iter().enumerate() {
            let _ = write!(names, "{}`{}`", if i > 0 { ", " } else { "" }, d.name);
        }
        return Err(Error::InvalidInput(format!(
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
            Error::InvalidInput(format!(
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
                        return Err(Error::InvalidInput(format!(
                            "input `{}`: batch size must be at least 1",
                            d.name
                        )));
                    }
                    if let Some(max) = max_batch.filter(|m| got > *m) {
                        return Err(Error::BatchTooLarge { got, max });
                    }
                    match batch {
                        Some(b) if b != got => {
                            return Err(Error::InvalidInput(format!(
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
        let expected = v
            .shape()
            .iter()
            .try_fold(d.dtype.size(), |acc, &x| acc.checked_mul(x));
        if expected != Some(v.bytes().len()) {
            return Err(Error::InvalidInput(format!(
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
            return Err(Error::InvalidInput(format!(
                "input `{}`: bool elements must be 0 or 1",
                d.name
            )));
        }
    }
    Ok(batch.unwrap_or(1))
}

/// Outputs of the last [`Session::run`], borrowed from the session without copying.
#[derive(Debug)]
pub struct Outputs<'a> {
    info: &'a [TensorInfo],
    values: &'a [TValue],
}

impl<'a> Outputs<'a> {
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Output `ix`, in the model's output order.
    pub fn get(&self, ix: usize) -> Option<TensorView<'a>> {
        let t: &'a TractTensor = self.values.get(ix)?;
        Some(TensorView::from_bytes(
            self.info[ix].dtype,
            t.shape(),
            tensor_bytes(t),
        ))
    }

    pub fn by_name(&self, name: &str) -> Option<TensorView<'a>> {
        self.info
            .iter()
            .position(|i| i.name == name)
            .and_then(|ix| self.get(ix))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&'a str, TensorView<'a>)> + '_ {
        (0..self.len()).filter_map(move |ix| Some((self.info[ix].name.as_str(), self.get(ix)?)))
    }
}

fn tensor_bytes(t: &TractTensor) -> &[u8] {
    debug_assert!(!matches!(
        t.datum_type(),
        DatumType::String | DatumType::TDim
    ));
    t.as_bytes()
}
