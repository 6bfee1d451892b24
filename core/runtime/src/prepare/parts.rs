//! Large graphs prepared in parts, the parts in parallel.
//!
//! tract's declutter and optimize rewrite a graph one patch at a time, and applying a patch
//! costs time in proportion to the whole graph (nodes are compared, moved and renumbered): the
//! work grows with the square of the node count. Cut at wires where the graph narrows to a
//! single tensor, each part is a small graph, and the parts prepare on separate cores: on
//! MobileNetV3 this is most of the load. The cut is made on the imported graph, before tract
//! types it: the parts are typed one after the other, each handed to the pool as soon as it
//! is, so typing (serial) overlaps the rest (`type_and_map`); a graph whose parts do not type
//! alone is typed whole and cut after (`split`). At run time the parts run one after the other,
//! handing each other their tensors; cuts sit only before convolutions and matrix products,
//! which tract never fuses with the op before them, so no fusion is lost.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use tract_onnx::prelude::*;
use tract_onnx::tract_core::model::{Graph, SpecialOps};
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_hir::infer::Factoid;

use crate::error::{catch, Error, Result};

/// Nodes (constants aside) below which a graph is prepared whole.
const SMALL: usize = 48;
/// Nodes a part aims for beyond one per core, in a typed graph and in an imported one (where
/// one ONNX node is often several typed ones).
const PART_NODES: usize = 28;
pub(crate) const PART_NODES_IMPORTED: usize = 20;
/// Nodes a part has at least.
const MIN_PART: usize = 6;
/// Work of one node, and the weight bytes that cost as much to pack.
const NODE_COST: usize = 1;
const WEIGHT_BYTES: usize = 160 << 10;
/// Parts at most: each adds a hand-over at run time.
const MAX_PARTS: usize = 16;

/// One part of a graph, with where its inputs come from and its outputs go: slots of the
/// values table (the model's inputs first, then every part's outputs in turn).
pub(crate) struct Part<M> {
    pub(crate) model: M,
    inputs: Vec<usize>,
    /// Per input: whether a later part or the caller still reads it (else it is moved in, so
    /// tract may reuse its buffer).
    kept: Vec<bool>,
    outputs: Vec<usize>,
}

/// A graph as parts run in order.
pub(crate) struct Parts<M> {
    pub(crate) parts: Vec<Part<M>>,
    /// Nodes after which the graph was cut.
    pub(crate) cuts: Vec<String>,
    inputs: usize,
    outputs: Vec<usize>,
    slots: usize,
}

impl<M> Parts<M> {
    /// The whole graph as its one part.
    pub(crate) fn whole(model: M, inputs: usize, outputs: usize) -> Parts<M> {
        Parts {
            parts: vec![Part {
                model,
                inputs: (0..inputs).collect(),
                kept: vec![false; inputs],
                outputs: (inputs..inputs + outputs).collect(),
            }],
            inputs,
            outputs: (inputs..inputs + outputs).collect(),
            slots: inputs + outputs,
            cuts: vec![],
        }
    }

    /// Each part turned into something else on up to `threads` threads, in any order; the
    /// first error (in part order) wins. Panics are caught per part.
    pub(crate) fn map_parallel<N: Send>(
        self,
        threads: usize,
        f: impl Fn(M) -> Result<N> + Sync,
    ) -> Result<Parts<N>>
    where
        M: Send,
    {
        let Parts {
            parts,
            inputs,
            outputs,
            slots,
            cuts,
        } = self;
        let mut shells = Vec::with_capacity(parts.len());
        let (fed, done) = pool(
            threads,
            parts.len(),
            |to_pool| {
                for (ix, p) in parts.into_iter().enumerate() {
                    shells.push((p.inputs, p.kept, p.outputs));
                    // The workers outlive the feeding: sending cannot fail.
                    let _ = to_pool.send((ix, p.model));
                }
                Ok::<_, String>(())
            },
            f,
        );
        fed.map_err(Error::Internal)?;
        let parts = shells
            .into_iter()
            .zip(prepared(done)?)
            .map(|((inputs, kept, outputs), model)| Part {
                model,
                inputs,
                kept,
                outputs,
            })
            .collect();
        Ok(Parts {
            parts,
            inputs,
            outputs,
            slots,
            cuts,
        })
    }

