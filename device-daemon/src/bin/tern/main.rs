//! `tern`: inspect, run and benchmark models; sign, push and roll out models to fleets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tern_core::{
    npy, BatchConfig, Batcher, DType, Dim, Error, Model, ModelOptions, Precision, RequestOptions,
    Tensor,
};
use tern_daemon::loadgen::{self, Outcome, Target};
use tern_daemon::stats::Summary;

mod fleet;

#[derive(Parser)]
#[command(
    name = "tern",
    version,
    about = "Tern edge inference runtime: inspect, run and benchmark ONNX models; sign, push and roll out models to fleets over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show inputs, outputs, ops and the precision each convolution/matmul executes in.
    Inspect {
        model: PathBuf,
        #[command(flatten)]
        prep: PrepArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a model on .npy inputs and write one NAME.npy per output.
    Run {
        model: PathBuf,
        /// NAME=FILE.npy, once per input (just FILE.npy for single-input models).
        #[arg(long = "input", short = 'i', required = true)]
        inputs: Vec<String>,
        /// Where to write the outputs.
        #[arg(long, default_value = ".")]
        output_dir: PathBuf,
        #[command(flatten)]
        prep: PrepArgs,
    },
    /// Measure latency (p50/p90/p99) and throughput on random inputs: one session back to
    /// back, or, with --clients/--rate, a load through the dynamic batcher.
    Bench {
        model: PathBuf,
        /// Rows in every request.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[command(flatten)]
        load: LoadArgs,
        /// Timed iterations.
        #[arg(long, default_value_t = 200)]
        iters: usize,
        /// Untimed iterations first.
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        /// Cold start instead: this many fresh processes each load the file and run it once;
        /// reports file → first result (median and min).
        #[arg(long, value_name = "RUNS")]
        cold: Option<usize>,
        #[command(flatten)]
        prep: PrepArgs,
        #[arg(long)]
        json: bool,
    },
    #[command(flatten)]
    Fleet(fleet::FleetCommand),
}

#[derive(Args, Clone)]
struct LoadArgs {
    /// Closed loop: this many clients sending back to back through the batcher.
    #[arg(long, conflicts_with = "rate")]
    clients: Option<usize>,
    /// Send the load to a running ternd (KServe v2, binary tensors) at this base URL, e.g.
    /// http://127.0.0.1:8000, instead of an in-process batcher. MODEL is then the served name.
    #[arg(long)]
    url: Option<String>,
    /// Open loop: Poisson arrivals at this many requests per second through the batcher.
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of load.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Open loop: client threads available to send (requests wait for one when all are busy).
    #[arg(long, default_value_t = 128)]
    concurrency: usize,
    /// Largest batch the batcher forms (1 turns batching off).
    #[arg(long, default_value_t = 8)]
    max_batch: usize,
    /// Window, from the oldest queued request, in microseconds.
    #[arg(long, default_value_t = 500)]
    max_delay_us: u64,
    /// Preferred batch sizes, comma-separated.
    #[arg(long, value_delimiter = ',')]
    preferred: Vec<usize>,
    /// Queue capacity; beyond it requests are rejected as overloaded.
    #[arg(long, default_value_t = 1024)]
    queue: usize,
    /// Worker instances, each with its own session.
    #[arg(long, default_value_t = 1)]
    instances: usize,
    /// Per-request timeout in milliseconds.
    #[arg(long)]
    timeout_ms: Option<u64>,
}

impl LoadArgs {
    fn batch_config(&self) -> BatchConfig {
        BatchConfig {
            max_batch_size: self.max_batch,
            max_queue_delay: Duration::from_micros(self.max_delay_us),
            preferred_batch_sizes: self.preferred.clone(),
            max_queue_size: self.queue,
            default_timeout: self.timeout_ms.map(Duration::from_millis),
            priority_levels: 1,
            instances: self.instances,
        }
    }
}

