//! Float islands between 8-bit tensors become 256-entry lookup tables.
//!
//! Quantized models keep activations such as h-swish, h-sigmoid or ReLU in float:
//! `DequantizeLinear → (Mul, Add, Min, Max, ...) → QuantizeLinear`, several full passes over
//! the tensor in f32. When such an island reads a single 8-bit tensor, is element-wise, and
//! uses only scalar constants, its result for one element depends on that element's byte
//! alone: 256 possible inputs. tract evaluates the island's own ops on all 256 of them at load
//! time, so the table is exactly what the island computes, and one byte lookup per element
//! replaces the passes.

use std::collections::{HashMap, HashSet};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::element_wise::ElementWiseOp;
use tract_onnx::tract_core::ops::quant::DequantizeLinearF32;

/// An element-wise function of one byte, as a table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Lut {
    table: Box<[u8; 256]>,
    out_dt: DatumType,
}

impl Op for Lut {
    fn name(&self) -> StaticName {
        "TernLut".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Lut {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        // SAFETY: every byte is written below.
        let mut out = unsafe { Tensor::uninitialized_dt(self.out_dt, x.shape())? };
        for (o, i) in out.as_bytes_mut().iter_mut().zip(x.as_bytes()) {
            *o = self.table[*i as usize];
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Lut {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out_dt.fact(inputs[0].shape.clone())))
    }
}

fn is_byte(dt: DatumType) -> bool {
    matches!(dt.unquantized(), DatumType::U8 | DatumType::I8)
}

/// Ops whose output element depends only on the same element of their inputs.
fn element_wise(node: &TypedNode) -> bool {
    node.op_is::<ElementWiseOp>()
        || node.op_is::<TypedBinOp>()
        || node.op_is::<DequantizeLinearF32>()
        || node.op_is::<Cast>()
}

/// The island ending at `end`: its nodes (in evaluation order) and its one 8-bit source.
fn island(model: &TypedModel, end: usize) -> Option<(Vec<usize>, OutletId)> {
    let end_fact = &model.node(end).outputs.first()?.fact;
    if !is_byte(end_fact.datum_type) || !element_wise(model.node(end)) {
        return None;
    }
    let shape = end_fact.shape.clone();
    let mut members = HashSet::new();
    let mut source: Option<OutletId> = None;
    let mut stack = vec![end];
    while let Some(id) = stack.pop() {
        if !members.insert(id) {
            continue;
        }
        for input in &model.node(id).inputs {
            let fact = model.outlet_fact(*input).ok()?;
            if let Some(k) = &fact.konst {
                // Only scalars broadcast identically over every element.
                if k.len() != 1 {
                    return None;
                }
                continue;
            }
            let producer = model.node(input.node);
            // Islands start at 8-bit tensors: an 8-bit input is the source, not a member.
            if is_byte(fact.datum_type) {
                match source {
                    None => source = Some(*input),
                    Some(s) if s == *input => {}
                    Some(_) => return None,
                }
                continue;
            }
            if !element_wise(producer) || fact.shape != shape || producer.outputs.len() != 1 {
                return None;
            }
            stack.push(input.node);
        }
    }
    let source = source?;
    if members.len() < 2 || model.outlet_fact(source).ok()?.shape != shape {
        return None;
    }
    // Nothing outside may read an intermediate value, or it would lose it.
    for &id in &members {
        if id == end {
            continue;
        }
        let outside = model.node(id).outputs[0]
            .successors
            .iter()
            .any(|s| !members.contains(&s.node));
        if outside || model.output_outlets().ok()?.contains(&OutletId::new(id, 0)) {
            return None;
        }
    }
    let order = model.eval_order().ok()?;
    let nodes = order.into_iter().filter(|n| members.contains(n)).collect();
    Some((nodes, source))
}

/// Runs the island's ops on every byte value.
fn table(model: &TypedModel, nodes: &[usize], source: OutletId) -> TractResult<Lut> {
    let src_fact = model.outlet_fact(source)?;
    let rank = src_fact.rank();
    let mut shape = vec![1usize; rank.max(1)];
    *shape.last_mut().expect("rank >= 1") = 256;
    let mut probe = TypedModel::default();
    let x = probe.add_source("x", src_fact.datum_type.fact(&shape))?;
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    map.insert(source, x);
    for &id in nodes {
        let node = model.node(id);
        let mut inputs = tvec![];
        for input in &node.inputs {
            let wire = match map.get(input) {
                Some(w) => *w,
                None => {
                    let k = model
                        .outlet_fact(*input)?
                        .konst
                        .clone()
                        .context("island input is neither the source nor a constant")?;
                    probe.add_const(format!("{}.{}", node.name, inputs.len()), k)?
                }
            };
            inputs.push(wire);
        }
        let out = probe.wire_node(&node.name, node.op.clone(), &inputs)?;
        map.insert(OutletId::new(id, 0), out[0]);
    }
    let end = *nodes.last().expect("islands have nodes");
    probe.select_output_outlets(&[map[&OutletId::new(end, 0)]])?;
    let bytes: Vec<u8> = (0..=255u8).collect();
    // SAFETY: all 256 bytes are written at once.
    let input = unsafe {
        let mut t = Tensor::uninitialized_dt(src_fact.datum_type, &shape)?;
        t.as_bytes_mut().copy_from_slice(&bytes);
        t
    };
    let result = probe.into_runnable()?.run(tvec![input.into_tvalue()])?;
    let out = &result[0];
    ensure!(out.len() == 256 && out.datum_type().size_of() == 1);
    let mut table = Box::new([0u8; 256]);
    table.copy_from_slice(out.as_bytes());
    Ok(Lut {
        table,
        out_dt: model.node(end).outputs[0].fact.datum_type,
    })
}

/// Replaces every float island between 8-bit tensors by a table; returns how many.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let mut done = 0;
    let ends: Vec<usize> = model
        .eval_order()?
        .into_iter()
        .filter(|&id| {
            model.node(id).outputs.len() == 1 && is_byte(model.node(id).outputs[0].fact.datum_type)
        })
        .collect();
    for end in ends {
        let Some((nodes, source)) = island(model, end) else {
            continue;
        };
        let lut = match table(model, &nodes, source) {
            Ok(lut) => lut,
            Err(e) => {
                log::debug!("{}: island kept ({e})", model.node(end).name);
                continue;
            }
        };
        let mut patch = TypedModelPatch::default();
        let x = patch.tap_model(model, source)?;
        let name = format!("{}.lut", model.node(end).name);
        let y = patch.wire_node(name, lut, &[x])?;
        patch.shunt_outside(model, OutletId::new(end, 0), y[0])?;
        patch.apply(model)?;
        done += 1;
    }
    Ok(done)
}
