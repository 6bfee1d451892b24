//! Plans: one symbolic plan for every shape, or concrete plans per input shape.
//!
//! tract keeps the batch (and spatial sizes) symbolic when it can prove every shape in the graph
//! from the symbols. Real exports often defeat that: a `Reshape` whose target is computed at run
//! time from `Shape → Gather → Concat`, up-sampled sizes it cannot prove equal to a skip
//! connection's, `If` branches valid for only some shapes. With every input shape concrete, all
//! of those become constants, so Tern prepares one plan per input shape instead: batch sizes
//! from a fixed ladder (a batch runs padded up to the nearest rung), other sizes on demand, kept
//! in a bounded least-recently-used cache shared by all sessions of the model.

use std::sync::{Arc, Mutex};

use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::parts::Plan;
use super::{branches, build, import, shapes, Compile};
use crate::error::{Error, Result};

/// Concrete plans for one model. Shared by every session; sessions cache the states they made.
pub(crate) struct Concrete {
    /// The rewritten model with its symbols still in place, without its weights; each plan
    /// pins a copy.
    source: pb::ModelProto,
    /// The graph's initializers, lent to one plan's preparation at a time. Cloned per plan they
    /// were a copy of every weight: a quarter of ResNet-18's load.
    weights: Mutex<Vec<pb::TensorProto>>,
    compile: Compile,
    /// Sorted, distinct, at least one.
    batch_sizes: Vec<usize>,
    /// Per input: whether its axis 0 is the batch.
    batched: Vec<bool>,
    limit: usize,
    cache: Mutex<Cache>,
}

#[derive(Default)]
struct Cache {
    tick: u64,
    plans: Vec<(Vec<Vec<usize>>, Arc<Plan>, u64)>,
    /// Shapes tract could not plan, with why: asking again answers at once instead of
    /// spending a preparation on it (a client could otherwise keep the CPU busy).
    failed: Vec<(Vec<Vec<usize>>, String)>,
}

/// Unplannable shapes remembered at most.
const FAILED_KEPT: usize = 32;

impl Cache {
    /// The cached plan for `shapes`, marked as the most recently used.
    fn touch(&mut self, shapes: &[Vec<usize>]) -> Option<Arc<Plan>> {
        self.tick += 1;
        let tick = self.tick;
        let entry = self
            .plans
            .iter_mut()
            .find(|(k, _, _)| k.as_slice() == shapes)?;
        entry.2 = tick;
        Some(entry.1.clone())
    }
}

impl Concrete {
    pub(crate) fn new(
        mut source: pb::ModelProto,
        compile: Compile,
        batch_sizes: Vec<usize>,
        batched: Vec<bool>,
        limit: usize,
    ) -> Concrete {
        let weights = source
            .graph
            .as_mut()
            .map(|g| std::mem::take(&mut g.initializer))
            .unwrap_or_default();
        Concrete {
            source,
            weights: Mutex::new(weights),
            compile,
            batch_sizes,
            batched,
            limit: limit.max(1),
            cache: Mutex::default(),
        }
    }

