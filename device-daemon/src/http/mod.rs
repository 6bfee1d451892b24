//! The KServe v2 / Open Inference Protocol HTTP API (what Triton, KServe and MLServer serve,
//! and what the stock `tritonclient` speaks), plus `GET /metrics`.
//!
//! Errors are `{"error": "..."}` with Triton's status mapping: 400 bad input, 404 unknown
//! model or version, 408 body not in full within `body_timeout_ms`, 413 body too large,
//! 503 not ready / failed to load / overloaded / timed out / shutting down.

pub use tern_kserve as codec;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use tern_core::{DType, Error as CoreError, RequestOptions, TensorView};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::repository::{Loaded, RepoError, Repository};
use codec::{Datatype, OutputTensor};

/// tern-core's datatype for a KServe one.
pub fn core_dtype(d: Datatype) -> DType {
    match d {
        Datatype::Fp32 => DType::F32,
        Datatype::Fp16 => DType::F16,
        Datatype::Int8 => DType::I8,
        Datatype::Uint8 => DType::U8,
        Datatype::Int32 => DType::I32,
        Datatype::Int64 => DType::I64,
        Datatype::Bool => DType::Bool,
    }
}

/// KServe's datatype for a tern-core one.
pub fn kserve_datatype(d: DType) -> Datatype {
    match d {
        DType::F32 => Datatype::Fp32,
        DType::F16 => Datatype::Fp16,
        DType::I8 => Datatype::Int8,
        DType::U8 => Datatype::Uint8,
        DType::I32 => Datatype::Int32,
        DType::I64 => Datatype::Int64,
        DType::Bool => Datatype::Bool,
    }
}

pub fn dtype_from_kserve(name: &str) -> Option<DType> {
    Datatype::from_name(name).map(core_dtype)
}

pub fn dtype_to_kserve(d: DType) -> &'static str {
    kserve_datatype(d).name()
}