#[derive(Args, Clone)]
struct PrepArgs {
    /// Threads per forward pass.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// Run f32 computation in f16.
    #[arg(long)]
    f16: bool,
    /// Make axis 0 of every input a batch symbol with this name (for fixed-batch exports).
    #[arg(long)]
    batch_symbol: Option<String>,
    /// Keep QDQ models in float (disable Tern's int8 fusion), for comparison.
    #[arg(long)]
    no_int8_fusion: bool,
    /// Run quantized convolutions on tract's own lowering instead of Tern's fused int8
    /// kernels, for comparison.
    #[arg(long)]
    no_int8_kernels: bool,
    /// Run f32 depthwise, 1×1 and stem convolutions and trailing-axis sums on tract's own ops
    /// instead of Tern's kernels, for comparison.
    #[arg(long)]
    no_float_kernels: bool,
    /// Fix an input's shape, e.g. `image=N,3,224,224` (a name keeps that axis symbolic).
    #[arg(long = "pin", value_name = "NAME=D,D,…")]
    pins: Vec<tern_core::PinnedInput>,
    /// How shapes are planned: auto, symbolic, concrete (one plan per shape), fastest.
    #[arg(long, default_value = "auto")]
    plans: tern_core::PlanMode,
    /// Where the model runs: cpu, or cuda (a build with `--features cuda`; CPU without a GPU).
    #[arg(long, default_value = "cpu")]
    device: tern_core::Device,
    /// Skip tract's graph-wide axis rewrites: conv nets prepare faster (MobileNetV3 cold start
    /// 158 → 98 ms).
    #[arg(long)]
    no_axis_rewrites: bool,
    /// Keep plan decisions here between runs (auto: the probe; fastest: the timing of both
    /// plans), keyed by the model's sha256.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Threads preparing the model (default: one per core).
    #[arg(long, value_name = "N")]
    prepare_threads: Option<usize>,
}

impl PrepArgs {
    fn options(&self) -> ModelOptions {
        ModelOptions {
            threads: self.threads,
            precision: if self.f16 {
                Precision::F16
            } else {
                Precision::AsStored
            },
            batch_symbol: self.batch_symbol.clone(),
            int8_fusion: !self.no_int8_fusion,
            int8_kernels: !self.no_int8_kernels,
            float_kernels: !self.no_float_kernels,
            pinned: self.pins.clone(),
            plans: self.plans,
            device: self.device,
            axis_rewrites: !self.no_axis_rewrites,
            cache_dir: self.cache_dir.clone(),
            prepare_threads: self.prepare_threads,
            ..Default::default()
        }
    }
}