    pub(crate) fn map<N>(self, mut f: impl FnMut(M) -> N) -> Parts<N> {
        Parts {
            parts: self
                .parts
                .into_iter()
                .map(|p| Part {
                    model: f(p.model),
                    inputs: p.inputs,
                    kept: p.kept,
                    outputs: p.outputs,
                })
                .collect(),
            inputs: self.inputs,
            outputs: self.outputs,
            slots: self.slots,
            cuts: self.cuts,
        }
    }
}

/// Runs `f` on `threads` threads over the jobs `feed` sends (job `ix` of `n`). The calling
/// thread feeds, while the others work, then works too: a feed that takes time (typing) overlaps
/// the jobs. After a failed job, or a feed that fails, the jobs not yet started are skipped.
/// Returns what the feed returned and each job's result (`None`: never sent, or skipped).
fn pool<J: Send, N: Send, R>(
    threads: usize,
    n: usize,
    feed: impl FnOnce(&Sender<(usize, J)>) -> std::result::Result<R, String>,
    f: impl Fn(J) -> Result<N> + Sync,
) -> (std::result::Result<R, String>, Vec<Option<Result<N>>>) {
    let (tx, rx) = std::sync::mpsc::channel::<(usize, J)>();
    let rx = Mutex::new(rx);
    let stop = AtomicBool::new(false);
    let done: Vec<Mutex<Option<Result<N>>>> = (0..n).map(|_| Mutex::new(None)).collect();
    let work = || loop {
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        let Ok((ix, job)) = job else { break };
        if stop.load(Ordering::Relaxed) {
            continue;
        }
        let made = catch("preparing a part of the model", || f(job));
        if made.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        if let Some(slot) = done.get(ix) {
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(made);
        }
    };
    let fed = std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, n) {
            s.spawn(work);
        }
        let fed = feed(&tx);
        if fed.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        // Every job is sent: the workers stop once the queue is empty.
        drop(tx);
        work();
        fed
    });
    let done = done
        .into_iter()
        .map(|d| d.into_inner().unwrap_or_else(|p| p.into_inner()))
        .collect();
    (fed, done)
}

/// Every job's result, or the first error. A job skipped after a failure can come before the
/// failed one (a worker that took it late sees the stop): the failure is what to report; a job
/// never run with nothing failed is an internal error.
fn prepared<N>(done: Vec<Option<Result<N>>>) -> Result<Vec<N>> {
    let mut results = Vec::with_capacity(done.len());
    let mut skipped = false;
    for d in done {
        match d {
            Some(Ok(n)) => results.push(n),
            Some(Err(e)) => return Err(e),
            None => skipped = true,
        }
    }
    if skipped {
        return Err(Error::Internal("a part was not prepared".into()));
    }
    Ok(results)
}

/// What typing an imported graph in parts gave.
pub(crate) enum Typed<N> {
    /// Every part typed and prepared; the facts of the graph's inputs and outputs.
    Done {
        parts: Parts<N>,
        inputs: Vec<TypedFact>,
        outputs: Vec<TypedFact>,
    },
    /// A part did not type on its own (tract's analysis may need facts from later in the
    /// graph): the reason; the graph is to be typed whole.
    Untyped(String),
}

