//! Prometheus metrics at `GET /metrics` (OpenMetrics text, which Prometheus scrapes natively): model statistics read from each batcher at scrape
//! time, HTTP status counts, and process CPU and RSS. Encoded by `prometheus-client`.

use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tern_core::{FailureReason, Histogram, LATENCY_BOUNDS_US};

use crate::repository::Repository;

/// Everything `/metrics` reports.
pub struct Metrics {
    registry: Registry,
    http: Family<Vec<(String, String)>, Counter>,
    pub fleet: FleetCounters,
    pub streams: StreamCounters,
}

/// What sensor streams count.
#[derive(Debug, Default, Clone)]
pub struct StreamCounters {
    pub samples: Family<Vec<(String, String)>, Counter>,
    /// Windows by stream and outcome: `ok`, `error`, `bad_sample`, `source_error`.
    pub windows: Family<Vec<(String, String)>, Counter>,
}

/// What the fleet agent counts: enough to prove a resumed transfer fetched no chunk twice.
#[derive(Debug, Default, Clone)]
pub struct FleetCounters {
    /// Chunks written to a staging area (each chunk of an artifact at most once).
    pub chunks_received: Counter,
    /// Chunks delivered again (QoS 1 duplicates, re-sent retained messages) and ignored.
    pub chunks_duplicate: Counter,
    pub bytes_received: Counter,
    /// Updates by outcome: `activated`, `failed`, `rolled_back`.
    pub updates: Family<Vec<(String, String)>, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    pub fn new(repo: Arc<Repository>) -> Metrics {
        let mut registry = Registry::default();
        let http = Family::<Vec<(String, String)>, Counter>::default();
        registry.register(
            "tern_http_responses",
            "HTTP responses by route and status code",
            http.clone(),
        );
        let fleet = FleetCounters::default();
        registry.register(
            "tern_fleet_chunks_received",
            "Artifact chunks written to staging",
            fleet.chunks_received.clone(),
        );
        registry.register(
            "tern_fleet_chunks_duplicate",
            "Artifact chunks received again and ignored",
            fleet.chunks_duplicate.clone(),
        );
        registry.register(
            "tern_fleet_bytes_received",
            "Artifact bytes written to staging",
            fleet.bytes_received.clone(),
        );
        registry.register(
            "tern_fleet_updates",
            "Fleet updates by outcome",
            fleet.updates.clone(),
        );
        let streams = StreamCounters::default();
        registry.register(
            "tern_stream_samples",
            "Sensor samples read, by stream",
            streams.samples.clone(),
        );
        registry.register(
            "tern_stream_windows",
            "Sensor windows by stream and outcome",
            streams.windows.clone(),
        );
        registry.register_collector(Box::new(ModelCollector { repo }));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry,
            http,
            fleet,
            streams,
        }
    }

    pub fn http_response(&self, route: &str, code: u16) {
        self.http
            .get_or_create(&vec![
                ("route".into(), route.into()),
                ("code".into(), code.to_string()),
            ])
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }
}

#[derive(Debug)]
struct ModelCollector {
    repo: Arc<Repository>,
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Vec<(&str, String)>, Histogram)],
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in rows {
        // prometheus-client accumulates the per-bucket counts itself.
        let buckets: Vec<(f64, u64)> = LATENCY_BOUNDS_US
            .iter()
            .map(|b| *b as f64 / 1e6)
            .chain(std::iter::once(f64::INFINITY))
            .zip(h.counts.iter().copied())
            .collect();
        family
            .encode_family(labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                h.sum_us as f64 / 1e6,
                h.count(),
                &buckets,
                None,
            )?;
    }
    Ok(())
}