fn main() {
    tern_daemon::quiet_library_backtraces();
    // Microseconds: `RUST_LOG=debug` then times the steps of a model's preparation.
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format_timestamp_micros()
        .init();
    if let Err(e) = real_main(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn load(path: &Path, prep: &PrepArgs) -> Result<Model> {
    Model::load(path, &prep.options()).with_context(|| format!("loading {}", path.display()))
}

fn real_main(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Fleet(cmd) => fleet::run(cmd),
        Command::Inspect { model, prep, json } => inspect(&model, &prep, json),
        Command::Run {
            model,
            inputs,
            output_dir,
            prep,
        } => run(&model, &inputs, &output_dir, &prep),
        Command::Bench {
            model,
            batch,
            load,
            iters,
            warmup,
            cold,
            prep,
            json,
        } => {
            if let Some(runs) = cold {
                bench_cold(&model, runs, json)
            } else if let Some(url) = &load.url {
                bench_http(url, &model, batch, &load, json)
            } else if load.clients.is_some() || load.rate.is_some() {
                bench_load(&model, &prep, batch, &load, json)
            } else {
                bench(&model, &prep, batch, iters, warmup, json)
            }
        }
    }
}

fn shape_string(dims: &[Dim]) -> String {
    format!(
        "[{}]",
        dims.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn inspect(path: &Path, prep: &PrepArgs, json: bool) -> Result<()> {
    let model = load(path, prep)?;
    let info = model.info();
    let insp = model.inspection();
    if json {
        let tensors = |ts: &[tern_core::TensorInfo]| {
            ts.iter()
                .map(|t| {
                    serde_json::json!({
                        "name": t.name,
                        "dtype": t.dtype.name(),
                        "shape": t.shape.iter().map(|d| match d {
                            Dim::Fixed(n) => serde_json::json!(n),
                            Dim::Batch(s) | Dim::Symbol(s) => serde_json::json!(s),
                        }).collect::<Vec<_>>(),
                    })
                })
                .collect::<Vec<_>>()
        };
        let heavy: Vec<_> = insp
            .heavy
            .iter()
            .map(|h| serde_json::json!({"name": h.name, "op": h.op, "precision": h.precision.to_string(), "note": h.note}))
            .collect();
        let doc = serde_json::json!({
            "model": path.display().to_string(),
            "inputs": tensors(&info.inputs),
            "outputs": tensors(&info.outputs),
            "batch": info.batch,
            "parameter_bytes": insp.parameter_bytes,
            "op_histogram": insp.op_histogram,
            "heavy_ops": heavy,
            "plans": {
                "mode": insp.plan.kind.to_string(),
                "why": insp.plan.why,
                "batch_sizes": insp.plan.batch_sizes,
                "cache_limit": insp.plan.cache_limit,
            },
            "rewrites": insp.rewrites,
            "device": insp.device.to_string(),
            "device_note": insp.device_note,
            "placement": insp.placement.as_ref().map(|p| serde_json::json!({
                "on_device": p.on_device,
                "on_cpu": p.on_cpu,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("model: {}", path.display());
    println!("inputs:");
    for t in &info.inputs {
        println!("  {:<20} {} {}", t.name, shape_string(&t.shape), t.dtype);
    }
    println!("outputs:");
    for t in &info.outputs {
        println!("  {:<20} {} {}", t.name, shape_string(&t.shape), t.dtype);
    }
    println!(
        "batch dimension: {}",
        info.batch.as_deref().unwrap_or("none (fixed shapes)")
    );
    println!(
        "device: {}{}",
        insp.device,
        insp.device_note
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    if let Some(p) = &insp.placement {
        println!("  placed by tract: {p}");
    }
    println!("plans: {} ({})", insp.plan.kind, insp.plan.why);
    if !insp.plan.batch_sizes.is_empty() {
        println!(
            "  batch sizes planned: {:?} (a batch runs padded up to the nearest); up to {} plans kept",
            insp.plan.batch_sizes, insp.plan.cache_limit
        );
    }
    for r in &insp.rewrites {
        println!("rewrite: {r}");
    }
    println!("parameters: {} bytes", insp.parameter_bytes);
    let ops: Vec<String> = insp
        .op_histogram
        .iter()
        .map(|(op, n)| format!("{op}×{n}"))
        .collect();
    println!("ops: {}", ops.join(" "));
    let count = |p| insp.count(p);
    println!(
        "convolutions and matmuls: {} int8, {} f32, {} f16",
        count(tern_core::ExecPrecision::Int8),
        count(tern_core::ExecPrecision::F32),
        count(tern_core::ExecPrecision::F16)
    );
    for h in &insp.heavy {
        println!(
            "  {:<28} {:<7} {:<5} {}",
            h.name,
            h.op,
            h.precision.to_string(),
            h.note.as_deref().unwrap_or("")
        );
    }
    Ok(())
}

/// Reads `NAME=FILE.npy` specs (or one bare `FILE.npy`) into the model's inputs, in its order.
fn read_inputs(model: &Model, inputs: &[String]) -> Result<Vec<(String, Tensor)>> {
    let declared = &model.info().inputs;
    let mut tensors: Vec<Option<Tensor>> = vec![None; declared.len()];
    for spec in inputs {
        let (ix, file) = match spec.split_once('=') {
            Some((name, file)) => (model.info().input_index(name)?, file),
            None if declared.len() == 1 => (0, spec.as_str()),
            None => bail!(
                "`{spec}`: the model has {} inputs, name them with NAME=FILE.npy",
                declared.len()
            ),
        };
        if tensors[ix].is_some() {
            bail!("input `{}` given twice", declared[ix].name);
        }
        tensors[ix] = Some(npy::read_file(file).with_context(|| format!("reading {file}"))?);
    }
    let missing: Vec<_> = declared
        .iter()
        .zip(&tensors)
        .filter(|(_, t)| t.is_none())
        .map(|(d, _)| format!("`{}`", d.name))
        .collect();
    if !missing.is_empty() {
        bail!("missing input(s) {}", missing.join(", "));
    }
    Ok(declared
        .iter()
        .zip(tensors)
        .map(|(d, t)| (d.name.clone(), t.expect("checked")))
        .collect())
}

fn run(path: &Path, inputs: &[String], out_dir: &Path, prep: &PrepArgs) -> Result<()> {
    let model = load(path, prep)?;
    let tensors: Vec<Tensor> = read_inputs(&model, inputs)?
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
    let mut session = model.session()?;
    let outputs = session.run(&views)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    for (name, view) in outputs.iter() {
        let file = out_dir.join(format!("{}.npy", sanitize(name)));
        let f =
            std::fs::File::create(&file).with_context(|| format!("creating {}", file.display()))?;
        npy::write(std::io::BufWriter::new(f), &view.to_tensor())?;
        println!(
            "{name}: {:?} {} -> {}",
            view.shape(),
            view.dtype(),
            file.display()
        );
    }
    Ok(())
}

/// Output names come from the model file: keep them from escaping the output directory.
fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>()
        .trim_start_matches('.')
        .to_string()
}

/// Deterministic pseudo-random inputs in a model-friendly range.
fn random_input(dtype: DType, shape: Vec<usize>, seed: &mut u64) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let mut next = || {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        *seed
    };
    let bytes: Vec<u8> = match dtype {
        DType::F32 => (0..n)
            .flat_map(|_| ((next() % 1000) as f32 / 1000.0).to_ne_bytes())
            .collect(),
        DType::F16 => (0..n)
            .flat_map(|_| half::f16::from_f32((next() % 1000) as f32 / 1000.0).to_ne_bytes())
            .collect(),
        DType::Bool => (0..n).map(|_| (next() & 1) as u8).collect(),
        other => (0..n * other.size())
            .map(|i| {
                if i % other.size() == 0 {
                    (next() % 8) as u8
                } else {
                    0
                }
            })
            .collect(),
    };
    Ok(Tensor::from_bytes(dtype, shape, bytes)?)
}

/// Random inputs for every model input, with `batch` rows.
fn random_inputs(model: &Model, batch: usize, mut seed: u64) -> Result<Vec<Tensor>> {
    let mut tensors = vec![];
    for input in &model.info().inputs {
        let shape = input
            .shape
            .iter()
            .map(|d| match d {
                Dim::Fixed(n) => Ok(*n),
                Dim::Batch(_) => Ok(batch),
                Dim::Symbol(s) => Err(anyhow!(
                    "input `{}` has symbolic dimension {s}; cannot pick a size",
                    input.name
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        if batch > 1 && input.batch_axis().is_none() {
            bail!("the model has no batch dimension; use --batch 1 (or --batch-symbol N)");
        }
        tensors.push(random_input(input.dtype, shape, &mut seed)?);
    }
    Ok(tensors)
}

/// Runs `tern bench` once per fresh process (this command line without `--cold`, timed
/// iterations or output flags) and summarises file → first result.
fn bench_cold(path: &Path, runs: usize, json: bool) -> Result<()> {
    if runs == 0 {
        bail!("--cold must be at least 1");
    }
    let mut forwarded = vec![];
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--cold" | "--iters" | "--warmup" => {
                args.next();
            }
            "--json" => {}
            _ if ["--cold=", "--iters=", "--warmup="]
                .iter()
                .any(|p| a.starts_with(p)) => {}
            _ => forwarded.push(a),
        }
    }
    let exe = std::env::current_exe()?;
    let (mut load, mut first, mut total) = (vec![], vec![], vec![]);
    for _ in 0..runs {
        let out = std::process::Command::new(&exe)
            .args(&forwarded)
            .args(["--iters", "1", "--warmup", "0", "--json"])
            .output()?;
        if !out.status.success() {
            bail!(
                "child run failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let l = doc["load_ms"].as_f64().unwrap_or(f64::NAN);
        let f = doc["latency_us"]["max_us"].as_f64().unwrap_or(f64::NAN) / 1e3;
        load.push(l);
        first.push(f);
        total.push(l + f);
    }
    let stat = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0])
    };
    let (load, first, total) = (stat(&mut load), stat(&mut first), stat(&mut total));
    if json {
        let doc = serde_json::json!({
            "model": path.display().to_string(),
            "runs": runs,
            "load_ms": {"median": load.0, "min": load.1},
            "first_run_ms": {"median": first.0, "min": first.1},
            "cold_start_ms": {"median": total.0, "min": total.1},
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "model {}  cold start over {runs} fresh processes (median / min)",
            path.display()
        );
        println!("load+prepare {:.1} / {:.1} ms", load.0, load.1);
        println!("first run    {:.1} / {:.1} ms", first.0, first.1);
        println!("file → first result {:.1} / {:.1} ms", total.0, total.1);
    }
    Ok(())
}

fn bench(
    path: &Path,
    prep: &PrepArgs,
    batch: usize,
    iters: usize,
    warmup: usize,
    json: bool,
) -> Result<()> {
    if batch == 0 || iters == 0 {
        bail!("--batch and --iters must be at least 1");
    }
    let started = Instant::now();
    let model = load(path, prep)?;
    let load_time = started.elapsed();
    let tensors = random_inputs(&model, batch, 0x9E37_79B9_7F4A_7C15)?;
    let views: Vec<_> = tensors.iter().map(|t| t.view()).collect();
    let mut session = model.session()?;
    for _ in 0..warmup {
        session.run(&views)?;
    }
    let mut samples = Vec::with_capacity(iters);
    let wall = Instant::now();
    for _ in 0..iters {
        let t = Instant::now();
        session.run(&views)?;
        samples.push(t.elapsed());
    }
    let wall = wall.elapsed();
    let s = Summary::of(&mut samples).expect("iters >= 1");
    let throughput = (iters * batch) as f64 / wall.as_secs_f64();
    if json {
        let doc = serde_json::json!({
            "model": path.display().to_string(),
            "batch": batch,
            "threads": prep.threads,
            "iters": iters,
            "load_ms": load_time.as_secs_f64() * 1e3,
            "latency_us": s,
            "throughput_per_s": throughput,
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "model {}  batch {batch}  threads {}  iters {iters}",
            path.display(),
            prep.threads
        );
        println!("load+prepare {:.1} ms", load_time.as_secs_f64() * 1e3);
        println!(
            "latency µs: mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
            s.mean_us, s.p50_us, s.p90_us, s.p99_us, s.max_us
        );
        println!("throughput {:.0} inferences/s", throughput);
    }
    Ok(())
}

/// Sends the same few random requests through a batcher.
struct BatcherTarget<'a> {
    batcher: &'a Batcher,
    requests: Vec<Vec<Tensor>>,
}

impl Target for BatcherTarget<'_> {
    fn call(&self, seq: u64) -> Outcome {
        let inputs = &self.requests[seq as usize % self.requests.len()];
        let views: Vec<_> = inputs.iter().map(|t| t.view()).collect();
        match self.batcher.infer(&views, &RequestOptions::default()) {
            Ok(_) => Outcome::Ok,
            Err(Error::Overloaded { .. }) => Outcome::Rejected,
            Err(Error::TimedOut { .. }) => Outcome::TimedOut,
            Err(_) => Outcome::Failed,
        }
    }
}

fn bench_load(
    path: &Path,
    prep: &PrepArgs,
    batch: usize,
    args: &LoadArgs,
    json: bool,
) -> Result<()> {
    if args.duration.is_nan() || args.duration <= 0.0 {
        bail!("--duration must be positive");
    }
    let model = load(path, prep)?;
    let requests = (0..16u64)
        .map(|i| random_inputs(&model, batch, 0x9E37_79B9_7F4A_7C15 ^ (i + 1)))
        .collect::<Result<Vec<_>>>()?;
    let batcher = Batcher::new(model, args.batch_config())?;
    let target = BatcherTarget {
        batcher: &batcher,
        requests,
    };
    let duration = Duration::from_secs_f64(args.duration);
    let (mode, report) = match (args.clients, args.rate) {
        (Some(c), _) => (
            format!("closed loop, {c} clients"),
            loadgen::closed_loop(&target, c, duration),
        ),
        (None, Some(r)) => (
            format!("open loop, {r} req/s"),
            loadgen::open_loop(&target, r, duration, args.concurrency, 0x5EED),
        ),
        (None, None) => unreachable!("checked by the caller"),
    };
    let stats = batcher.stats();
    batcher.shutdown();
    if json {
        let doc = serde_json::json!({
            "model": path.display().to_string(),
            "mode": mode,
            "rows_per_request": batch,
            "max_batch": args.max_batch,
            "max_delay_us": args.max_delay_us,
            "instances": args.instances,
            "report": report,
            "mean_batch_size": stats.mean_batch_size(),
            "batches": stats.batches(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!(
        "model {}  {mode}  max batch {}  window {} µs  instances {}",
        path.display(),
        args.max_batch,
        args.max_delay_us,
        args.instances
    );
    println!(
        "sent {}  ok {}  rejected {}  timed out {}  failed {}",
        report.sent, report.ok, report.rejected, report.timed_out, report.failed
    );
    println!(
        "throughput {:.0} requests/s  mean batch {:.2} rows",
        report.throughput_per_s,
        stats.mean_batch_size()
    );
    if let Some(s) = report.latency_us {
        println!(
            "latency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    Ok(())
}

/// Posts the same binary-encoded KServe v2 request to a running ternd.
struct HttpTarget {
    agent: ureq::Agent,
    url: String,
    header_len: usize,
    body: Vec<u8>,
}

impl Target for HttpTarget {
    fn call(&self, _seq: u64) -> Outcome {
        let sent = self
            .agent
            .post(&self.url)
            .header(
                "Inference-Header-Content-Length",
                self.header_len.to_string(),
            )
            .send(&self.body[..]);
        match sent {
            Ok(mut r) => {
                let status = r.status().as_u16();
                let body = r.body_mut().read_to_vec();
                match (status, body) {
                    (200, Ok(_)) => Outcome::Ok,
                    (503, Ok(b)) if String::from_utf8_lossy(&b).contains("timed out") => {
                        Outcome::TimedOut
                    }
                    (503, _) => Outcome::Rejected,
                    _ => Outcome::Failed,
                }
            }
            Err(_) => Outcome::Failed,
        }
    }
}

fn bench_http(base: &str, model: &Path, batch: usize, args: &LoadArgs, json: bool) -> Result<()> {
    let name = model.to_str().context("model name must be UTF-8")?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let base = base.trim_end_matches('/');
    let mut meta = agent
        .get(format!("{base}/v2/models/{name}"))
        .call()
        .with_context(|| format!("GET {base}/v2/models/{name}"))?;
    let meta: serde_json::Value = serde_json::from_slice(&meta.body_mut().read_to_vec()?)?;
    let inputs = meta["inputs"]
        .as_array()
        .ok_or_else(|| anyhow!("model metadata has no inputs: {meta}"))?;
    // Random inputs from the served metadata (-1 dims become the batch).
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut header_inputs = vec![];
    let mut binary = vec![];
    for i in inputs {
        let dtype_name = i["datatype"].as_str().unwrap_or_default();
        let dtype = tern_daemon::http::dtype_from_kserve(dtype_name)
            .ok_or_else(|| anyhow!("unsupported datatype {dtype_name}"))?;
        let shape: Vec<usize> = i["shape"]
            .as_array()
            .and_then(|s| {
                s.iter()
                    .map(|d| d.as_i64().map(|d| if d < 0 { batch } else { d as usize }))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or_else(|| anyhow!("bad shape in metadata: {i}"))?;
        let t = random_input(dtype, shape.clone(), &mut seed)?;
        header_inputs.push(serde_json::json!({"name": i["name"], "shape": shape, "datatype": dtype_name, "parameters": {"binary_data_size": t.bytes().len()}}));
        binary.extend_from_slice(t.bytes());
    }
    let mut body = serde_json::to_vec(
        &serde_json::json!({"inputs": header_inputs, "parameters": {"binary_data_output": true}}),
    )?;
    let header_len = body.len();
    body.extend_from_slice(&binary);
    let target = HttpTarget {
        agent,
        url: format!("{base}/v2/models/{name}/infer"),
        header_len,
        body,
    };
    if target.call(0) != Outcome::Ok {
        bail!("a first request to {} failed", target.url);
    }
    let duration = Duration::from_secs_f64(args.duration);
    let (mode, report) = match args.rate {
        Some(r) => (
            format!("open loop, {r} req/s"),
            loadgen::open_loop(&target, r, duration, args.concurrency, 0x5EED),
        ),
        None => {
            let c = args.clients.unwrap_or(1);
            (
                format!("closed loop, {c} clients"),
                loadgen::closed_loop(&target, c, duration),
            )
        }
    };
    if json {
        let doc = serde_json::json!({"url": target.url, "mode": mode, "rows_per_request": batch, "report": report});
        println!("{}", serde_json::to_string_pretty(&doc)?);
        return Ok(());
    }
    println!("{}  {mode}", target.url);
    println!(
        "sent {}  ok {}  rejected {}  timed out {}  failed {}",
        report.sent, report.ok, report.rejected, report.timed_out, report.failed
    );
    println!("throughput {:.0} requests/s", report.throughput_per_s);
    if let Some(s) = report.latency_us {
        println!(
            "latency µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
            s.p50_us, s.p90_us, s.p99_us, s.p999_us, s.max_us
        );
    }
    Ok(())
}
