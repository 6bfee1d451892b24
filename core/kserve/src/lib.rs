//! KServe v2 / Open Inference Protocol inference bodies: JSON, and the binary tensor extension
//! (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`, `binary_data_output`).
//!
//! Only the wire format, with no runtime attached: `ternd` serves it over HTTP and MQTT, and the
//! fuzz targets (`fuzz/`) drive the parser without building an executor. Everything here reads
//! untrusted bytes, so nothing may panic and no client-claimed size may size an allocation.

use serde_json::{json, Map, Value};

/// A malformed request: the message goes back to the client with status 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(m.into()))
}

/// The tensor datatypes Tern serves, by their KServe names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Datatype {
    Bool,
    Uint8,
    Int8,
    Int32,
    Int64,
    Fp16,
    Fp32,
}

impl Datatype {
    pub const ALL: [Datatype; 7] = [
        Datatype::Fp32,
        Datatype::Fp16,
        Datatype::Int8,
        Datatype::Uint8,
        Datatype::Int32,
        Datatype::Int64,
        Datatype::Bool,
    ];

    /// `FP32`, `UINT8`, … as requests and metadata spell them.
    pub fn name(self) -> &'static str {
        match self {
            Datatype::Fp32 => "FP32",
            Datatype::Fp16 => "FP16",
            Datatype::Int8 => "INT8",
            Datatype::Uint8 => "UINT8",
            Datatype::Int32 => "INT32",
            Datatype::Int64 => "INT64",
            Datatype::Bool => "BOOL",
        }
    }

    pub fn from_name(name: &str) -> Option<Datatype> {
        Datatype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element on the wire (BOOL is one byte).
    pub fn size(self) -> usize {
        match self {
            Datatype::Bool | Datatype::Uint8 | Datatype::Int8 => 1,
            Datatype::Fp16 => 2,
            Datatype::Int32 | Datatype::Fp32 => 4,
            Datatype::Int64 => 8,
        }
    }
}

#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub dtype: Datatype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

#[derive(Debug)]
pub struct InferRequest {
    pub id: Option<String>,
    pub inputs: Vec<InputTensor>,
    /// Requested outputs (all when empty), with their `binary_data` choice when given.
    pub outputs: Vec<(String, Option<bool>)>,
    /// `parameters.binary_data_output`: the default for outputs that do not choose.
    pub binary_output: bool,
    /// The request's `parameters` object (routing keys and the like).
    pub parameters: Map<String, Value>,
}

