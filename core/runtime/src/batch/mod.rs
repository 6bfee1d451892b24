//! Small-window dynamic batching.
//!
//! [`Batcher`] queues requests for a short window and runs the largest batch that fits in one
//! forward pass, on `instances` worker threads that each own a [`crate::Session`]. The policy
//! is the I/O-free [`window::Window`]; this module is the thin driver around it: a mutex and a
//! condition variable, worker threads, and request slots.
//!
//! Memory: every request goes through a *slot* whose buffers are reused, so in steady state a
//! request allocates nothing: its inputs are copied into its slot, the worker copies slots into
//! its own batch buffer, runs, and copies each request's rows back into its slot; the caller
//! reads them through a [`Response`] that borrows the slot.

mod stats;
pub(crate) mod window;

use std::hash::{Hash, Hasher};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tract_onnx::prelude::TVec;

pub use stats::{BatchStats, FailureReason, Histogram, LATENCY_BOUNDS_US};
use window::{Entry, Rejection, Window, WindowConfig};

use crate::error::{Error, Result};
use crate::model::Model;
use crate::tensor::{Dim, TensorView};

/// Batching knobs (Triton's names where they exist).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most rows one forward pass takes. 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the oldest queued request may wait for others.
    pub max_queue_delay: Duration,
    /// Batch sizes dispatched as soon as they are reachable (the largest wins).
    pub preferred_batch_sizes: Vec<usize>,
    /// Requests waiting at most; beyond it requests are rejected with [`Error::Overloaded`].
    pub max_queue_size: usize,
    /// Applied to requests that do not set their own timeout.
    pub default_timeout: Option<Duration>,
    /// Priority levels; 0 is the highest.
    pub priority_levels: usize,
    /// Worker threads, each with its own session.
    pub instances: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch_size: 8,
            max_queue_delay: Duration::from_micros(500),
            preferred_batch_sizes: vec![],
            max_queue_size: 128,
            default_timeout: None,
            priority_levels: 1,
            instances: 1,
        }
    }
}

/// Per-request options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RequestOptions {
    /// 0 (the default) is the highest level.
    pub priority: usize,
    /// Answer [`Error::TimedOut`] rather than run if the request has not started by then.
    pub timeout: Option<Duration>,
}

#[derive(Debug)]
enum Status {
    Free,
    Pending,
    Done(Result<()>),
}

/// A request's reusable buffers.
#[derive(Debug)]
struct SlotData {
    status: Status,
    rows: usize,
    inputs: Vec<Vec<u8>>,
    input_shapes: Vec<Vec<usize>>,
    outputs: Vec<Vec<u8>>,
    output_shapes: Vec<Vec<usize>>,
}

#[derive(Debug)]
struct Slot {
    data: Mutex<SlotData>,
    done: Condvar,
}

struct State {
    window: Window,
    free: Vec<u32>,
    shutting_down: bool,
}

struct Shared {
    model: Model,
    /// False when the model cannot batch: then every request runs alone.
    batchable: bool,
    /// Largest batch the window forms.
    max_batch: usize,
    config: BatchConfig,
    state: Mutex<State>,
    work: Condvar,
    slots: Vec<Slot>,
    stats: stats::Recorder,
}

