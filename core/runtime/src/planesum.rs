//! Sums of f32 planes (a `Reduce<Sum>` over the trailing axes, and the scale that makes it a
//! mean), placed into tract's decluttered graph in place of tract's own.
//!
//! Every squeeze-and-excitation block of a MobileNetV3 starts with a global average pool:
//! tract runs it as a `Reduce<Sum>` over H and W through ndarray's generic axis sums, then a
//! `Mul` by 1/(H·W). On the 48×192 MobileNet that reduction alone was 4.5% of a forward pass,
//! for a few thousand additions. Here each plane is one contiguous run summed in eight lanes,
//! and the scale is applied as the sum is stored.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::Mul;
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer};

use crate::dwconv::{other_scalar, replace_run};

/// The sum of every run of the axes from `from` on, times `scale`: those axes become 1.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PlaneSum {
    pub(crate) from: usize,
    pub(crate) scale: f32,
}

impl Eq for PlaneSum {}

impl PlaneSum {
    fn run(&self, x: &Tensor) -> TractResult<Tensor> {
        ensure!(
            x.rank() >= self.from,
            "expected at least {} axes, got shape {:?}",
            self.from,
            x.shape()
        );
        let plane: usize = x.shape()[self.from..].iter().product();
        let mut shape: TVec<usize> = x.shape().into();
        shape[self.from..].iter_mut().for_each(|d| *d = 1);
        let mut out = Tensor::zero::<f32>(&shape)?;
        if plane == 0 {
            return Ok(out);
        }
        let input = x.try_as_plain_ram()?.as_slice::<f32>()?;
        let mut view = out.try_as_plain_ram_mut()?;
        for (o, p) in view
            .as_slice_mut::<f32>()?
            .iter_mut()
            .zip(input.chunks_exact(plane))
        {
            *o = sum(p) * self.scale;
        }
        Ok(out)
    }
}

/// Eight independent partial sums, so that the loop vectorises (a single running sum cannot
/// be reordered by the compiler).
pub(crate) fn sum(values: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (l, v) in lanes.iter_mut().zip(chunk) {
            *l += v;
        }
    }
    lanes.iter().sum::<f32>() + rest
}

impl Op for PlaneSum {
    fn name(&self) -> StaticName {
        "TernPlaneSum".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "sum over the axes from {} on, times {}",
            self.from, self.scale
        )])
    }

    op_as_typed_op!();
}

crate::dwconv::eval_one_input!(PlaneSum);

impl TypedOp for PlaneSum {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 1, "TernPlaneSum takes one input");
        let mut shape: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        ensure!(shape.len() >= self.from, "TernPlaneSum: input rank");
        shape[self.from..].iter_mut().for_each(|d| *d = 1.into());
        Ok(tvec!(f32::fact(shape)))
    }
}

/// Replaces every f32 `Reduce<Sum>` over trailing axes, with the `Mul` by a constant that
/// follows it when nothing else reads the sum; returns how many.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    let candidates: Vec<usize> = model
        .nodes()
        .iter()
        .filter(|n| {
            n.op_as::<Reduce>()
                .is_some_and(|r| r.reducer == Reducer::Sum)
                && n.inputs.len() == 1
                && model
                    .outlet_fact(n.inputs[0])
                    .is_ok_and(|f| f.datum_type == DatumType::F32)
        })
        .map(|n| n.id)
        .collect();
    let mut fused = 0;
    for id in candidates {
        let node = model.node(id);
        let reduce = node.op_as::<Reduce>().expect("filtered above");
        let rank = model.outlet_fact(node.inputs[0])?.rank();
        let mut axes = reduce.axes.to_vec();
        axes.sort_unstable();
        let Some(&from) = axes.first() else {
            continue;
        };
        if axes != (from..rank).collect::<Vec<_>>() {
            continue;
        }
        let (scale, absorbed) = match scale_after(model, id) {
            Some((scale, mul)) => (scale, vec![mul]),
            None => (1.0, vec![]),
        };
        replace_run(model, id, 0, &absorbed, PlaneSum { from, scale })?;
        fused += 1;
    }
    if fused > 0 {
        model.compact()?;
    }
    Ok(fused)
}