/// Shared by every handler.
#[derive(Debug)]
pub struct AppState {
    pub repo: Arc<Repository>,
    pub metrics: Arc<Metrics>,
    pub config: Arc<Config>,
    /// Set once the startup load of the repository has finished.
    pub ready: AtomicBool,
    /// Requests seen, to spread unkeyed canary traffic.
    pub requests: std::sync::atomic::AtomicU64,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

impl From<RepoError> for ApiError {
    fn from(e: RepoError) -> ApiError {
        let status = match &e {
            RepoError::InvalidName(_) => StatusCode::BAD_REQUEST,
            RepoError::UnknownModel(_) | RepoError::UnknownVersion { .. } => StatusCode::NOT_FOUND,
            // A model that cannot load is the server's fault, not the request's.
            RepoError::NotReady(_) | RepoError::Evicted(_) | RepoError::Load { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        ApiError(status, e.to_string())
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> ApiError {
        let status = match &e {
            CoreError::InvalidInput(_) | CoreError::BatchTooLarge { .. } => StatusCode::BAD_REQUEST,
            CoreError::Overloaded { .. } | CoreError::TimedOut { .. } | CoreError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

type ApiResult<T> = Result<T, ApiError>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/{model}", get(model_metadata))
        .route(
            "/v2/models/{model}/versions/{version}",
            get(model_metadata_v),
        )
        .route("/v2/models/{model}/ready", get(model_ready))
        .route(
            "/v2/models/{model}/versions/{version}/ready",
            get(model_ready_v),
        )
        .route("/v2/models/{model}/infer", post(infer))
        .route("/v2/models/{model}/versions/{version}/infer", post(infer_v))
        .route("/v2/models/{model}/stats", get(model_stats))
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/{model}/load", post(repository_load))
        .route(
            "/v2/repository/models/{model}/unload",
            post(repository_unload),
        )
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError(StatusCode::NOT_FOUND, "no such endpoint".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Bearer-token check (health checks stay open) and per-route status counts.
async fn observe(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    if let Some(token) = &state.config.bearer_token {
        let open = req.uri().path().starts_with("/v2/health/");
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        let expected = format!("Bearer {token}");
        if !open && given != Some(expected.as_str()) {
            state.metrics.http_response(&route, 401);
            return ApiError(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token".into(),
            )
            .into_response();
        }
    }
    let response = next.run(req).await;
    state
        .metrics
        .http_response(&route, response.status().as_u16());
    response
}

async fn server_ready(State(s): State<Arc<AppState>>) -> StatusCode {
    if s.ready.load(Ordering::Acquire) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

async fn server_metadata() -> Json<serde_json::Value> {
    Json(json!({
        "name": "ternd",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data", "model_repository", "statistics"],
    }))
}

fn parse_version(v: &str) -> ApiResult<u64> {
    v.parse()
        .map_err(|_| bad(format!("version `{v}` is not a number")))
}

/// The served version, reloading a model the memory budget evicted (a cold start for this
/// request, counted in `tern_model_load_seconds`).
async fn lookup(s: &AppState, model: String, version: Option<u64>) -> ApiResult<Arc<Loaded>> {
    match s.repo.get(&model, version) {
        Err(RepoError::Evicted(_)) => {
            let repo = s.repo.clone();
            let name = model.clone();
            tokio::task::spawn_blocking(move || repo.load(&name))
                .await
                .map_err(|e| {
                    ApiError(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("reload failed: {e}"),
                    )
                })?
                .map_err(|e| ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()))?;
            Ok(s.repo.get(&model, version)?)
        }
        other => Ok(other?),
    }
}

fn metadata(s: &AppState, l: &Loaded) -> serde_json::Value {
    let tensors = |ts: &[tern_core::TensorInfo]| -> Vec<serde_json::Value> {
        ts.iter()
            .map(|t| {
                let shape: Vec<i64> = t
                    .shape
                    .iter()
                    .map(|d| match d {
                        tern_core::Dim::Fixed(n) => *n as i64,
                        _ => -1,
                    })
                    .collect();
                json!({"name": t.name, "datatype": dtype_to_kserve(t.dtype), "shape": shape})
            })
            .collect()
    };
    let info = l.model.info();
    json!({
        "name": l.name,
        "versions": s.repo.versions(&l.name).iter().map(|v| v.to_string()).collect::<Vec<_>>(),
        "platform": "onnx",
        "inputs": tensors(&info.inputs),
        "outputs": tensors(&info.outputs),
    })
}

async fn model_metadata(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    if let Some(p) = s.repo.pipeline(&model) {
        return Ok(Json(pipeline_metadata(&s, &model, &p)));
    }
    let l = lookup(&s, model, None).await?;
    Ok(Json(metadata(&s, &l)))
}

/// A pipeline's tensors, typed by the step models that read or write them.
fn pipeline_metadata(
    s: &AppState,
    name: &str,
    p: &crate::repository::LoadedPipeline,
) -> serde_json::Value {
    let describe = |tensor: &str, reading: bool| -> serde_json::Value {
        for step in &p.pipeline.steps {
            let map = if reading { &step.inputs } else { &step.outputs };
            let Some((model_tensor, _)) = map.iter().find(|(_, t)| t.as_str() == tensor) else {
                continue;
            };
            let Ok(l) = s.repo.get(&step.model, step.version) else {
                continue;
            };
            let info = l.model.info();
            let list = if reading { &info.inputs } else { &info.outputs };
            if let Some(t) = list.iter().find(|t| &t.name == model_tensor) {
                let shape: Vec<i64> = t
                    .shape
                    .iter()
                    .map(|d| match d {
                        tern_core::Dim::Fixed(n) => *n as i64,
                        _ => -1,
                    })
                    .collect();
                return json!({"name": tensor, "datatype": dtype_to_kserve(t.dtype), "shape": shape});
            }
        }
        json!({"name": tensor})
    };
    json!({
        "name": name,
        "versions": ["1"],
        "platform": "ensemble",
        "inputs": p.pipeline.inputs.iter().map(|t| describe(t, true)).collect::<Vec<_>>(),
        "outputs": p.pipeline.outputs.iter().map(|t| describe(t, false)).collect::<Vec<_>>(),
    })
}

async fn model_metadata_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let l = lookup(&s, model, Some(parse_version(&version)?)).await?;
    Ok(Json(metadata(&s, &l)))
}

async fn model_ready(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<StatusCode> {
    if s.repo.pipeline(&model).is_some() {
        return Ok(StatusCode::OK);
    }
    lookup(&s, model, None).await.map(|_| StatusCode::OK)
}

async fn model_ready_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    lookup(&s, model, Some(parse_version(&version)?))
        .await
        .map(|_| StatusCode::OK)
}

async fn infer(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    run_infer(s, model, None, headers, body).await
}

async fn infer_v(
    State(s): State<Arc<AppState>>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let version = parse_version(&version)?;
    run_infer(s, model, Some(version), headers, body).await
}

const HEADER_LEN: &str = "inference-header-content-length";

/// Reads (within the size limit) and decodes an infer body.
async fn read_request(
    s: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<Arc<codec::InferRequest>> {
    let limit = s.config.max_body_bytes;
    let too_large = || {
        ApiError(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("request body exceeds the {limit}-byte limit"),
        )
    };
    let wait = std::time::Duration::from_millis(s.config.body_timeout_ms);
    // A declared length over the limit is refused without buffering any of the body.
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        discard(body, limit, wait).await;
        return Err(too_large());
    }
    let body = match tokio::time::timeout(wait, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) if is_length_limit(&e) => return Err(too_large()),
        Ok(Err(e)) => return Err(bad(format!("the request body could not be read: {e}"))),
        Err(_) => {
            return Err(ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive in full within {} ms",
                    s.config.body_timeout_ms
                ),
            ))
        }
    };
    let header_len = match headers.get(HEADER_LEN) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| bad("Inference-Header-Content-Length must be a byte count"))?,
        ),
    };
    Ok(Arc::new(
        codec::parse_request(header_len, &body).map_err(|e| bad(e.to_string()))?,
    ))
}

/// Reads and drops up to `max` bytes of a refused body: a client still sending it then reads the
/// refusal instead of a broken pipe (the server would close on unread data). Gives up after
/// `wait`.
async fn discard(mut body: Body, max: usize, wait: std::time::Duration) {
    use http_body_util::BodyExt;
    let drain = async {
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len());
            if seen > max {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(wait, drain).await;
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

/// Runs a pipeline: each step in dependency order on its model, tensors passed by name.
async fn run_pipeline(
    s: Arc<AppState>,
    name: String,
    p: Arc<crate::repository::LoadedPipeline>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let request = read_request(&s, &headers, body).await?;
    let mut namespace: std::collections::BTreeMap<String, codec::InputTensor> = Default::default();
    for input in &request.inputs {
        if !p.pipeline.inputs.contains(&input.name) {
            return Err(bad(format!(
                "unknown input `{}`; the pipeline's inputs are {:?}",
                input.name, p.pipeline.inputs
            )));
        }
        namespace.insert(
            input.name.clone(),
            codec::InputTensor {
                name: input.name.clone(),
                dtype: input.dtype,
                shape: input.shape.clone(),
                data: input.data.clone(),
            },
        );
    }
    if let Some(missing) = p
        .pipeline
        .inputs
        .iter()
        .find(|i| !namespace.contains_key(*i))
    {
        return Err(bad(format!("missing input `{missing}`")));
    }
    for &ix in &p.order {
        let step = &p.pipeline.steps[ix];
        let in_step = |e: ApiError| {
            ApiError(
                e.0,
                format!(
                    "pipeline step `{}` (model `{}`): {}",
                    step.name, step.model, e.1
                ),
            )
        };
        let loaded = match step.version {
            Some(v) => lookup(&s, step.model.clone(), Some(v)).await,
            None => lookup(&s, step.model.clone(), None).await,
        }
        .map_err(in_step)?;
        let inputs = step
            .inputs
            .iter()
            .map(|(model_input, src)| {
                let t = &namespace[src];
                codec::InputTensor {
                    name: model_input.clone(),
                    dtype: t.dtype,
                    shape: t.shape.clone(),
                    data: t.data.clone(),
                }
            })
            .collect();
        let step_request = Arc::new(codec::InferRequest {
            id: None,
            inputs,
            outputs: vec![],
            binary_output: false,
            parameters: Default::default(),
        });
        for o in infer_on(loaded, step_request).await.map_err(in_step)? {
            if let Some(dst) = step.outputs.get(&o.name) {
                namespace.insert(
                    dst.clone(),
                    codec::InputTensor {
                        name: dst.clone(),
                        dtype: o.dtype,
                        shape: o.shape,
                        data: o.data,
                    },
                );
            }
        }
    }
    let wanted: Vec<(String, bool)> = if request.outputs.is_empty() {
        p.pipeline
            .outputs
            .iter()
            .map(|o| (o.clone(), request.binary_output))
            .collect()
    } else {
        request
            .outputs
            .iter()
            .map(|(n, b)| (n.clone(), b.unwrap_or(request.binary_output)))
            .collect()
    };
    let mut outputs = vec![];
    for (o, binary) in wanted {
        if !p.pipeline.outputs.contains(&o) {
            return Err(bad(format!("unknown output `{o}`")));
        }
        let t = namespace
            .remove(&o)
            .ok_or_else(|| bad(format!("output `{o}` requested twice")))?;
        outputs.push(OutputTensor {
            name: o,
            dtype: t.dtype,
            shape: t.shape,
            data: t.data,
            binary,
        });
    }
    Ok(encode(&name, 1, request.id.as_deref(), &outputs))
}

fn encode(model: &str, version: u64, id: Option<&str>, outputs: &[OutputTensor]) -> Response {
    let (header_len, body) = codec::encode_response(model, version, id, outputs);
    let mut response = Response::new(Body::from(body));
    let h = response.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LEN, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    response
}

async fn run_infer(
    s: Arc<AppState>,
    model: String,
    version: Option<u64>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    if version.is_none() || version == Some(1) {
        if let Some(p) = s.repo.pipeline(&model) {
            return run_pipeline(s, model, p, headers, body).await;
        }
    }
    let loaded = lookup(&s, model, version).await?;
    let request = read_request(&s, &headers, body).await?;
    let name = loaded.name.clone();
    let (primary, shadow) = match version {
        Some(_) => (loaded, None),
        None => {
            let key = headers
                .get("x-tern-route-key")
                .and_then(|v| v.to_str().ok())
                .map(String::from)
                .or_else(|| {
                    let field = s.repo.route_key(&name)?;
                    request.parameters.get(&field).map(|v| {
                        v.as_str()
                            .map(String::from)
                            .unwrap_or_else(|| v.to_string())
                    })
                });
            let seq = s.requests.fetch_add(1, Ordering::Relaxed);
            s.repo.route(&name, key.as_deref(), seq)?
        }
    };
    let started = std::time::Instant::now();
    let mut served = primary.clone();
    let mut result = infer_on(primary.clone(), request.clone()).await;
    if let Some(stable) = s.repo.stable_for(&name, primary.version) {
        // The canary served this request: judge it, and never let its failure reach the
        // caller when the stable version can answer.
        match &result {
            Ok(_) => s
                .repo
                .record_candidate(&name, primary.version, false, started.elapsed()),
            Err(_) => {
                let fallback = infer_on(stable.clone(), request.clone()).await;
                if fallback.is_ok() {
                    s.repo
                        .record_candidate(&name, primary.version, true, started.elapsed());
                    served = stable;
                    result = fallback;
                }
            }
        }
    }
    let outputs = result?;
    if let Some(shadow) = shadow {
        let (state, request, served) = (
            s.clone(),
            request.clone(),
            outputs
                .first()
                .map(|o| (o.dtype, o.shape.clone(), o.data.clone())),
        );
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let got = infer_on(shadow.clone(), request).await;
            state.repo.record_candidate(
                &shadow.name,
                shadow.version,
                got.is_err(),
                started.elapsed(),
            );
            if let (Ok(got), Some((Datatype::Fp32, shape, served))) = (got, served) {
                if let Some(first) = got.first().filter(|o| o.dtype == Datatype::Fp32) {
                    let f = |b: &[u8]| -> Vec<f32> {
                        b.chunks_exact(4)
                            .map(|c| f32::from_ne_bytes(c.try_into().expect("4 bytes")))
                            .collect()
                    };
                    let classes = shape.last().copied().unwrap_or(1);
                    state
                        .repo
                        .record_shadow(&shadow.name, &f(&served), &f(&first.data), classes);
                }
            }
        });
    }
    Ok(encode(
        &served.name,
        served.version,
        request.id.as_deref(),
        &outputs,
    ))
}

/// Runs one parsed request on one version: inputs by name in that version's order, the
/// requested outputs copied out.
async fn infer_on(
    loaded: Arc<Loaded>,
    request: Arc<codec::InferRequest>,
) -> ApiResult<Vec<OutputTensor>> {
    let info = loaded.model.info();
    // Inputs go to the model in its declared order, whatever order the request used.
    let mut order: Vec<Option<usize>> = vec![None; info.inputs.len()];
    for (at, input) in request.inputs.iter().enumerate() {
        let ix = info
            .input_index(&input.name)
            .map_err(|e| bad(e.to_string()))?;
        if order[ix].replace(at).is_some() {
            return Err(bad(format!("input `{}` given twice", input.name)));
        }
    }
    if let Some((missing, _)) = info.inputs.iter().zip(&order).find(|(_, o)| o.is_none()) {
        return Err(bad(format!("missing input `{}`", missing.name)));
    }
    let mut wanted: Vec<(usize, bool)> = vec![];
    if request.outputs.is_empty() {
        wanted.extend((0..info.outputs.len()).map(|i| (i, request.binary_output)));
    } else {
        for (name, binary) in &request.outputs {
            let ix = info
                .outputs
                .iter()
                .position(|o| &o.name == name)
                .ok_or_else(|| bad(format!("unknown output `{name}`")))?;
            wanted.push((ix, binary.unwrap_or(request.binary_output)));
        }
    }
    // Triton's request parameters: `priority` (0 is highest here) and `timeout` in microseconds.
    let param = |k: &str| {
        request
            .parameters
            .get(k)
            .and_then(serde_json::Value::as_u64)
    };
    let options = RequestOptions {
        priority: param("priority").map(|p| p as usize).unwrap_or(0),
        timeout: param("timeout").map(std::time::Duration::from_micros),
    };
    let outputs = tokio::task::spawn_blocking(move || -> Result<Vec<OutputTensor>, CoreError> {
        let views: Vec<TensorView<'_>> = order
            .iter()
            .map(|at| {
                let i = &request.inputs[at.expect("checked")];
                TensorView::from_bytes(core_dtype(i.dtype), &i.shape, &i.data)
            })
            .collect();
        let response = loaded.batcher.infer(&views, &options)?;
        let info = loaded.model.info();
        Ok(wanted
            .iter()
            .map(|&(ix, binary)| {
                let v = response.get(ix).expect("declared output");
                OutputTensor {
                    name: info.outputs[ix].name.clone(),
                    dtype: kserve_datatype(v.dtype()),
                    shape: v.shape().to_vec(),
                    data: v.bytes().to_vec(),
                    binary,
                }
            })
            .collect())
    })
    .await
    .map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("inference task failed: {e}"),
        )
    })??;
    Ok(outputs)
}