/// A dynamic batcher over one model version. Cheap to share by reference between threads;
/// `infer` blocks the calling thread until its answer.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl std::fmt::Debug for Batcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// The end of a window is awaited by yielding rather than sleeping for the last this much.
const SPIN: Duration = Duration::from_micros(100);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A worker that panicked mid-update cannot leave these structures inconsistent (every
    // update is a single assignment or push), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Batcher {
    /// Starts `instances` workers, each with a warmed-up session.
    pub fn new(model: Model, config: BatchConfig) -> Result<Batcher> {
        if config.max_batch_size == 0 || config.max_queue_size == 0 || config.instances == 0 {
            return Err(Error::InvalidOption(
                "max_batch_size, max_queue_size and instances must be at least 1".into(),
            ));
        }
        if let Some(p) = config
            .preferred_batch_sizes
            .iter()
            .find(|&&p| p == 0 || p > config.max_batch_size)
        {
            return Err(Error::InvalidOption(format!(
                "preferred batch size {p} is outside 1..={}",
                config.max_batch_size
            )));
        }
        let info = model.info();
        let at_zero = |d: &[Dim]| {
            matches!(d.first(), Some(Dim::Batch(_)))
                && !d[1..].iter().any(|x| matches!(x, Dim::Batch(_)))
        };
        let batchable = info.batch.is_some()
            && info.inputs.iter().all(|i| at_zero(&i.shape))
            && info.outputs.iter().all(|o| at_zero(&o.shape));
        let max_batch = if batchable {
            config
                .max_batch_size
                .min(info.max_batch.unwrap_or(usize::MAX))
        } else {
            log::info!(
                "model has no batch axis 0 on every input and output: requests run one by one"
            );
            1
        };
        let mut preferred: Vec<usize> = config
            .preferred_batch_sizes
            .iter()
            .copied()
            .filter(|&p| p <= max_batch)
            .collect();
        preferred.sort_unstable();
        preferred.dedup();
        let window = Window::new(WindowConfig {
            max_batch,
            max_delay: config.max_queue_delay,
            preferred,
            max_queue: config.max_queue_size,
            priority_levels: config.priority_levels.max(1),
        });
        // Enough slots for a full queue, a full batch per worker, and answers being read.
        let slot_count = 2 * config.max_queue_size + config.instances * max_batch;
        let slots = (0..slot_count)
            .map(|_| Slot {
                data: Mutex::new(SlotData {
                    status: Status::Free,
                    rows: 0,
                    inputs: vec![Vec::new(); info.inputs.len()],
                    input_shapes: vec![Vec::new(); info.inputs.len()],
                    outputs: vec![Vec::new(); info.outputs.len()],
                    output_shapes: vec![Vec::new(); info.outputs.len()],
                }),
                done: Condvar::new(),
            })
            .collect();
        let shared = Arc::new(Shared {
            batchable,
            max_batch,
            state: Mutex::new(State {
                window,
                free: (0..slot_count as u32).rev().collect(),
                shutting_down: false,
            }),
            work: Condvar::new(),
            slots,
            stats: stats::Recorder::new(max_batch),
            config,
            model,
        });
        let mut workers = vec![];
        for i in 0..shared.config.instances {
            let mut session = shared.model.session()?;
            session.warm_up()?;
            let s = shared.clone();
            let handle = std::thread::Builder::new()
                .name(format!("tern-batch-{i}"))
                .spawn(move || Worker::new(s, session).run())
                .map_err(|e| Error::Internal(format!("cannot start a batch worker: {e}")))?;
            workers.push(handle);
        }
        Ok(Batcher {
            shared,
            workers: Mutex::new(workers),
        })
    }

    pub fn model(&self) -> &Model {
        &self.shared.model
    }

    pub fn config(&self) -> &BatchConfig {
        &self.shared.config
    }

    /// Largest batch the window forms (1 when the model cannot batch).
    pub fn max_batch(&self) -> usize {
        self.shared.max_batch
    }

    pub fn stats(&self) -> BatchStats {
        self.shared.stats.snapshot()
    }

    /// Queues one request (which may itself carry several rows) and waits for its answer.
    pub fn infer(
        &self,
        inputs: &[TensorView<'_>],
        options: &RequestOptions,
    ) -> Result<Response<'_>> {
        let submitted = Instant::now();
        let sh = &*self.shared;
        let result = self.submit(inputs, options, submitted);
        if let Err(e) = &result {
            sh.stats.fail(reason(e));
        }
        let id = result?;
        let slot = &sh.slots[id as usize];
        let mut data = lock(&slot.data);
        while matches!(data.status, Status::Pending) {
            data = slot.done.wait(data).unwrap_or_else(|p| p.into_inner());
        }
        sh.stats.request.record(submitted.elapsed());
        match std::mem::replace(&mut data.status, Status::Done(Ok(()))) {
            Status::Done(Ok(())) => {
                sh.stats
                    .success
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(Response {
                    shared: sh,
                    id,
                    data: Some(data),
                })
            }
            Status::Done(Err(e)) => {
                sh.stats.fail(reason(&e));
                data.status = Status::Free;
                drop(data);
                lock(&sh.state).free.push(id);
                Err(e)
            }
            other => Err(Error::Internal(format!("request slot in state {other:?}"))),
        }
    }

    fn submit(
        &self,
        inputs: &[TensorView<'_>],
        options: &RequestOptions,
        now: Instant,
    ) -> Result<u32> {
        let sh = &*self.shared;
        let info = sh.model.info();
        let rows = crate::tensor::check_inputs(&info.inputs, info.max_batch, inputs)?;
        // An unbatchable model runs each request whole, as one entry.
        let rows = if sh.batchable { rows } else { 1 };
        let max_batch = sh.max_batch;
        if rows > max_batch {
            return Err(Error::BatchTooLarge {
                got: rows,
                max: max_batch,
            });
        }
        if options.priority >= sh.config.priority_levels.max(1) {
            return Err(Error::InvalidInput(format!(
                "priority {} does not exist; levels are 0..{}",
                options.priority,
                sh.config.priority_levels.max(1)
            )));
        }
        // Requests batch together only when everything but the batch axis agrees.
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for v in inputs {
            v.dtype().hash(&mut h);
            v.shape().get(1..).hash(&mut h);
        }
        let key = if sh.batchable { h.finish() } else { 0 };
        let id = {
            let mut st = lock(&sh.state);
            if st.shutting_down {
                return Err(Error::ShuttingDown);
            }
            st.free.pop().ok_or(Error::Overloaded {
                queued: st.window.len(),
            })?
        };
        {
            let mut data = lock(&sh.slots[id as usize].data);
            data.rows = rows;
            for (ix, v) in inputs.iter().enumerate() {
                data.inputs[ix].clear();
                data.inputs[ix].extend_from_slice(v.bytes());
                data.input_shapes[ix].clear();
                data.input_shapes[ix].extend_from_slice(v.shape());
            }
            data.status = Status::Pending;
        }
        let deadline = options
            .timeout
            .or(sh.config.default_timeout)
            .map(|t| now + t);
        let entry = Entry {
            id,
            rows,
            key,
            priority: options.priority,
            arrived: now,
            deadline,
        };
        let mut st = lock(&sh.state);
        let offered = if st.shutting_down {
            Err(None)
        } else {
            st.window.offer(entry).map_err(Some)
        };
        match offered {
            Ok(()) => {
                sh.stats
                    .queue_depth
                    .store(st.window.len(), std::sync::atomic::Ordering::Relaxed);
                drop(st);
                sh.work.notify_one();
                Ok(id)
            }
            Err(why) => {
                let queued = st.window.len();
                st.free.push(id);
                drop(st);
                lock(&sh.slots[id as usize].data).status = Status::Free;
                Err(match why {
                    None => Error::ShuttingDown,
                    Some(Rejection::QueueFull) => Error::Overloaded { queued },
                    Some(Rejection::TooManyRows) => Error::BatchTooLarge {
                        got: rows,
                        max: max_batch,
                    },
                    Some(Rejection::NoSuchPriority) => {
                        Error::InvalidInput("no such priority".into())
                    }
                })
            }
        }
    }

    /// Stops accepting requests, answers every queued one with [`Error::ShuttingDown`], lets
    /// running batches finish, and joins the workers. Idempotent; also run on drop.
    pub fn shutdown(&self) {
        lock(&self.shared.state).shutting_down = true;
        self.shared.work.notify_all();
        for h in lock(&self.workers).drain(..) {
            let _ = h.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn reason(e: &Error) -> FailureReason {
    match e {
        Error::Overloaded { .. } => FailureReason::Overloaded,
        Error::TimedOut { .. } => FailureReason::TimedOut,
        Error::ShuttingDown => FailureReason::ShuttingDown,
        Error::InvalidInput(_) | Error::BatchTooLarge { .. } => FailureReason::InvalidInput,
        _ => FailureReason::Execution,
    }
}

/// The answer to one request: its output rows, borrowed from the request's slot until dropped.
pub struct Response<'a> {
    shared: &'a Shared,
    id: u32,
    data: Option<MutexGuard<'a, SlotData>>,
}

impl std::fmt::Debug for Response<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Response")
            .field("slot", &self.id)
            .finish_non_exhaustive()
    }
}

impl<'a> Response<'a> {
    fn data(&self) -> &SlotData {
        self.data.as_ref().expect("held until drop")
    }

    pub fn len(&self) -> usize {
        self.data().outputs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Output `ix` (model order): this request's rows only.
    pub fn get(&self, ix: usize) -> Option<TensorView<'_>> {
        let d = self.data();
        let dtype = self.shared.model.info().outputs.get(ix)?.dtype;
        Some(TensorView::from_bytes(
            dtype,
            &d.output_shapes[ix],
            &d.outputs[ix],
        ))
    }

    pub fn by_name(&self, name: &str) -> Option<TensorView<'_>> {
        let ix = self
            .shared
            .model
            .info()
            .outputs
            .iter()
            .position(|o| o.name == name)?;
        self.get(ix)
    }
}