/// The constant a sum is multiplied by next, and that `Mul` node, when the sum is not an
/// output of the model, the `Mul` its sole reader and of the same shape.
fn scale_after(model: &TypedModel, id: usize) -> Option<(f32, usize)> {
    let outlet = OutletId::new(id, 0);
    if model.output_outlets().ok()?.contains(&outlet) {
        return None;
    }
    let next = model.single_succ(id).ok()??;
    let bin = next.op_as::<TypedBinOp>()?;
    if !bin.0.is::<Mul>() || next.outputs.len() != 1 {
        return None;
    }
    let (a, b) = (
        model.outlet_fact(outlet).ok()?,
        next.outputs[0].fact.clone(),
    );
    if a.shape != b.shape || b.datum_type != DatumType::F32 {
        return None;
    }
    Some((other_scalar(model, next, outlet)?, next.id))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::int8::Lcg;
    use tract_onnx::tract_core::ops::math;

    /// Sums over trailing axes, with and without the scale after them, give what tract's
    /// reduction gives; sums over other axes, and scales by a tensor, stay with tract.
    #[test]
    fn trailing_sums_and_their_scale_give_tracts_results() -> TractResult<()> {
        let mut rng = Lcg(17);
        // (input shape, reduced axes, multiply by a constant after, replaced, mul taken)
        type Case = (&'static [usize], &'static [usize], bool, bool, bool);
        let cases: [Case; 8] = [
            (&[1, 88, 3, 12], &[2, 3], true, true, true),
            (&[2, 5, 7, 9], &[2, 3], false, true, false),
            (&[5, 37], &[1], true, true, true),
            (&[3, 4, 5], &[0, 1, 2], false, true, false),
            (&[2, 3, 0, 4], &[2, 3], true, true, true),
            (&[0, 3, 4, 4], &[2, 3], false, true, false),
            (&[2, 6, 5, 4], &[1, 2], false, false, false),
            (&[2, 6, 5, 4], &[0, 3], true, false, false),
        ];
        for (case, &(shape, axes, scaled, replaced, taken)) in cases.iter().enumerate() {
            let mut m = TypedModel::default();
            let x = m.add_source("x", f32::fact(shape))?;
            let reduce = Reduce {
                axes: axes.iter().copied().collect(),
                reducer: Reducer::Sum,
            };
            let mut y = m.wire_node("sum", reduce, &[x])?[0];
            if scaled {
                let ones = tvec![1usize; shape.len()];
                let k = m.add_const("k", Tensor::from_shape(&ones, &[0.25f32])?)?;
                y = m.wire_node("mean", math::mul(), &[y, k])?[0];
            }
            m.select_output_outlets(&[y])?;
            let n: usize = shape.iter().product();
            let input: Vec<f32> = (0..n).map(|_| rng.unit() - 0.5).collect();
            let input = Tensor::from_shape(shape, &input)?;
            let want = m
                .clone()
                .into_runnable()?
                .run(tvec![input.clone().into()])?;
            let before = m.nodes().len();
            assert_eq!(fuse(&mut m)? == 1, replaced, "case {case}");
            if replaced {
                let gone = if taken { 2 } else { 0 };
                assert_eq!(m.nodes().len(), before - gone, "case {case}");
            }
            let got = m.into_runnable()?.run(tvec![input.into()])?;
            assert_eq!(got[0].shape(), want[0].shape(), "case {case}");
            let got = got[0].try_as_plain_ram()?.as_slice::<f32>()?;
            let want = want[0].try_as_plain_ram()?.as_slice::<f32>()?;
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert!((g - w).abs() <= 1e-5, "case {case}, output {i}: {g} vs {w}");
            }
        }
        Ok(())
    }

    /// A sum that is also an output of the model keeps its scale as a separate node.
    #[test]
    fn a_sum_read_as_an_output_keeps_its_scale_apart() -> TractResult<()> {
        let mut m = TypedModel::default();
        let x = m.add_source("x", f32::fact([1, 4, 3, 3]))?;
        let s = m.wire_node(
            "sum",
            Reduce {
                axes: tvec![2, 3],
                reducer: Reducer::Sum,
            },
            &[x],
        )?[0];
        let k = m.add_const("k", Tensor::from_shape(&[1, 1, 1, 1], &[0.5f32])?)?;
        let y = m.wire_node("mean", math::mul(), &[s, k])?[0];
        m.select_output_outlets(&[s, y])?;
        assert_eq!(fuse(&mut m)?, 1);
        let op = m
            .nodes()
            .iter()
            .find_map(|n| n.op_as::<PlaneSum>())
            .expect("replaced");
        assert_eq!(op.scale, 1.0);
        let out = m
            .into_runnable()?
            .run(tvec![Tensor::from_shape(&[1, 4, 3, 3], &[1f32; 36])?.into()])?;
        assert_eq!(out[0].try_as_plain_ram()?.as_slice::<f32>()?, &[9.0; 4]);
        assert_eq!(out[1].try_as_plain_ram()?.as_slice::<f32>()?, &[4.5; 4]);
        Ok(())
    }
}