/// Types the parts of an imported graph one after the other, each from the facts its
/// predecessors' outputs got, and hands each to `f` on the pool as soon as it is typed: tract's
/// typing, serial and as long as a third of the preparation, runs beside the parts' declutter
/// and optimize. Typed apart, each part also costs tract less (its typing does work in the
/// square of the nodes, in the constants it dedupes).
pub(crate) fn type_and_map<N: Send>(
    parts: Parts<InferenceModel>,
    threads: usize,
    f: impl Fn(TypedModel) -> Result<N> + Sync,
) -> Result<Typed<N>> {
    let Parts {
        parts,
        inputs: n_in,
        outputs,
        slots,
        cuts,
    } = parts;
    let mut facts: Vec<Option<TypedFact>> = vec![None; slots];
    let n = parts.len();
    let (typed, done) = pool(
        threads,
        n,
        |to_pool| type_parts(parts, n_in, &mut facts, to_pool),
        f,
    );
    let shells = match typed {
        Ok(shells) => shells,
        Err(why) => return Ok(Typed::Untyped(why)),
    };
    let mut prepared = prepared(done)?.into_iter();
    let parts = shells
        .into_iter()
        .map(|p| {
            Ok(Part {
                model: prepared
                    .next()
                    .ok_or_else(|| Error::Internal("a part was not prepared".into()))?,
                inputs: p.inputs,
                kept: p.kept,
                outputs: p.outputs,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let fact = |s: usize| {
        facts[s]
            .clone()
            .ok_or_else(|| Error::Internal(format!("slot {s} of the parts was never typed")))
    };
    Ok(Typed::Done {
        inputs: (0..n_in).map(fact).collect::<Result<_>>()?,
        outputs: outputs.iter().map(|&s| fact(s)).collect::<Result<_>>()?,
        parts: Parts {
            parts,
            inputs: n_in,
            outputs,
            slots,
            cuts,
        },
    })
}

/// The typing half of [`type_and_map`]: each part typed in turn and sent to the pool; what is
/// left of the parts (their wiring); or why a part would not type.
fn type_parts(
    parts: Vec<Part<InferenceModel>>,
    n_in: usize,
    facts: &mut [Option<TypedFact>],
    to_pool: &Sender<(usize, TypedModel)>,
) -> std::result::Result<Vec<Part<()>>, String> {
    let mut shells = Vec::with_capacity(parts.len());
    for (k, part) in parts.into_iter().enumerate() {
        let Part {
            mut model,
            inputs,
            kept,
            outputs,
        } = part;
        for (i, &s) in inputs.iter().enumerate() {
            if s >= n_in {
                let fact = facts[s]
                    .as_ref()
                    .ok_or_else(|| format!("part {k} reads slot {s} before it is typed"))?;
                let outlet = model.inputs[i];
                model
                    .set_outlet_fact(outlet, InferenceFact::from(fact))
                    .map_err(|e| format!("{e:#}"))?;
            }
        }
        let started = std::time::Instant::now();
        let typed = catch("typing a part of the model", || {
            model
                .into_typed()
                .map_err(|e| Error::Prepare(format!("{e:#}")))
        })
        .map_err(|e| format!("part {k}: {e}"))?;
        log::debug!("part {k} typed in {:.1?}", started.elapsed());
        if typed.inputs.len() != inputs.len() || typed.outputs.len() != outputs.len() {
            return Err(format!("part {k} changed its interface when typed"));
        }
        for (i, &s) in inputs.iter().enumerate() {
            if s < n_in && facts[s].is_none() {
                facts[s] = Some(
                    typed
                        .outlet_fact(typed.inputs[i])
                        .map_err(|e| format!("{e:#}"))?
                        .clone(),
                );
            }
        }
        for (j, &s) in outputs.iter().enumerate() {
            let o = typed.outputs[j];
            // A value tract computed at typing (a constant) is no tensor to hand over.
            if typed.nodes[o.node].op_is::<Const>() || typed.inputs.contains(&o) {
                return Err(format!("an output of part {k} is a constant or an input"));
            }
            facts[s] = Some(typed.outlet_fact(o).map_err(|e| format!("{e:#}"))?.clone());
        }
        // The pool is gone only when this thread is, which cannot be: ignore.
        let _ = to_pool.send((k, typed));
        shells.push(Part {
            model: (),
            inputs,
            kept,
            outputs,
        });
    }
    Ok(shells)
}

/// What splitting reads of a fact: the bytes of the constant it carries, if any.
pub(crate) trait Weighed {
    fn const_bytes(&self) -> usize;
}

impl Weighed for TypedFact {
    fn const_bytes(&self) -> usize {
        self.konst
            .as_ref()
            .map_or(0, |k| k.len() * k.datum_type().size_of())
    }
}

impl Weighed for InferenceFact {
    fn const_bytes(&self) -> usize {
        self.value
            .concretize()
            .map_or(0, |k| k.len() * k.datum_type().size_of())
    }
}

/// The op type of a tract graph, typed or only imported: what cutting needs of it. (A trait
/// alias, which stable Rust lacks, spelled as a trait with a blanket impl.)
pub(crate) trait GraphOp:
    std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static
{
}

impl<O> GraphOp for O where
    O: std::fmt::Debug + std::fmt::Display + AsRef<dyn Op> + AsMut<dyn Op> + Clone + 'static
{
}

/// Splits a typed graph into parts for `threads` cores (fewer when it has fewer cuts, one when
/// it is small). The graph must not be decluttered yet: the parts are, each on its own.
pub(crate) fn split(model: TypedModel, threads: usize) -> TractResult<Parts<TypedModel>> {
    let (n_in, n_out) = (model.inputs.len(), model.outputs.len());
    Ok(cut(&model, threads, PART_NODES)?.unwrap_or_else(|| Parts::whole(model, n_in, n_out)))
}

/// The parts of a graph, typed or only imported, or `None` when it is better prepared whole.
pub(crate) fn cut<F, O>(
    model: &Graph<F, O>,
    threads: usize,
    part_nodes: usize,
) -> TractResult<Option<Parts<Graph<F, O>>>>
where
    F: Fact + Clone + Weighed + 'static,
    O: GraphOp,
    Graph<F, O>: SpecialOps<F, O>,
{
    let n_in = model.inputs.len();
    let order = model.eval_order()?;
    let is_const = |id: usize| model.nodes[id].op_is::<Const>();
    let is_source = |id: usize| model.inputs.iter().any(|o| o.node == id);
    let body: Vec<usize> = order
        .iter()
        .copied()
        .filter(|&id| !is_const(id) && !is_source(id))
        .collect();
    let wanted = wanted(body.len(), threads, part_nodes).min(body.len() / MIN_PART);
    // A model output a part cannot hand over (a constant, an input) keeps the graph whole, as
    // does an input nothing reads (no part would give it a type).
    let odd_output = model
        .outputs
        .iter()
        .any(|o| is_const(o.node) || is_source(o.node));
    let unread_input = model
        .inputs
        .iter()
        .any(|o| model.nodes[o.node].outputs[o.slot].successors.is_empty());
    if wanted < 2 || body.len() < SMALL || odd_output || unread_input {
        return Ok(None);
    }
    let cuts = pick(model, &body, wanted);
    if cuts.is_empty() {
        return Ok(None);
    }
    // Part of every body node: the number of cuts at or before its position.
    let mut part_of = vec![usize::MAX; model.nodes.len()];
    let mut p = 0;
    for (pos, &id) in body.iter().enumerate() {
        part_of[id] = p;
        if cuts.get(p) == Some(&pos) {
            p += 1;
        }
    }
    let n_parts = cuts.len() + 1;
    // Slots: model inputs, then outlets read by another part or returned, in part order.
    let mut slot: HashMap<OutletId, usize> = model
        .inputs
        .iter()
        .enumerate()
        .map(|(i, o)| (*o, i))
        .collect();
    let mut next_slot = n_in;
    let mut part_outputs: Vec<Vec<OutletId>> = vec![vec![]; n_parts];
    for &id in &body {
        let node = &model.nodes[id];
        for (ix, output) in node.outputs.iter().enumerate() {
            let outlet = OutletId::new(id, ix);
            let crosses = output
                .successors
                .iter()
                .any(|s| part_of[s.node] != usize::MAX && part_of[s.node] != part_of[id]);
            if crosses || model.outputs.contains(&outlet) {
                part_outputs[part_of[id]].push(outlet);
            }
        }
    }
    for outs in &part_outputs {
        for o in outs {
            slot.insert(*o, next_slot);
            next_slot += 1;
        }
    }
    let mut parts = Vec::with_capacity(n_parts);
    for (p, outs) in part_outputs.iter().enumerate() {
        let mut m = Graph::<F, O> {
            symbols: model.symbols.clone(),
            ..Graph::default()
        };
        let mut map: HashMap<OutletId, OutletId> = HashMap::new();
        let mut inputs = vec![];
        for &id in body.iter().filter(|&&id| part_of[id] == p) {
            let node = &model.nodes[id];
            let mut wires = TVec::new();
            for input in &node.inputs {
                let wire = match map.get(input) {
                    Some(w) => *w,
                    None => {
                        let from = &model.nodes[input.node];
                        let fact = model.outlet_fact(*input)?.clone();
                        let w = if is_const(input.node) {
                            let c = m.add_node(from.name.clone(), from.op.clone(), tvec!(fact))?;
                            OutletId::new(c, 0)
                        } else {
                            let s = slot.get(input).copied().ok_or_else(|| {
                                tract_onnx::tract_core::internal::format_err!(
                                    "wire {input:?} into part {p} has no slot"
                                )
                            })?;
                            inputs.push(s);
                            m.add_source(format!("{}.{}", from.name, input.slot), fact)?
                        };
                        map.insert(*input, w);
                        w
                    }
                };
                wires.push(wire);
            }
            let facts = node.outputs.iter().map(|o| o.fact.clone()).collect();
            let new = m.add_node(node.name.clone(), node.op.clone(), facts)?;
            for (ix, w) in wires.iter().enumerate() {
                m.add_edge(*w, InletId::new(new, ix))?;
            }
            for ix in 0..node.outputs.len() {
                map.insert(OutletId::new(id, ix), OutletId::new(new, ix));
            }
        }
        let out_wires: Vec<OutletId> = outs.iter().map(|o| map[o]).collect();
        m.select_output_outlets(&out_wires)?;
        parts.push(Part {
            model: m,
            kept: vec![false; inputs.len()],
            inputs,
            outputs: outs.iter().map(|o| slot[o]).collect(),
        });
    }
    let outputs: Vec<usize> = model.outputs.iter().map(|o| slot[o]).collect();
    for p in 0..parts.len() {
        let (now, later) = parts.split_at_mut(p + 1);
        let part = &mut now[p];
        for (i, s) in part.inputs.iter().enumerate() {
            part.kept[i] = outputs.contains(s) || later.iter().any(|l| l.inputs.contains(s));
        }
    }
    let cuts: Vec<String> = cuts
        .iter()
        .map(|&pos| model.nodes[body[pos]].name.clone())
        .collect();
    log::debug!(
        "graph of {} nodes split into {} parts after {cuts:?}",
        body.len(),
        parts.len(),
    );
    Ok(Some(Parts {
        parts,
        inputs: n_in,
        outputs,
        slots: next_slot,
        cuts,
    }))
}

/// Positions in `body` after which to cut: where exactly one wire is alive, it is no model
/// output, and it feeds only convolutions and matrix products, or residual additions when no
/// convolution writes it (tract fuses an op into the product before it, never after). Chosen
/// nearest to even shares of the work, counted in nodes and in weight bytes (optimizing packs
/// every weight).
fn pick<F, O>(model: &Graph<F, O>, body: &[usize], wanted: usize) -> Vec<usize>
where
    F: Fact + Clone + Weighed + 'static,
    O: GraphOp,
{
    let mut pos_of = vec![usize::MAX; model.nodes.len()];
    for (pos, &id) in body.iter().enumerate() {
        pos_of[id] = pos;
    }
    // A model output read by no later node needs no wire: its part hands it to the caller.
    let last_use = |outlet: OutletId| -> usize {
        model.nodes[outlet.node].outputs[outlet.slot]
            .successors
            .iter()
            .map(|s| pos_of[s.node])
            .filter(|&p| p != usize::MAX)
            .max()
            .unwrap_or(0)
    };
    let op = |id: usize| model.nodes[id].op.as_ref().name();
    let heavy = |id: usize| super::heavy_kind(&op(id)).is_some();
    // Lookup-table islands start at a dequantization: never cut into one.
    let plain = |id: usize| !heavy(id) && !op(id).contains("uantize");
    let cost = |id: usize| -> usize {
        let weights: usize = model.nodes[id]
            .inputs
            .iter()
            .filter(|i| model.nodes[i.node].op_is::<Const>())
            .filter_map(|i| model.outlet_fact(*i).ok())
            .map(Weighed::const_bytes)
            .sum();
        NODE_COST + weights / WEIGHT_BYTES
    };
    let mut done = Vec::with_capacity(body.len());
    let mut total = 0;
    // Wires alive after each position: inputs still to be read, and outputs of body nodes.
    let mut alive: Vec<(OutletId, usize)> =
        model.inputs.iter().map(|o| (*o, last_use(*o))).collect();
    let mut candidates = vec![];
    for (pos, &id) in body.iter().enumerate() {
        total += cost(id);
        done.push(total);
        for ix in 0..model.nodes[id].outputs.len() {
            let o = OutletId::new(id, ix);
            alive.push((o, last_use(o)));
        }
        alive.retain(|(_, last)| *last > pos);
        if let [(o, last)] = alive.as_slice() {
            let readers = &model.nodes[o.node].outputs[o.slot].successors;
            let readers_ok = readers
                .iter()
                .all(|r| heavy(r.node) || (&*op(r.node) == "Add" && plain(o.node)));
            if pos + 1 < body.len() && *last > pos && !readers.is_empty() && readers_ok {
                candidates.push(pos);
            }
        }
    }
    let mut cuts: Vec<usize> = vec![];
    for k in 1..wanted {
        let ideal = k * total / wanted;
        let best = candidates
            .iter()
            .copied()
            .filter(|&c| cuts.last().is_none_or(|&l| c >= l + MIN_PART))
            .filter(|&c| body.len() - c > MIN_PART)
            .min_by_key(|&c| done[c].abs_diff(ideal));
        if let Some(c) = best {
            cuts.push(c);
        }
    }
    cuts
}

/// How many parts to prepare a graph of `nodes` nodes in, with `threads` cores to spare.
fn wanted(nodes: usize, threads: usize, part_nodes: usize) -> usize {
    (nodes / part_nodes).max(threads).min(MAX_PARTS)
}

/// The parts as runnable plans.
pub(crate) type Plan = Parts<Arc<TypedSimplePlan>>;

/// A session's run state for a [`Plan`]: tract's state per part and the values between them.
pub(crate) struct State {
    plan: Arc<Plan>,
    states: Vec<TypedSimpleState>,
    values: Vec<Option<TValue>>,
}

impl State {
    pub(crate) fn new(plan: &Arc<Plan>) -> TractResult<State> {
        Ok(State {
            plan: plan.clone(),
            states: plan
                .parts
                .iter()
                .map(|p| TypedSimpleState::new(&p.model))
                .collect::<TractResult<_>>()?,
            values: vec![None; plan.slots],
        })
    }

    pub(crate) fn run(&mut self, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let plan = &*self.plan;
        if let [state] = self.states.as_mut_slice() {
            return state.run(inputs);
        }
        if inputs.len() != plan.inputs {
            tract_onnx::tract_core::internal::bail!(
                "{} inputs given, the model takes {}",
                inputs.len(),
                plan.inputs
            );
        }
        for (slot, v) in inputs.into_iter().enumerate() {
            self.values[slot] = Some(v);
        }
        let ran = plan
            .parts
            .iter()
            .zip(self.states.iter_mut())
            .try_for_each(|(part, state)| {
                let mut given = TVec::new();
                for (&s, &kept) in part.inputs.iter().zip(&part.kept) {
                    let value = if kept {
                        self.values[s].clone()
                    } else {
                        self.values[s].take()
                    };
                    given.push(value.ok_or_else(|| {
                        tract_onnx::tract_core::internal::format_err!("slot {s} is empty")
                    })?);
                }
                let got = state.run(given)?;
                for (&s, v) in part.outputs.iter().zip(got) {
                    self.values[s] = Some(v);
                }
                Ok(())
            });
        let outputs = ran.and_then(|()| {
            plan.outputs
                .iter()
                .map(|&s| {
                    // Cloned: a model may return one tensor twice. The table is cleared below.
                    self.values[s].clone().ok_or_else(|| {
                        tract_onnx::tract_core::internal::format_err!("output slot {s} is empty")
                    })
                })
                .collect()
        });
        // Hand intermediate tensors back to their parts' states, and keep no input alive.
        self.values.iter_mut().for_each(|v| *v = None);
        outputs
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use tract_onnx::pb;
    use tract_onnx::prelude::tract_ndarray::ArrayD;

    fn mobilenet() -> pb::ModelProto {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/testdata/mobilenet/fp32.onnx"
        );
        let bytes = std::fs::read(path).unwrap();
        prost::Message::decode(bytes.as_slice()).unwrap()
    }

    fn typed(proto: &pb::ModelProto) -> TypedModel {
        tract_onnx::onnx()
            .model_for_proto_model(proto)
            .unwrap()
            .into_typed()
            .unwrap()
    }

    fn runnable(parts: Parts<TypedModel>) -> Arc<Plan> {
        Arc::new(
            parts
                .map_parallel(2, |m| {
                    Ok(TypedSimplePlan::new(m.into_optimized().unwrap()).unwrap())
                })
                .unwrap(),
        )
    }

    /// A batch of 2 (the model's batch stays symbolic through the cut).
    fn input() -> TValue {
        let mut seed = 7u32;
        let values: Vec<f32> = (0..2 * 3 * 48 * 192)
            .map(|_| {
                seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                (seed >> 8) as f32 / (1 << 24) as f32 * 2.0 - 1.0
            })
            .collect();
        ArrayD::from_shape_vec(vec![2, 3, 48, 192], values)
            .unwrap()
            .into_tensor()
            .into_tvalue()
    }

    fn run(plan: &Arc<Plan>) -> Vec<Vec<f32>> {
        let mut state = State::new(plan).unwrap();
        // Twice: the second run reuses the state's table.
        state.run(tvec!(input())).unwrap();
        let outputs = state.run(tvec!(input())).unwrap();
        outputs
            .iter()
            .map(|t| {
                t.try_as_plain_ram()
                    .unwrap()
                    .as_slice::<f32>()
                    .unwrap()
                    .to_vec()
            })
            .collect()
    }

    fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|(a, b)| {
                assert_eq!(a.len(), b.len());
                a.iter().zip(b).map(|(x, y)| (x - y).abs())
            })
            .fold(0.0, f32::max)
    }

    #[test]
    fn a_conv_net_splits_at_single_wires_and_runs_as_the_whole_does() {
        let proto = mobilenet();
        let parts = split(typed(&proto), 4).unwrap();
        assert!(parts.parts.len() >= 4, "{} parts", parts.parts.len());
        for part in &parts.parts[1..] {
            assert_eq!(part.inputs.len(), 1, "one wire crosses each cut");
        }
        let whole = Parts::whole(typed(&proto), 1, 1);
        let (split_out, whole_out) = (run(&runnable(parts)), run(&runnable(whole)));
        assert_eq!(split_out[0].len(), 2 * 100);
        let diff = max_diff(&split_out, &whole_out);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn outputs_taken_early_do_not_stop_the_cuts_after_them() {
        let mut proto = mobilenet();
        let g = proto.graph.as_mut().unwrap();
        // Two extra outputs from early in the graph, one of them twice.
        for name in ["mul_26", "conv_13", "mul_26"] {
            g.output.push(pb::ValueInfoProto {
                name: name.into(),
                ..Default::default()
            });
        }
        let parts = split(typed(&proto), 4).unwrap();
        assert!(parts.parts.len() >= 3, "{} parts", parts.parts.len());
        let whole = Parts::whole(typed(&proto), 1, 4);
        let (split_out, whole_out) = (run(&runnable(parts)), run(&runnable(whole)));
        assert_eq!(split_out.len(), 4);
        assert_eq!(split_out[1], split_out[3]);
        let diff = max_diff(&split_out, &whole_out);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn small_graphs_stay_whole() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/digits/1/model.onnx"
        );
        let bytes = std::fs::read(path).unwrap();
        let proto: pb::ModelProto = prost::Message::decode(bytes.as_slice()).unwrap();
        assert_eq!(split(typed(&proto), 8).unwrap().parts.len(), 1);
    }

    fn imported(proto: &pb::ModelProto) -> InferenceModel {
        tract_onnx::onnx().model_for_proto_model(proto).unwrap()
    }

    fn optimized(m: TypedModel) -> Result<Arc<TypedSimplePlan>> {
        Ok(TypedSimplePlan::new(m.into_optimized().unwrap()).unwrap())
    }

    #[test]
    fn parts_typed_one_after_the_other_run_as_the_whole_does() {
        let proto = mobilenet();
        let model = imported(&proto);
        let parts = cut(&model, 2, PART_NODES_IMPORTED).unwrap().unwrap();
        assert!(parts.parts.len() >= 3, "{} parts", parts.parts.len());
        let Typed::Done {
            parts,
            inputs,
            outputs,
        } = type_and_map(parts, 2, optimized).unwrap()
        else {
            panic!("the MobileNet's parts type alone");
        };
        // The interface is what typing the whole graph gives: a symbolic batch in, 100 out.
        let whole = typed(&proto);
        assert_eq!(
            inputs,
            vec![whole.outlet_fact(whole.inputs[0]).unwrap().clone()]
        );
        assert_eq!(
            outputs,
            vec![whole.outlet_fact(whole.outputs[0]).unwrap().clone()]
        );
        let whole = Parts::whole(whole, 1, 1);
        let (split_out, whole_out) = (run(&Arc::new(parts)), run(&runnable(whole)));
        assert_eq!(split_out[0].len(), 2 * 100);
        let diff = max_diff(&split_out, &whole_out);
        assert!(diff < 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn a_part_that_does_not_type_alone_says_so_and_prepares_nothing() {
        let mut model = imported(&mobilenet());
        // Three channels of 48×192 no more: the first convolution cannot be typed.
        let input = model.inputs[0];
        model
            .set_outlet_fact(input, f32::fact([1, 5, 48, 192]).into())
            .unwrap();
        let parts = cut(&model, 2, PART_NODES_IMPORTED).unwrap().unwrap();
        let prepared = AtomicUsize::new(0);
        let typed = type_and_map(parts, 2, |m| {
            prepared.fetch_add(1, Ordering::Relaxed);
            optimized(m)
        })
        .unwrap();
        let Typed::Untyped(why) = typed else {
            panic!("a part with a wrong input typed");
        };
        assert!(why.starts_with("part 0"), "{why}");
        assert_eq!(prepared.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_part_failing_after_typing_is_an_error() {
        let parts = cut(&imported(&mobilenet()), 2, PART_NODES_IMPORTED)
            .unwrap()
            .unwrap();
        let seen = AtomicUsize::new(0);
        let failed = type_and_map(parts, 2, |_| -> Result<()> {
            match seen.fetch_add(1, Ordering::Relaxed) {
                1 => panic!("tract panicked"),
                _ => Ok(()),
            }
        });
        assert!(matches!(failed, Err(Error::Internal(m)) if m.contains("tract panicked")));
    }

    /// A part skipped because another failed may come first in the list: the failure is what
    /// is reported (this was "a part was not prepared" when a loaded machine let a worker take
    /// a part before the stop and look at it after).
    #[test]
    fn the_failure_is_reported_not_the_parts_it_made_skip() {
        let failed = prepared::<u8>(vec![None, Some(Err(Error::Prepare("no".into()))), None]);
        assert!(matches!(failed, Err(Error::Prepare(m)) if m == "no"));
        let lost = prepared(vec![Some(Ok(1u8)), None]);
        assert!(matches!(lost, Err(Error::Internal(_))));
        assert_eq!(prepared(vec![Some(Ok(1u8)), Some(Ok(2))]).unwrap(), [1, 2]);
    }

    #[test]
    fn a_failing_or_panicking_part_is_an_error_and_the_rest_are_skipped() {
        let parts = split(typed(&mobilenet()), 4).unwrap();
        let n = parts.parts.len();
        assert!(n >= 4, "{n} parts");
        let seen = AtomicUsize::new(0);
        let failed = parts.map_parallel(2, |_| -> Result<()> {
            match seen.fetch_add(1, Ordering::Relaxed) {
                1 => Err(Error::Prepare("no".into())),
                2 => panic!("tract panicked"),
                _ => Ok(()),
            }
        });
        assert!(
            matches!(&failed, Err(Error::Prepare(m)) if m == "no")
                || matches!(&failed, Err(Error::Internal(m)) if m.contains("tract panicked")),
            "{:?}",
            failed.err()
        );
        // Two threads: besides the failing part, at most the one the other thread had taken
        // runs; the parts still queued are not prepared for nothing.
        assert!(
            seen.load(Ordering::Relaxed) <= 3,
            "{seen:?} of {n} parts tried"
        );
    }
}
