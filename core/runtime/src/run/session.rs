use std::sync::Arc;

use tract_onnx::prelude::{DatumType, IntoTValue, TValue, TVec, Tensor as TractTensor};

use crate::error::{catch, chain, Error, Result};
use crate::model::Model;
use crate::prepare::parts::State;
use crate::prepare::Plans;
use crate::tensor::check_inputs;
use crate::tensor::{Dim, Tensor, TensorInfo, TensorView};

/// Per-worker run state for one [`Model`]: tract's state plus reusable input buffers.
///
/// A session is `Send` but not shared: give each worker thread its own. In steady state (same
/// input shapes as the previous call) `run` performs no heap allocation of its own; what remains
/// is tract's, measured by the allocation test against raw tract.
pub struct Session {
    model: Model,
    runner: Runner,
    /// One buffer per input, reused while the shape stays the same.
    inputs: Vec<Option<Arc<TractTensor>>>,
    /// The shapes the plan runs at (the request's, with the batch padded for concrete plans).
    planned: Vec<Vec<usize>>,
    /// Outputs of the last run, borrowed by [`Outputs`].
    outputs: TVec<TValue>,
    /// Output shapes with the padding rows cut off, when the last run was padded.
    cut: Vec<Vec<usize>>,
    padded: bool,
}