async fn model_stats(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let l = lookup(&s, model, None).await?;
    let st = l.batcher.stats();
    let ns = |h: &tern_core::Histogram| json!({"count": h.count(), "ns": h.sum_us * 1000});
    Ok(Json(json!({
        "model_stats": [{
            "name": l.name,
            "version": l.version.to_string(),
            "inference_count": st.batch_sizes.iter().map(|(n, c)| *n as u64 * c).sum::<u64>(),
            "execution_count": st.batches(),
            "inference_stats": {
                "success": ns(&st.request),
                "fail": {"count": st.failures.iter().map(|(_, c)| c).sum::<u64>()},
                "queue": ns(&st.queue_wait),
                "compute_infer": ns(&st.compute),
            },
            "batch_stats": st.batch_sizes.iter().map(|(n, c)| json!({"batch_size": n, "count": c})).collect::<Vec<_>>(),
            "pending_requests": st.queue_depth,
        }],
        "routing": s.repo.routing_stats().into_iter().filter(|(m, _, _)| *m == l.name).map(|(_, rule, st)| json!({
            "stable": rule.stable,
            "candidate": rule.candidate,
            "percent": rule.percent,
            "shadow": rule.shadow,
            "to_stable": st.to_stable,
            "to_candidate": st.to_candidate,
            "rolled_back": st.rolled_back,
            "rollback_reason": st.rollback_reason,
            "shadow_compared": st.shadow_compared,
            "shadow_top1_agree": st.shadow_top1_agree,
            "shadow_max_abs_diff": st.shadow_max_abs_diff,
        })).collect::<Vec<_>>(),
    })))
}

async fn repository_index(
    State(s): State<Arc<AppState>>,
) -> Json<Vec<crate::repository::IndexEntry>> {
    Json(s.repo.index())
}

async fn repository_load(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<StatusCode> {
    crate::repository::check_name(&model)?;
    let repo = s.repo.clone();
    tokio::task::spawn_blocking(move || repo.load(&model))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("load task failed: {e}"),
            )
        })??;
    Ok(StatusCode::OK)
}

async fn repository_unload(
    State(s): State<Arc<AppState>>,
    Path(model): Path<String>,
) -> ApiResult<StatusCode> {
    let repo = s.repo.clone();
    tokio::task::spawn_blocking(move || repo.unload(&model))
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("unload task failed: {e}"),
            )
        })??;
    Ok(StatusCode::OK)
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let text = s.metrics.render();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}