/// Parses an infer body. `header_len` is the `Inference-Header-Content-Length` header.
pub fn parse_request(header_len: Option<usize>, body: &[u8]) -> Result<InferRequest, CodecError> {
    let json_len = header_len.unwrap_or(body.len());
    if json_len > body.len() {
        return err(format!(
            "Inference-Header-Content-Length is {json_len} but the body has only {} bytes",
            body.len()
        ));
    }
    let v: Value = serde_json::from_slice(&body[..json_len])
        .map_err(|e| CodecError(format!("malformed JSON: {e}")))?;
    let obj = v
        .as_object()
        .ok_or_else(|| CodecError("the request must be a JSON object".into()))?;
    let mut binary = &body[json_len..];
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return err("`id` must be a string"),
    };
    let raw_inputs = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| CodecError("`inputs` must be an array".into()))?;
    let mut inputs = Vec::with_capacity(raw_inputs.len());
    for (i, raw) in raw_inputs.iter().enumerate() {
        let name = raw
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| CodecError(format!("inputs[{i}]: `name` must be a string")))?;
        let what = |m: &str| CodecError(format!("input `{name}`: {m}"));
        let dt_name = raw
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| what("`datatype` must be a string"))?;
        let dtype = Datatype::from_name(dt_name).ok_or_else(|| {
            what(&format!(
                "unsupported datatype `{dt_name}` (FP32, FP16, INT8, UINT8, INT32, INT64, BOOL)"
            ))
        })?;
        let shape = raw
            .get("shape")
            .and_then(Value::as_array)
            .ok_or_else(|| what("`shape` must be an array"))?
            .iter()
            .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
            .collect::<Option<Vec<usize>>>()
            .ok_or_else(|| what("`shape` must hold non-negative integers"))?;
        let elements = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| what("shape overflows"))?;
        let nbytes = elements
            .checked_mul(dtype.size())
            .ok_or_else(|| what("shape overflows"))?;
        let binary_size = raw
            .get("parameters")
            .and_then(|p| p.get("binary_data_size"));
        let data = match binary_size {
            Some(n) => {
                let n = n
                    .as_u64()
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| what("`binary_data_size` must be a non-negative integer"))?;
                if n != nbytes {
                    return Err(what(&format!("binary_data_size is {n} bytes but shape {shape:?} {dt_name} needs {nbytes}")));
                }
                if binary.len() < n {
                    return Err(what(&format!(
                        "binary_data_size is {n} bytes but only {} remain in the body",
                        binary.len()
                    )));
                }
                let (chunk, rest) = binary.split_at(n);
                binary = rest;
                chunk.to_vec()
            }
            None => {
                let data = raw
                    .get("data")
                    .ok_or_else(|| what("no `data` and no `binary_data_size`"))?;
                // The shape is the client's claim; every JSON value takes at least a byte, so
                // the body bounds what can really be there.
                let mut flat = Vec::with_capacity(elements.min(body.len()));
                flatten(data, &mut flat, elements).map_err(|m| what(&m))?;
                if flat.len() != elements {
                    return Err(what(&format!(
                        "shape {shape:?} needs {elements} values, got {}",
                        flat.len()
                    )));
                }
                encode_values(&flat, dtype).map_err(|m| what(&m))?
            }
        };
        inputs.push(InputTensor {
            name: name.to_string(),
            dtype,
            shape,
            data,
        });
    }
    if !binary.is_empty() {
        return err(format!(
            "{} bytes of binary data follow the inputs that no input claims",
            binary.len()
        ));
    }
    let mut outputs = vec![];
    if let Some(raw) = obj.get("outputs") {
        for (i, o) in raw
            .as_array()
            .ok_or_else(|| CodecError("`outputs` must be an array".into()))?
            .iter()
            .enumerate()
        {
            let name = o
                .get("name")
                .and_then(Value::as_str)
                .ok_or_else(|| CodecError(format!("outputs[{i}]: `name` must be a string")))?;
            let bin = o
                .get("parameters")
                .and_then(|p| p.get("binary_data"))
                .and_then(Value::as_bool);
            outputs.push((name.to_string(), bin));
        }
    }
    let binary_output = obj
        .get("parameters")
        .and_then(|p| p.get("binary_data_output"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let parameters = obj
        .get("parameters")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    Ok(InferRequest {
        id,
        inputs,
        outputs,
        binary_output,
        parameters,
    })
}

fn flatten<'v>(v: &'v Value, out: &mut Vec<&'v Value>, limit: usize) -> Result<(), String> {
    match v {
        Value::Array(items) => {
            for item in items {
                flatten(item, out, limit)?;
                if out.len() > limit {
                    return Err(format!("more than the {limit} values the shape allows"));
                }
            }
            Ok(())
        }
        other => {
            out.push(other);
            Ok(())
        }
    }
}

fn encode_values(values: &[&Value], dtype: Datatype) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for (i, v) in values.iter().enumerate() {
        let bad = || format!("data[{i}] = {v} is not a valid {}", dtype.name());
        match dtype {
            Datatype::Fp32 => {
                let x = float_value(v, f32::MAX as f64).ok_or_else(bad)?;
                out.extend_from_slice(&(x as f32).to_ne_bytes())
            }
            Datatype::Fp16 => {
                let x = float_value(v, half::f16::MAX.to_f64()).ok_or_else(bad)?;
                out.extend_from_slice(&half::f16::from_f64(x).to_ne_bytes())
            }
            Datatype::Bool => out.push(v.as_bool().ok_or_else(bad)? as u8),
            Datatype::Int8 => out.extend_from_slice(
                &i8::try_from(v.as_i64().ok_or_else(bad)?)
                    .map_err(|_| bad())?
                    .to_ne_bytes(),
            ),
            Datatype::Uint8 => {
                out.push(u8::try_from(v.as_i64().ok_or_else(bad)?).map_err(|_| bad())?)
            }
            Datatype::Int32 => out.extend_from_slice(
                &i32::try_from(v.as_i64().ok_or_else(bad)?)
                    .map_err(|_| bad())?
                    .to_ne_bytes(),
            ),
            Datatype::Int64 => out.extend_from_slice(&v.as_i64().ok_or_else(bad)?.to_ne_bytes()),
        }
    }
    Ok(out)
}