impl Collector for ModelCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let loaded = self.repo.loaded();
        let stats: Vec<_> = loaded
            .iter()
            .map(|l| {
                (
                    vec![
                        ("model", l.name.clone()),
                        ("version", l.version.to_string()),
                    ],
                    l.batcher.stats(),
                    l.load_time,
                )
            })
            .collect();
        let counter = |encoder: &mut DescriptorEncoder,
                       name: &str,
                       help: &str,
                       f: &dyn Fn(&tern_core::BatchStats) -> u64| {
            let mut fam = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (labels, s, _) in &stats {
                ConstCounter::new(f(s)).encode(fam.encode_family(labels)?)?;
            }
            Ok::<_, std::fmt::Error>(())
        };
        counter(
            &mut encoder,
            "tern_request_success",
            "Requests answered with outputs",
            &|s| s.success,
        )?;
        {
            let mut fam = encoder.encode_descriptor(
                "tern_request_failure",
                "Failed requests by reason",
                None,
                MetricType::Counter,
            )?;
            for (labels, s, _) in &stats {
                for r in FailureReason::ALL {
                    let mut l = labels.clone();
                    l.push(("reason", r.name().to_string()));
                    ConstCounter::new(s.failures_of(r)).encode(fam.encode_family(&l)?)?;
                }
            }
        }
        counter(
            &mut encoder,
            "tern_inference_count",
            "Rows (batch entries) executed",
            &|s| s.batch_sizes.iter().map(|(n, c)| *n as u64 * c).sum(),
        )?;
        counter(
            &mut encoder,
            "tern_execution_count",
            "Batches executed (forward passes)",
            &|s| s.batches(),
        )?;
        {
            let mut fam = encoder.encode_descriptor(
                "tern_pending_requests",
                "Requests waiting in the queue",
                None,
                MetricType::Gauge,
            )?;
            for (labels, s, _) in &stats {
                ConstGauge::new(s.queue_depth as i64).encode(fam.encode_family(labels)?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_model_load_seconds",
                "File to first result: read, prepare, warm up",
                None,
                MetricType::Gauge,
            )?;
            for (labels, _, t) in &stats {
                ConstGauge::new(t.as_secs_f64()).encode(fam.encode_family(labels)?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_batch_size",
                "Rows per executed batch",
                None,
                MetricType::Histogram,
            )?;
            for (labels, s, _) in &stats {
                let bounds = [1usize, 2, 4, 8, 16, 32, 64, 128, 256];
                let mut lower = 0;
                let buckets: Vec<(f64, u64)> = bounds
                    .iter()
                    .map(|&b| {
                        let n = s
                            .batch_sizes
                            .iter()
                            .filter(|(n, _)| *n > lower && *n <= b)
                            .map(|(_, c)| c)
                            .sum();
                        lower = b;
                        (b as f64, n)
                    })
                    .chain(std::iter::once((
                        f64::INFINITY,
                        s.batch_sizes
                            .iter()
                            .filter(|(n, _)| *n > 256)
                            .map(|(_, c)| c)
                            .sum(),
                    )))
                    .collect();
                let sum: u64 = s.batch_sizes.iter().map(|(n, c)| *n as u64 * c).sum();
                fam.encode_family(labels)?
                    .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                        sum as f64,
                        s.batches(),
                        &buckets,
                        None,
                    )?;
            }
        }
        let routing = self.repo.routing_stats();
        {
            let mut fam = encoder.encode_descriptor(
                "tern_routing_requests",
                "Requests routed by canary routing, by version",
                None,
                MetricType::Counter,
            )?;
            for (model, rule, st) in &routing {
                for (version, n) in [
                    (rule.stable, st.to_stable),
                    (rule.candidate, st.to_candidate),
                ] {
                    let labels = [("model", model.clone()), ("version", version.to_string())];
                    ConstCounter::new(n).encode(fam.encode_family(&labels)?)?;
                }
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_routing_rolled_back",
                "1 when the candidate was rolled back to the stable version",
                None,
                MetricType::Gauge,
            )?;
            for (model, rule, st) in &routing {
                let labels = [
                    ("model", model.clone()),
                    ("candidate", rule.candidate.to_string()),
                ];
                ConstGauge::new(st.rolled_back as i64).encode(fam.encode_family(&labels)?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_shadow_compared",
                "Requests mirrored to a shadow candidate and compared",
                None,
                MetricType::Counter,
            )?;
            for (model, _, st) in &routing {
                ConstCounter::new(st.shadow_compared)
                    .encode(fam.encode_family(&[("model", model.clone())])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_shadow_top1_agreement",
                "Mirrored requests whose top-1 class matched the served answer",
                None,
                MetricType::Counter,
            )?;
            for (model, _, st) in &routing {
                ConstCounter::new(st.shadow_top1_agree)
                    .encode(fam.encode_family(&[("model", model.clone())])?)?;
            }
        }
        {
            let mut fam = encoder.encode_descriptor(
                "tern_shadow_max_abs_diff",
                "Largest absolute difference between shadow and served outputs",
                None,
                MetricType::Gauge,
            )?;
            for (model, _, st) in &routing {
                ConstGauge::new(st.shadow_max_abs_diff)
                    .encode(fam.encode_family(&[("model", model.clone())])?)?;
            }
        }
        let rows = |f: fn(&tern_core::BatchStats) -> &Histogram| -> Vec<_> {
            stats
                .iter()
                .map(|(l, s, _)| (l.clone(), f(s).clone()))
                .collect()
        };
        histogram(
            &mut encoder,
            "tern_request_duration_seconds",
            "Submission to answer, per request",
            &rows(|s| &s.request),
        )?;
        histogram(
            &mut encoder,
            "tern_queue_duration_seconds",
            "Time in the batching queue, per request",
            &rows(|s| &s.queue_wait),
        )?;
        histogram(
            &mut encoder,
            "tern_compute_duration_seconds",
            "Forward pass, per batch",
            &rows(|s| &s.compute),
        )?;
        Ok(())
    }
}

#[derive(Debug)]
struct ProcessCollector;

/// CPU seconds (user + system) and resident bytes of this process; zeros where `/proc` is absent.
pub fn process_usage() -> (f64, u64) {
    // /proc/self/stat: utime and stime (fields 14, 15) in clock ticks; RSS from status.
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Linux reports in USER_HZ, which is 100 on every architecture Tern targets.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (cpu, (rss_kb * 1024.0) as u64)
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (cpu, rss) = process_usage();
        let c = ConstCounter::new(cpu);
        c.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time",
            None,
            c.metric_type(),
        )?)?;
        let g = ConstGauge::new(rss as f64);
        g.encode(encoder.encode_descriptor(
            "process_resident_memory_bytes",
            "Resident set size",
            None,
            g.metric_type(),
        )?)?;
        Ok(())
    }
}
