//! Float islands between 8-bit tensors become lookup tables.
//!
//! Quantized models keep activations such as h-swish, h-sigmoid or ReLU in float:
//! `DequantizeLinear → (Mul, Add, Min, Max, ...) → QuantizeLinear`, several full passes over
//! the tensor in f32. When such an island reads a single 8-bit tensor, is element-wise, and
//! uses only scalar constants, its result for one element depends on that element's byte
//! alone: 256 possible inputs. tract evaluates the island's own ops on all 256 of them at load
//! time, so the table is exactly what the island computes, and one byte lookup per element
//! replaces the passes.
//!
//! Islands that read two 8-bit tensors — the residual `Add` of two branches, the
//! squeeze-and-excitation `Mul(x, gate)` with its per-channel gate broadcast over the plane —
//! depend on a pair of bytes: 65,536 inputs, evaluated the same way into a 64 KiB table.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use tract_onnx::tract_core::broadcast::multi_broadcast;
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

impl Lut {
    pub(crate) fn new(table: [u8; 256], out_dt: DatumType) -> Lut {
        Lut {
            table: Box::new(table),
            out_dt,
        }
    }

    pub(crate) fn table(&self) -> &[u8; 256] {
        &self.table
    }

    pub(crate) fn out_dt(&self) -> DatumType {
        self.out_dt
    }
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
        super::kernels::lookup(&self.table, x.as_bytes(), out.as_bytes_mut());
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Lut {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(self.out_dt.fact(inputs[0].shape.clone())))
    }
}

/// An element-wise function of two bytes, as a table indexed by `major << 8 | minor`.
///
/// Inputs have the output's rank; each dimension is the output's or 1 (broadcast). The input
/// broadcast more is the major one, so that where it is constant along the inner loop the
/// loop reads one 256-byte row of the table.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Lut2 {
    table: Arc<[u8]>,
    out_dt: DatumType,
}

impl Op for Lut2 {
    fn name(&self) -> StaticName {
        "TernLut2".into()
    }

    op_as_typed_op!();
}

impl EvalOp for Lut2 {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (major, minor) = args_2!(inputs);
        let shape = multi_broadcast(&[major.shape(), minor.shape()])?;
        ensure!(major.rank() == shape.len() && minor.rank() == shape.len());
        // SAFETY: every byte is written by `lookup2`, which covers the whole shape.
        let mut out = unsafe { Tensor::uninitialized_dt(self.out_dt, &shape)? };
        lookup2(
            &self.table,
            (major.as_bytes(), major.shape()),
            (minor.as_bytes(), minor.shape()),
            &shape,
            out.as_bytes_mut(),
        );
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Lut2 {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = multi_broadcast(&[inputs[0].shape.dims(), inputs[1].shape.dims()])?;
        Ok(tvec!(self.out_dt.fact(shape)))
    }
}

/// Strides of a row-major `dims` read as the (same-rank) `out` shape: 0 where broadcast.
fn broadcast_strides(dims: &[usize], out: &[usize]) -> TVec<usize> {
    let mut strides: TVec<usize> = tvec![0; out.len()];
    let mut stride = 1;
    for ax in (0..out.len()).rev() {
        strides[ax] = if dims[ax] == 1 { 0 } else { stride };
        stride *= dims[ax];
    }
    strides
}