/// A JSON number within `max` (a larger one would silently become infinity), or one of the
/// strings a non-finite float is written as (`"NaN"`, `"Infinity"`, `"-Infinity"`; also
/// `"inf"`, `"nan"`): JSON has no literal for them.
fn float_value(v: &Value, max: f64) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64().filter(|x| x.abs() <= max),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|x| !x.is_finite()),
        _ => None,
    }
}

/// A float for a JSON response: a number, or a string for the values JSON cannot hold
/// (serde_json would write `null`, losing what the model said). numpy and tritonclient read
/// these strings back as floats.
fn json_float(x: f32) -> Value {
    if x.is_nan() {
        json!("NaN")
    } else if x.is_infinite() {
        json!(if x > 0.0 { "Infinity" } else { "-Infinity" })
    } else {
        json!(x)
    }
}

fn json_values(dtype: Datatype, bytes: &[u8]) -> Vec<Value> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("exact chunk")))
            .collect()
    }
    match dtype {
        Datatype::Fp32 => each(bytes, |c| json_float(f32::from_ne_bytes(c))),
        Datatype::Fp16 => each(bytes, |c| json_float(half::f16::from_ne_bytes(c).to_f32())),
        Datatype::Int8 => each(bytes, |c: [u8; 1]| json!(c[0] as i8)),
        Datatype::Uint8 => each(bytes, |c: [u8; 1]| json!(c[0])),
        Datatype::Bool => each(bytes, |c: [u8; 1]| json!(c[0] != 0)),
        Datatype::Int32 => each(bytes, |c| json!(i32::from_ne_bytes(c))),
        Datatype::Int64 => each(bytes, |c| json!(i64::from_ne_bytes(c))),
    }
}

/// One output of a response.
#[derive(Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: Datatype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
    pub binary: bool,
}