    pub(crate) fn batch_sizes(&self) -> &[usize] {
        &self.batch_sizes
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn is_batched(&self, input: usize) -> bool {
        self.batched.get(input).copied().unwrap_or(false)
    }

    /// The planned batch a request of `rows` runs at: the nearest planned size at or above it,
    /// or `rows` itself beyond the largest (planned on demand).
    pub(crate) fn padded(&self, rows: usize) -> usize {
        self.batch_sizes
            .iter()
            .copied()
            .find(|&b| b >= rows)
            .unwrap_or(rows)
    }

    /// The plan for these exact input shapes, prepared now if no session asked for it before.
    /// Shapes the model cannot take are the caller's error ([`Error::InvalidInput`]).
    pub(crate) fn plan(&self, shapes: &[Vec<usize>]) -> Result<Arc<Plan>> {
        let unplannable = |why: &str| {
            Error::InvalidInput(format!(
                "the model cannot run input shapes {shapes:?}: {why}"
            ))
        };
        {
            let mut c = self.lock();
            if let Some(plan) = c.touch(shapes) {
                return Ok(plan);
            }
            if let Some((_, why)) = c.failed.iter().find(|(k, _)| k.as_slice() == shapes) {
                return Err(unplannable(why));
            }
        }
        // Built outside the lock: a slow preparation must not stall sessions running other
        // shapes. Two sessions racing for the same new shape both build; one result is kept.
        let started = std::time::Instant::now();
        let built = build(
            || self.imported(shapes),
            &self.compile_for(shapes),
            |_| Ok(()),
        )
        .map(|b| b.plan);
        let plan = match built {
            Ok(plan) => plan,
            Err(e) => {
                let why = match e {
                    Error::Prepare(m) => m,
                    other => other.to_string(),
                };
                let mut c = self.lock();
                if c.failed.len() >= FAILED_KEPT {
                    c.failed.remove(0);
                }
                c.failed.push((shapes.to_vec(), why.clone()));
                return Err(unplannable(&why));
            }
        };
        log::info!(
            "planned input shapes {shapes:?} in {:.0?}",
            started.elapsed()
        );
        let mut c = self.lock();
        if let Some(plan) = c.touch(shapes) {
            return Ok(plan);
        }
        let tick = c.tick;
        if c.plans.len() >= self.limit {
            if let Some(oldest) = (0..c.plans.len()).min_by_key(|&i| c.plans[i].2) {
                let (k, _, _) = c.plans.swap_remove(oldest);
                log::debug!("plan for {k:?} evicted (cache holds {})", self.limit);
            }
        }
        c.plans.push((shapes.to_vec(), plan.clone(), tick));
        Ok(plan)
    }

    /// Keeps a plan built outside [`Concrete::plan`] (the first one, built at load).
    pub(crate) fn insert(&self, shapes: &[Vec<usize>], plan: Arc<Plan>) {
        let mut c = self.lock();
        c.tick += 1;
        let tick = c.tick;
        c.plans.push((shapes.to_vec(), plan, tick));
    }

    /// What the plan for `shapes` is compiled with: the model's settings, and whether its
    /// batch is above 1.
    pub(crate) fn compile_for(&self, shapes: &[Vec<usize>]) -> Compile {
        let rows = shapes
            .iter()
            .zip(&self.batched)
            .find_map(|(s, &batched)| batched.then(|| s.first().copied()).flatten());
        Compile {
            batch_apart: rows.is_some_and(|r| r > 1),
            ..self.compile.clone()
        }
    }

    pub(crate) fn source(&self) -> &pb::ModelProto {
        &self.source
    }

    /// tract's graph for these input shapes. Plans are imported one at a time, each with the
    /// weights lent to it.
    pub(crate) fn imported(&self, shapes: &[Vec<usize>]) -> Result<InferenceModel> {
        let mut lent = Lent::new(
            self.source.clone(),
            self.weights.lock().unwrap_or_else(|p| p.into_inner()),
        );
        let proto = &mut lent.proto;
        shapes::pin_all(proto, shapes)?;
        branches::fold_constant_ifs(proto);
        import(proto, true)
    }

    /// Plans currently cached, for tests and metrics.
    pub(crate) fn cached(&self) -> usize {
        self.lock().plans.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Cache> {
        // Every update is one push, swap_remove or assignment: a poisoned lock is consistent.
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A copy of the source with the weights moved in, moved back on drop (a panic in tract
/// included), so that the next plan finds them.
struct Lent<'a> {
    proto: pb::ModelProto,
    home: std::sync::MutexGuard<'a, Vec<pb::TensorProto>>,
    /// Initializers the model owns; folded `If` branches append their own after them.
    owned: usize,
}

impl<'a> Lent<'a> {
    fn new(
        mut proto: pb::ModelProto,
        mut home: std::sync::MutexGuard<'a, Vec<pb::TensorProto>>,
    ) -> Lent<'a> {
        let owned = home.len();
        if let Some(g) = proto.graph.as_mut() {
            g.initializer = std::mem::take(&mut *home);
        }
        Lent { proto, home, owned }
    }
}

impl Drop for Lent<'_> {
    fn drop(&mut self) {
        if let Some(g) = self.proto.graph.as_mut() {
            let mut weights = std::mem::take(&mut g.initializer);
            weights.truncate(self.owned);
            *self.home = weights;
        }
    }
}

/// The batch ladder: the configured sizes, or powers of two up to the largest batch plus the
/// largest itself.
pub(crate) fn ladder(configured: &[usize], max_batch: Option<usize>) -> Result<Vec<usize>> {
    let mut sizes: Vec<usize> = if configured.is_empty() {
        let max = max_batch.unwrap_or(8);
        let mut v: Vec<usize> = std::iter::successors(Some(1usize), |b| b.checked_mul(2))
            .take_while(|&b| b < max)
            .collect();
        v.push(max);
        v
    } else {
        configured.to_vec()
    };
    if sizes.contains(&0) {
        return Err(Error::InvalidOption(
            "batch sizes must be at least 1".into(),
        ));
    }
    if let Some(max) = max_batch {
        if let Some(big) = sizes.iter().find(|&&b| b > max) {
            return Err(Error::InvalidOption(format!(
                "batch size {big} exceeds max_batch {max}"
            )));
        }
    }
    sizes.sort_unstable();
    sizes.dedup();
    Ok(sizes)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::prepare::Plans;
    use crate::{Model, ModelOptions, PlanMode};

    /// A plan for a batch above 1 keeps the batch out of the pointwise products: tract's merge
    /// would move their reduction axis aside, with a `MoveAxis` copy on each side. The float
    /// MobileNet at batch 4: none in the plan; compiled as batch 1's plans are, on tract's own
    /// products (Tern's pointwise kernel, where it runs, takes them before tract's merge),
    /// there are.
    #[test]
    fn plans_above_batch_one_keep_the_batch_out_of_the_products() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../models/testdata/mobilenet/fp32.onnx"
        );
        let options = ModelOptions {
            plans: PlanMode::Concrete,
            ..ModelOptions::default()
        };
        let model = Model::load(path, &options).unwrap();
        let Plans::Concrete(plans) = &model.inner.plans else {
            panic!("concrete plans were asked for");
        };
        let moves = |plan: &Plan| {
            plan.parts
                .iter()
                .flat_map(|p| p.model.model().nodes())
                .filter(|n| n.op.name() == "MoveAxis")
                .count()
        };
        let shapes = [vec![4, 3, 48, 192]];
        assert!(plans.compile_for(&shapes).batch_apart);
        assert!(!plans.compile_for(&[vec![1, 3, 48, 192]]).batch_apart);
        assert_eq!(moves(&plans.plan(&shapes).unwrap()), 0);
        let compile = Compile {
            float_kernels: false,
            ..plans.compile.clone()
        };
        let merged = build(|| plans.imported(&shapes), &compile, |_| Ok(())).unwrap();
        assert!(moves(&merged.plan) > 0);
    }

    #[test]
    fn the_ladder_doubles_up_to_the_largest_batch() {
        assert_eq!(ladder(&[], Some(8)).unwrap(), [1, 2, 4, 8]);
        assert_eq!(ladder(&[], Some(12)).unwrap(), [1, 2, 4, 8, 12]);
        assert_eq!(ladder(&[], Some(1)).unwrap(), [1]);
        assert_eq!(ladder(&[], None).unwrap(), [1, 2, 4, 8]);
        assert_eq!(ladder(&[4, 1, 4], Some(4)).unwrap(), [1, 4]);
        assert!(ladder(&[0], None).is_err());
        assert!(ladder(&[16], Some(8)).is_err());
    }
}