/// `out[i] = table[major[i'] << 8 | minor[i'']]` over the broadcast `shape`.
///
/// Trailing axes along which each input is either contiguous or constant are merged into one
/// inner loop, so the usual cases (same shapes; a per-channel value over a plane) run as flat
/// loops; the outer axes are walked with an index counter.
fn lookup2(
    table: &[u8],
    (major, major_dims): (&[u8], &[usize]),
    (minor, minor_dims): (&[u8], &[usize]),
    shape: &[usize],
    out: &mut [u8],
) {
    let (sa, sb) = (
        broadcast_strides(major_dims, shape),
        broadcast_strides(minor_dims, shape),
    );
    let rank = shape.len();
    // The inner block: trailing axes with the same pattern (varying or not) for each input.
    // (major varies, minor varies) along an axis; axes of size 1 fit any pattern.
    let pattern = |ax: usize| (sa[ax] != 0, sb[ax] != 0);
    let reference = (0..rank).rev().find(|&ax| shape[ax] != 1).map(pattern);
    let mut split = rank;
    let mut inner = 1usize;
    while split > 0 {
        let ax = split - 1;
        if shape[ax] != 1 && Some(pattern(ax)) != reference {
            break;
        }
        inner *= shape[ax];
        split -= 1;
    }
    let (a_varies, b_varies) = reference.unwrap_or((false, false));
    let mut index: TVec<usize> = tvec![0; split];
    let (mut oa, mut ob) = (0usize, 0usize);
    for block in out.chunks_exact_mut(inner.max(1)) {
        match (a_varies, b_varies) {
            (true, true) => {
                let (a, b) = (&major[oa..oa + inner], &minor[ob..ob + inner]);
                for ((o, &x), &y) in block.iter_mut().zip(a).zip(b) {
                    *o = table[(x as usize) << 8 | y as usize];
                }
            }
            (false, true) => {
                let row = table[(major[oa] as usize) << 8..][..256]
                    .try_into()
                    .expect("a row of 256");
                super::kernels::lookup(row, &minor[ob..ob + inner], block);
            }
            (true, false) => {
                let y = minor[ob] as usize;
                for (o, &x) in block.iter_mut().zip(&major[oa..oa + inner]) {
                    *o = table[(x as usize) << 8 | y];
                }
            }
            (false, false) => block.fill(table[(major[oa] as usize) << 8 | minor[ob] as usize]),
        }
        // Next outer index; offsets move by the strides of the axes that changed.
        for ax in (0..split).rev() {
            index[ax] += 1;
            oa += sa[ax];
            ob += sb[ax];
            if index[ax] < shape[ax] {
                break;
            }
            oa -= sa[ax] * shape[ax];
            ob -= sb[ax] * shape[ax];
            index[ax] = 0;
        }
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

/// Same rank as `to`, each dimension equal to `to`'s or 1.
fn broadcasts_to(dims: &ShapeFact, to: &ShapeFact) -> bool {
    dims.rank() == to.rank()
        && dims
            .dims()
            .iter()
            .zip(to.dims())
            .all(|(d, t)| d == t || d.is_one())
}

/// The island ending at `end`: its nodes (in evaluation order) and its 8-bit sources (one or
/// two), the one broadcast more first.
fn island(model: &TypedModel, end: usize) -> Option<(Vec<usize>, TVec<OutletId>)> {
    let end_fact = &model.node(end).outputs.first()?.fact;
    if !is_byte(end_fact.datum_type) || !element_wise(model.node(end)) {
        return None;
    }
    let shape = end_fact.shape.clone();
    let mut members = HashSet::new();
    let mut sources: TVec<OutletId> = tvec![];
    let mut stack = vec![end];
    while let Some(id) = stack.pop() {
        if !members.insert(id) {
            continue;
        }
        for input in &model.node(id).inputs {
            let fact = model.outlet_fact(*input).ok()?;
            if let Some(k) = &fact.konst {
                // Only scalars broadcast identically over every element.
                if k.len() != 1 || k.rank() > shape.rank() {
                    return None;
                }
                continue;
            }
            let producer = model.node(input.node);
            // Islands start at 8-bit tensors: an 8-bit input is a source, not a member.
            if is_byte(fact.datum_type) {
                if !sources.contains(input) {
                    if sources.len() == 2 || !broadcasts_to(&fact.shape, &shape) {
                        return None;
                    }
                    sources.push(*input);
                }
                continue;
            }
            if !element_wise(producer)
                || !broadcasts_to(&fact.shape, &shape)
                || producer.outputs.len() != 1
            {
                return None;
            }
            stack.push(input.node);
        }
    }
    // Tables the island reads that are tables of its other source (h-swish: `x · q(h-sigmoid(x))`
    // once the h-sigmoid is a table) join it: then it is a function of one byte.
    let mut first: Vec<usize> = vec![];
    if let [a, b] = *sources.as_slice() {
        let lut_input = |o: OutletId| {
            let node = model.node(o.node);
            node.op_is::<Lut>().then(|| node.inputs[0])
        };
        let base = |o: OutletId| lut_input(o).unwrap_or(o);
        if base(a) == base(b) {
            first = [a, b]
                .into_iter()
                .filter(|&o| lut_input(o).is_some())
                .map(|o| o.node)
                .collect();
            sources = tvec![base(a)];
        }
    }
    match sources.as_slice() {
        [one] if model.outlet_fact(*one).ok()?.shape == shape => {}
        [a, b] => {
            let (fa, fb) = (model.outlet_fact(*a).ok()?, model.outlet_fact(*b).ok()?);
            let both = multi_broadcast(&[fa.shape.dims(), fb.shape.dims()]).ok()?;
            if both.as_slice() != shape.dims() {
                return None;
            }
            let ones = |f: &TypedFact| f.shape.dims().iter().filter(|d| d.is_one()).count();
            if ones(fb) > ones(fa) {
                sources.swap(0, 1);
            }
        }
        _ => return None,
    }
    if members.len() < 2 {
        return None;
    }
    // Intermediate values may have readers outside the island (h-swish reads its dequantized
    // input through the h-sigmoid and directly; a squeeze-and-excitation block pools the value
    // it then gates): the table replaces only the island's end, so they keep being computed
    // for those readers, exactly as before, and nothing runs twice.
    // `fuse` compacts the graph first, so node ids are in evaluation order; replacements only
    // append byte-valued tables, which are members only when they read the source itself, and
    // then go first.
    let mut nodes: Vec<usize> = members.into_iter().collect();
    nodes.sort_unstable();
    nodes.splice(0..0, first);
    Some((nodes, sources))
}

/// Runs the island's ops on every byte value (one source) or pair of byte values (two, the
/// first as the high byte of the index), and returns the outputs in that order.
///
/// Two sources go in as a column `[256, 1]` and a row `[1, 256]` of all byte values: what
/// each computes on its own runs on 256 values, and broadcasting lays the 65,536 results out
/// in table order.
fn table(model: &TypedModel, nodes: &[usize], sources: &[OutletId]) -> TractResult<Vec<u8>> {
    let rank = model.outlet_fact(sources[0])?.rank().max(sources.len());
    let count = 1usize << (8 * sources.len());
    let mut probe = TypedModel::default();
    let mut map: HashMap<OutletId, OutletId> = HashMap::new();
    let mut feeds = tvec![];
    for (ix, source) in sources.iter().enumerate() {
        let dt = model.outlet_fact(*source)?.datum_type;
        let mut shape = vec![1usize; rank];
        shape[rank - sources.len() + ix] = 256;
        let x = probe.add_source(format!("x{ix}"), dt.fact(&shape))?;
        map.insert(*source, x);
        let bytes: Vec<u8> = (0..=255).collect();
        // SAFETY: all 256 bytes are written at once.
        let feed = unsafe {
            let mut t = Tensor::uninitialized_dt(dt, &shape)?;
            t.as_bytes_mut().copy_from_slice(&bytes);
            t
        };
        feeds.push(feed.into_tvalue());
    }
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
                        .context("island input is neither a source nor a constant")?;
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
    let result = probe.into_runnable()?.run(feeds)?;
    let out = &result[0];
    ensure!(out.len() == count && out.datum_type().size_of() == 1);
    Ok(out.as_bytes().to_vec())
}

/// Replaces every float island between 8-bit tensors by a table; returns how many tables run.
pub(crate) fn fuse(model: &mut TypedModel) -> TractResult<usize> {
    // A float graph has no island: spare it the two passes over every node.
    let has_bytes = model
        .nodes()
        .iter()
        .any(|n| n.outputs.iter().any(|o| is_byte(o.fact.datum_type)));
    if !has_bytes {
        return Ok(0);
    }
    model.compact()?;
    let ends: Vec<usize> = (0..model.nodes().len())
        .filter(|&id| {
            model.node(id).outputs.len() == 1 && is_byte(model.node(id).outputs[0].fact.datum_type)
        })
        .collect();
    for end in ends {
        let Some((nodes, sources)) = island(model, end) else {
            continue;
        };
        let bytes = match table(model, &nodes, &sources) {
            Ok(bytes) => bytes,
            Err(e) => {
                log::debug!("{}: island kept ({e})", model.node(end).name);
                continue;
            }
        };
        let out_dt = model.node(end).outputs[0].fact.datum_type;
        let mut patch = TypedModelPatch::default();
        let mut taps = tvec![];
        for source in &sources {
            taps.push(patch.tap_model(model, *source)?);
        }
        let name = format!("{}.lut", model.node(end).name);
        let y = if let [_] = sources.as_slice() {
            let mut table = Box::new([0u8; 256]);
            table.copy_from_slice(&bytes);
            patch.wire_node(name, Lut { table, out_dt }, &taps)?
        } else {
            let op = Lut2 {
                table: bytes.into(),
                out_dt,
            };
            patch.wire_node(name, op, &taps)?
        };
        patch.shunt_outside(model, OutletId::new(end, 0), y[0])?;
        patch.apply(model)?;
    }
    // Drops what the tables replaced (tables absorbed by later ones included), so that
    // inspection counts only what runs.
    model.compact()?;
    Ok(model
        .nodes()
        .iter()
        .filter(|n| n.op_is::<Lut>() || n.op_is::<Lut2>())
        .count())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::int8::Lcg;

    /// `lookup2` by the definition: every output index mapped back into each input.
    fn reference(
        table: &[u8],
        (a, ad): (&[u8], &[usize]),
        (b, bd): (&[u8], &[usize]),
        shape: &[usize],
    ) -> Vec<u8> {
        let len: usize = shape.iter().product();
        let offset = |dims: &[usize], mut flat: usize| {
            let (mut at, mut stride) = (0, 1);
            for ax in (0..shape.len()).rev() {
                let i = flat % shape[ax];
                flat /= shape[ax];
                if dims[ax] != 1 {
                    at += i * stride;
                }
                stride *= dims[ax];
            }
            at
        };
        (0..len)
            .map(|i| table[(a[offset(ad, i)] as usize) << 8 | b[offset(bd, i)] as usize])
            .collect()
    }

    #[test]
    fn two_byte_lookups_broadcast_like_numpy() {
        let mut rng = Lcg(7);
        let table: Vec<u8> = (0..65536).map(|_| rng.byte()).collect();
        for case in 0..500 {
            let rank = rng.below(5);
            let shape: Vec<usize> = (0..rank).map(|_| rng.below(6)).collect();
            // Each input takes each dimension in full or as 1.
            let mut dims = || -> Vec<usize> {
                shape
                    .iter()
                    .map(|&d| if rng.below(3) == 0 { 1 } else { d })
                    .collect()
            };
            let (ad, bd) = (dims(), dims());
            let out_shape: Vec<usize> = ad
                .iter()
                .zip(&bd)
                .map(|(&x, &y)| if x == 1 { y } else { x })
                .collect();
            let a: Vec<u8> = (0..ad.iter().product()).map(|_| rng.byte()).collect();
            let b: Vec<u8> = (0..bd.iter().product()).map(|_| rng.byte()).collect();
            let mut out = vec![0u8; out_shape.iter().product()];
            lookup2(&table, (&a, &ad), (&b, &bd), &out_shape, &mut out);
            let want = reference(&table, (&a, &ad), (&b, &bd), &out_shape);
            assert_eq!(
                out, want,
                "case {case}: {ad:?} with {bd:?} -> {out_shape:?}"
            );
        }
    }
}