enum Runner {
    Symbolic(State),
    /// One state per planned shape this session has run, least recently used evicted first.
    Concrete {
        states: Vec<(Vec<Vec<usize>>, State, u64)>,
        tick: u64,
    },
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
        let runner = match &model.inner.plans {
            Plans::Symbolic(plan) => {
                Runner::Symbolic(State::new(plan).map_err(|e| Error::Prepare(chain(&e)))?)
            }
            Plans::Concrete(_) => Runner::Concrete {
                states: vec![],
                tick: 0,
            },
        };
        let n = model.inner.info.inputs.len();
        Ok(Session {
            model,
            runner,
            inputs: vec![None; n],
            planned: vec![vec![]; n],
            outputs: TVec::new(),
            cut: vec![],
            padded: false,
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    /// Runs one forward pass. `inputs` are given in the model's input order
    /// ([`crate::ModelInfo::inputs`]); every input must share the same batch size.
    pub fn run(&mut self, inputs: &[TensorView<'_>]) -> Result<Outputs<'_>> {
        let Session {
            model,
            runner,
            inputs: buffers,
            planned,
            outputs,
            cut,
            padded,
        } = self;
        let prepared = &*model.inner;
        let info = &prepared.info;
        let rows = check_inputs(&info.inputs, info.max_batch, inputs)?;
        let concrete = match &prepared.plans {
            Plans::Concrete(c) => Some(c),
            Plans::Symbolic(_) => None,
        };
        let run_rows = match concrete {
            Some(c) if info.batch.is_some() => c.padded(rows),
            _ => rows,
        };
        let mut values: TVec<TValue> = TVec::new();
        for (ix, view) in inputs.iter().enumerate() {
            let shape = &mut planned[ix];
            shape.clear();
            shape.extend_from_slice(view.shape());
            if run_rows != rows && concrete.is_some_and(|c| c.is_batched(ix)) {
                shape[0] = run_rows;
            }
            let dt = prepared.input_dts[ix];
            let slot = &mut buffers[ix];
            let reusable = slot
                .as_mut()
                .is_some_and(|t| t.shape() == shape.as_slice() && Arc::get_mut(t).is_some());
            if !reusable {
                // SAFETY: every byte is overwritten below before the tensor is read.
                let t = unsafe { TractTensor::uninitialized_dt(dt, shape) }
                    .map_err(|e| Error::Internal(chain(&e)))?;
                *slot = Some(Arc::new(t));
            }
            let arc = slot.as_mut().expect("filled above");
            let t = Arc::get_mut(arc).expect("no other owner: checked or freshly made");
            let dst = t.as_bytes_mut();
            let src = view.bytes();
            if dst.len() < src.len() {
                return Err(Error::Internal(format!(
                    "input buffer holds {} bytes, request {}",
                    dst.len(),
                    src.len()
                )));
            }
            let (head, pad) = dst.split_at_mut(src.len());
            head.copy_from_slice(src);
            // Padding rows are zeros: finite for every model, and their outputs are dropped.
            pad.fill(0);
            values.push(arc.clone().into_tvalue());
        }
        outputs.clear();
        let state = match runner {
            Runner::Symbolic(state) => state,
            Runner::Concrete { states, tick } => {
                let c = concrete.expect("concrete runner on concrete plans");
                *tick += 1;
                let at = match states.iter().position(|(k, _, _)| k == planned) {
                    Some(at) => at,
                    None => {
                        let plan = c.plan(planned)?;
                        let state = State::new(&plan).map_err(|e| Error::Prepare(chain(&e)))?;
                        if states.len() >= c.limit() {
                            if let Some(old) = (0..states.len()).min_by_key(|&i| states[i].2) {
                                states.swap_remove(old);
                            }
                        }
                        states.push((planned.clone(), state, 0));
                        states.len() - 1
                    }
                };
                states[at].2 = *tick;
                &mut states[at].1
            }
        };
        let result = catch("running the model", || {
            state.run(values).map_err(|e| Error::Execution(chain(&e)))
        });
        match result {
            Ok(values) => {
                *outputs = values;
                *padded = run_rows != rows;
                if *padded {
                    cut.resize(outputs.len(), vec![]);
                    for ((shape, t), o) in cut.iter_mut().zip(outputs.iter()).zip(&info.outputs) {
                        shape.clear();
                        shape.extend_from_slice(t.shape());
                        if matches!(o.shape.first(), Some(Dim::Batch(_)))
                            && shape.first() == Some(&run_rows)
                        {
                            shape[0] = rows;
                        }
                    }
                }
                Ok(Outputs {
                    info: &info.outputs,
                    values: outputs,
                    cut: padded.then_some(cut.as_slice()),
                })
            }
            Err(e) => {
                // A failed run can leave tract's turn state half-written: start from a clean one.
                match runner {
                    Runner::Symbolic(state) => {
                        if let Plans::Symbolic(plan) = &prepared.plans {
                            if let Ok(fresh) = State::new(plan) {
                                *state = fresh;
                            }
                        }
                    }
                    Runner::Concrete { states, .. } => states.retain(|(k, _, _)| k != planned),
                }
                Err(e)
            }
        }
    }

    /// Zero-filled inputs of `batch` rows, or `None` when an input has a symbolic dimension
    /// other than the batch and `other` gives no size for it.
    pub(crate) fn zeros(&self, batch: usize, other: Option<usize>) -> Result<Option<Vec<Tensor>>> {
        let info = &self.model.inner.info;
        let mut tensors = Vec::with_capacity(info.inputs.len());
        for input in &info.inputs {
            let mut shape = Vec::with_capacity(input.shape.len());
            for d in &input.shape {
                match d {
                    Dim::Fixed(n) => shape.push(*n),
                    Dim::Batch(_) => shape.push(batch),
                    Dim::Symbol(_) => match other {
                        Some(n) => shape.push(n),
                        None => return Ok(None),
                    },
                }
            }
            let bytes = input
                .dtype
                .byte_len(&shape)
                .filter(|&b| b <= MAX_SYNTHETIC_INPUT_BYTES)
                .ok_or_else(|| {
                    Error::Prepare(format!(
                        "input `{}` would be {shape:?} {} at batch {batch}: more than the {} MiB \
                         Tern allocates to try a model out",
                        input.name,
                        input.dtype,
                        MAX_SYNTHETIC_INPUT_BYTES >> 20
                    ))
                })?;
            tensors.push(Tensor::from_bytes(input.dtype, shape, vec![0u8; bytes])?);
        }
        Ok(Some(tensors))
    }

    /// Runs zeros through the model so the first real request does not pay for lazy
    /// initialisation: batch 1, or every planned batch size for concrete plans (which prepares
    /// them). Models with symbolic dimensions other than the batch are skipped.
    pub fn warm_up(&mut self) -> Result<()> {
        let sizes = match &self.model.inner.plans {
            Plans::Concrete(c) if self.model.inner.info.batch.is_some() => c.batch_sizes().to_vec(),
            _ => vec![1],
        };
        for batch in sizes {
            let Some(tensors) = self.zeros(batch, None)? else {
                log::info!("warm-up skipped: an input has a symbolic dimension");
                return Ok(());
            };
            let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
            self.run(&views)?;
        }
        Ok(())
    }
}

/// Largest input the warm-up and the load-time probe make up: a model declaring absurd sizes
/// gets an error, not an allocation that takes the process down.
const MAX_SYNTHETIC_INPUT_BYTES: usize = 1 << 30;

/// Outputs of the last [`Session::run`], borrowed from the session without copying.
#[derive(Debug)]
pub struct Outputs<'a> {
    info: &'a [TensorInfo],
    values: &'a [TValue],
    /// Shapes without the padding rows, when the batch ran padded.
    cut: Option<&'a [Vec<usize>]>,
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
        let dtype = self.info[ix].dtype;
        match self.cut.and_then(|c| c.get(ix)) {
            Some(shape) => {
                let len = shape.iter().product::<usize>() * dtype.size();
                let bytes = tensor_bytes(t);
                Some(TensorView::from_bytes(
                    dtype,
                    shape,
                    &bytes[..len.min(bytes.len())],
                ))
            }
            None => Some(TensorView::from_bytes(dtype, t.shape(), tensor_bytes(t))),
        }
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