/// Encodes a response: `(Inference-Header-Content-Length if any output is binary, body)`.
pub fn encode_response(
    model: &str,
    version: u64,
    id: Option<&str>,
    outputs: &[OutputTensor],
) -> (Option<usize>, Vec<u8>) {
    let mut json_outputs = Vec::with_capacity(outputs.len());
    for o in outputs {
        let mut entry = Map::new();
        entry.insert("name".into(), json!(o.name));
        entry.insert("datatype".into(), json!(o.dtype.name()));
        entry.insert("shape".into(), json!(o.shape));
        if o.binary {
            entry.insert(
                "parameters".into(),
                json!({"binary_data_size": o.data.len()}),
            );
        } else {
            entry.insert("data".into(), Value::Array(json_values(o.dtype, &o.data)));
        }
        json_outputs.push(Value::Object(entry));
    }
    let mut doc =
        json!({"model_name": model, "model_version": version.to_string(), "outputs": json_outputs});
    if let Some(id) = id {
        doc["id"] = json!(id);
    }
    let mut body = serde_json::to_vec(&doc).expect("JSON values serialise");
    if !outputs.iter().any(|o| o.binary) {
        return (None, body);
    }
    let header_len = body.len();
    for o in outputs.iter().filter(|o| o.binary) {
        body.extend_from_slice(&o.data);
    }
    (Some(header_len), body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_json_request_with_nested_data_parses() {
        let body = br#"{"id":"7","inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3.5,4]]}],
            "outputs":[{"name":"y","parameters":{"binary_data":true}}]}"#;
        let r = parse_request(None, body).unwrap();
        assert_eq!(r.id.as_deref(), Some("7"));
        let x = &r.inputs[0];
        assert_eq!(
            (x.dtype, x.shape.as_slice()),
            (Datatype::Fp32, &[2usize, 2][..])
        );
        let v: Vec<f32> = x
            .data
            .chunks(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(v, [1.0, 2.0, 3.5, 4.0]);
        assert_eq!(r.outputs, [("y".to_string(), Some(true))]);
    }

    #[test]
    fn a_binary_request_takes_its_tensor_from_after_the_header() {
        let header = br#"{"inputs":[{"name":"x","shape":[2],"datatype":"INT32","parameters":{"binary_data_size":8}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.to_vec();
        body.extend_from_slice(&5i32.to_ne_bytes());
        body.extend_from_slice(&(-6i32).to_ne_bytes());
        let r = parse_request(Some(header.len()), &body).unwrap();
        assert_eq!(r.inputs[0].data.len(), 8);
        assert!(r.binary_output);
    }

    #[test]
    fn malformed_bodies_get_messages_that_say_what_is_wrong() {
        let cases: [(&[u8], Option<usize>, &str); 8] = [
            (b"{", None, "malformed JSON"),
            (b"[]", None, "must be a JSON object"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP64","data":[1,2]}]}"#, None, "unsupported datatype `FP64`"),
            (br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None, "needs 3 values, got 2"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#, None, "not a valid UINT8"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#, None, "only 0 remain"),
            (b"{}", Some(99), "Inference-Header-Content-Length is 99"),
            // Claims 10^18 values: refused by count, never allocated.
            (br#"{"inputs":[{"name":"x","shape":[1000000000,1000000000],"datatype":"FP32","data":[1]}]}"#, None, "needs 1000000000000000000 values, got 1"),
        ];
        for (body, header, want) in cases {
            let e = parse_request(header, body).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn non_finite_floats_travel_as_strings_and_out_of_range_numbers_are_refused() {
        let body = br#"{"inputs":[{"name":"x","shape":[4],"datatype":"FP32","data":["NaN","Infinity","-Infinity",1.5]}]}"#;
        let x = &parse_request(None, body).unwrap().inputs[0];
        let v: Vec<f32> = x
            .data
            .chunks(4)
            .map(|c| f32::from_ne_bytes(c.try_into().unwrap()))
            .collect();
        assert!(v[0].is_nan());
        assert_eq!(v[1..], [f32::INFINITY, f32::NEG_INFINITY, 1.5]);
        for (dtype, data) in [("FP32", "1e39"), ("FP16", "70000"), ("FP32", r#""12""#)] {
            let body = format!(
                r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"{dtype}","data":[{data}]}}]}}"#
            );
            let e = parse_request(None, body.as_bytes())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("is not a valid {dtype}")), "{e}");
        }

        let outs = [OutputTensor {
            name: "y".into(),
            dtype: Datatype::Fp32,
            shape: vec![3],
            data: [f32::NAN, f32::NEG_INFINITY, 0.25]
                .iter()
                .flat_map(|x| x.to_ne_bytes())
                .collect(),
            binary: false,
        }];
        let (_, body) = encode_response("m", 1, None, &outs);
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["outputs"][0]["data"], json!(["NaN", "-Infinity", 0.25]));
    }

    #[test]
    fn responses_put_binary_outputs_after_the_json_header() {
        let outs = [
            OutputTensor {
                name: "a".into(),
                dtype: Datatype::Fp32,
                shape: vec![1],
                data: 2.5f32.to_ne_bytes().to_vec(),
                binary: false,
            },
            OutputTensor {
                name: "b".into(),
                dtype: Datatype::Int64,
                shape: vec![1],
                data: 9i64.to_ne_bytes().to_vec(),
                binary: true,
            },
        ];
        let (header, body) = encode_response("m", 3, Some("q"), &outs);
        let header = header.unwrap();
        let doc: Value = serde_json::from_slice(&body[..header]).unwrap();
        assert_eq!(doc["model_version"], "3");
        assert_eq!(doc["id"], "q");
        assert_eq!(doc["outputs"][0]["data"][0], 2.5);
        assert_eq!(doc["outputs"][1]["parameters"]["binary_data_size"], 8);
        assert_eq!(&body[header..], &9i64.to_ne_bytes());
    }
}