impl Drop for Response<'_> {
    fn drop(&mut self) {
        if let Some(mut d) = self.data.take() {
            d.status = Status::Free;
        }
        lock(&self.shared.state).free.push(self.id);
    }
}

/// One worker thread: takes batches from the window and runs them on its own session.
struct Worker {
    shared: Arc<Shared>,
    session: crate::Session,
    batch: Vec<Entry>,
    expired: Vec<Entry>,
    buffers: Vec<Vec<u8>>,
    shapes: Vec<Vec<usize>>,
}

impl Worker {
    fn new(shared: Arc<Shared>, session: crate::Session) -> Worker {
        let inputs = shared.model.info().inputs.len();
        let cap = shared.config.max_queue_size;
        Worker {
            batch: Vec::with_capacity(cap),
            expired: Vec::with_capacity(cap),
            buffers: vec![Vec::new(); inputs],
            shapes: vec![Vec::new(); inputs],
            shared,
            session,
        }
    }

    fn answer(&self, id: u32, result: Result<()>) {
        let slot = &self.shared.slots[id as usize];
        lock(&slot.data).status = Status::Done(result);
        slot.done.notify_one();
    }

    fn run(mut self) {
        loop {
            let rows = {
                let sh = self.shared.clone();
                let mut st = lock(&sh.state);
                loop {
                    let now = Instant::now();
                    if st.shutting_down {
                        st.window.drain(|e| self.expired.push(e));
                        drop(st);
                        for e in std::mem::take(&mut self.expired) {
                            self.answer(e.id, Err(Error::ShuttingDown));
                        }
                        return;
                    }
                    st.window.expire(now, |e| self.expired.push(e));
                    let rows = st.window.take_batch(now, false, &mut self.batch);
                    sh.stats
                        .queue_depth
                        .store(st.window.len(), std::sync::atomic::Ordering::Relaxed);
                    if rows > 0 || !self.expired.is_empty() {
                        if !st.window.is_empty() {
                            sh.work.notify_one();
                        }
                        break rows;
                    }
                    st = match st.window.next_wakeup() {
                        // Timed waits overshoot by tens of microseconds (timer slack), which
                        // would add to every window: sleep most of it, then yield-spin the end.
                        Some(t) if t.saturating_duration_since(now) > SPIN => {
                            sh.work
                                .wait_timeout(st, t.saturating_duration_since(now) - SPIN)
                                .unwrap_or_else(|p| p.into_inner())
                                .0
                        }
                        Some(_) => {
                            drop(st);
                            std::thread::yield_now();
                            lock(&sh.state)
                        }
                        None => sh.work.wait(st).unwrap_or_else(|p| p.into_inner()),
                    };
                }
            };
            let now = Instant::now();
            for i in 0..self.expired.len() {
                let e = self.expired[i];
                let waited_ms = now.saturating_duration_since(e.arrived).as_millis() as u64;
                self.answer(e.id, Err(Error::TimedOut { waited_ms }));
            }
            self.expired.clear();
            if rows > 0 {
                self.execute(rows, now);
            }
        }
    }

    fn execute(&mut self, rows: usize, started: Instant) {
        let sh = self.shared.clone();
        for e in &self.batch {
            sh.stats
                .queue_wait
                .record(started.saturating_duration_since(e.arrived));
        }
        // Gather: the batch's rows, in order, into this worker's own buffers.
        for (ix, (buf, shape)) in self.buffers.iter_mut().zip(&mut self.shapes).enumerate() {
            buf.clear();
            shape.clear();
            for (n, e) in self.batch.iter().enumerate() {
                let d = lock(&sh.slots[e.id as usize].data);
                if n == 0 {
                    shape.push(rows);
                    shape.extend_from_slice(d.input_shapes[ix].get(1..).unwrap_or(&[]));
                }
                buf.extend_from_slice(&d.inputs[ix]);
            }
            if !sh.batchable {
                shape.clear();
                shape.extend_from_slice(
                    &lock(&sh.slots[self.batch[0].id as usize].data).input_shapes[ix],
                );
            }
        }
        let info = sh.model.info();
        let views: TVec<TensorView<'_>> = self
            .buffers
            .iter()
            .zip(&self.shapes)
            .zip(&info.inputs)
            .map(|((b, s), i)| TensorView::from_bytes(i.dtype, s, b))
            .collect();
        let t = Instant::now();
        let result = self.session.run(&views);
        sh.stats.compute.record(t.elapsed());
        sh.stats.batch(rows);
        match result {
            Ok(outputs) => {
                // Scatter: each request gets its own rows of every output.
                let mut offset = 0;
                for e in &self.batch {
                    let slot = &sh.slots[e.id as usize];
                    let mut d = lock(&slot.data);
                    let SlotData {
                        outputs: outs,
                        output_shapes,
                        ..
                    } = &mut *d;
                    for (ix, (out, out_shape)) in
                        outs.iter_mut().zip(output_shapes.iter_mut()).enumerate()
                    {
                        let v = outputs.get(ix).expect("one view per declared output");
                        out.clear();
                        out_shape.clear();
                        if sh.batchable {
                            let per_row = v.bytes().len() / rows.max(1);
                            out.extend_from_slice(
                                &v.bytes()[offset * per_row..(offset + e.rows) * per_row],
                            );
                            out_shape.push(e.rows);
                            out_shape.extend_from_slice(&v.shape()[1..]);
                        } else {
                            out.extend_from_slice(v.bytes());
                            out_shape.extend_from_slice(v.shape());
                        }
                    }
                    d.status = Status::Done(Ok(()));
                    drop(d);
                    slot.done.notify_one();
                    offset += e.rows;
                }
            }
            Err(err) => {
                log::warn!("batch of {rows} failed: {err}");
                for e in &self.batch {
                    self.answer(e.id, Err(err.duplicate()));
                }
            }
        }
    }
}
