//! KServe v2 / Open Inference Protocol inference bodies: JSON, and the binary tensor extension
//! (`Inference-Header-Content-Length`, `binary_data_size`, `binary_data`, `binary_data_output`).

use serde_json::{json, Map, Value};
use tern_core::DType;

/// A malformed request: the message goes back to the client with status 400.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct CodecError(pub String);

fn err<T>(m: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(m.into()))
}

pub fn dtype_from_kserve(s: &str) -> Option<DType> {
    Some(match s {
        "FP32" => DType::F32,
        "FP16" => DType::F16,
        "INT8" => DType::I8,
        "UINT8" => DType::U8,
        "INT32" => DType::I32,
        "INT64" => DType::I64,
        "BOOL" => DType::Bool,
        _ => return None,
    })
}

pub fn dtype_to_kserve(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::I8 => "INT8",
        DType::U8 => "UINT8",
        DType::I32 => "INT32",
        DType::I64 => "INT64",
        DType::Bool => "BOOL",
    }
}

#[derive(Debug)]
pub struct InputTensor {
    pub name: String,
    pub dtype: DType,
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
        let dtype = dtype_from_kserve(dt_name).ok_or_else(|| {
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
                let mut flat = Vec::with_capacity(elements);
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

fn encode_values(values: &[&Value], dtype: DType) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(values.len() * dtype.size());
    for (i, v) in values.iter().enumerate() {
        let bad = || format!("data[{i}] = {v} is not a valid {}", dtype_to_kserve(dtype));
        match dtype {
            DType::F32 => {
                out.extend_from_slice(&(v.as_f64().ok_or_else(bad)? as f32).to_ne_bytes())
            }
            DType::F16 => out
                .extend_from_slice(&half::f16::from_f64(v.as_f64().ok_or_else(bad)?).to_ne_bytes()),
            DType::Bool => out.push(v.as_bool().ok_or_else(bad)? as u8),
            DType::I8 => out.extend_from_slice(
                &i8::try_from(v.as_i64().ok_or_else(bad)?)
                    .map_err(|_| bad())?
                    .to_ne_bytes(),
            ),
            DType::U8 => out.push(u8::try_from(v.as_i64().ok_or_else(bad)?).map_err(|_| bad())?),
            DType::I32 => out.extend_from_slice(
                &i32::try_from(v.as_i64().ok_or_else(bad)?)
                    .map_err(|_| bad())?
                    .to_ne_bytes(),
            ),
            DType::I64 => out.extend_from_slice(&v.as_i64().ok_or_else(bad)?.to_ne_bytes()),
        }
    }
    Ok(out)
}

fn json_values(dtype: DType, bytes: &[u8]) -> Vec<Value> {
    fn each<const N: usize>(b: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        b.chunks_exact(N)
            .map(|c| f(c.try_into().expect("exact chunk")))
            .collect()
    }
    match dtype {
        DType::F32 => each(bytes, |c| json!(f32::from_ne_bytes(c))),
        DType::F16 => each(bytes, |c| json!(half::f16::from_ne_bytes(c).to_f32())),
        DType::I8 => each(bytes, |c: [u8; 1]| json!(c[0] as i8)),
        DType::U8 => each(bytes, |c: [u8; 1]| json!(c[0])),
        DType::Bool => each(bytes, |c: [u8; 1]| json!(c[0] != 0)),
        DType::I32 => each(bytes, |c| json!(i32::from_ne_bytes(c))),
        DType::I64 => each(bytes, |c| json!(i64::from_ne_bytes(c))),
    }
}

/// One output of a response.
#[derive(Debug)]
pub struct OutputTensor {
    pub name: String,
    pub dtype: DType,
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
        entry.insert("datatype".into(), json!(dtype_to_kserve(o.dtype)));
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
            (DType::F32, &[2usize, 2][..])
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
        let cases: [(&[u8], Option<usize>, &str); 7] = [
            (b"{", None, "malformed JSON"),
            (b"[]", None, "must be a JSON object"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP64","data":[1,2]}]}"#, None, "unsupported datatype `FP64`"),
            (br#"{"inputs":[{"name":"x","shape":[3],"datatype":"FP32","data":[1,2]}]}"#, None, "needs 3 values, got 2"),
            (br#"{"inputs":[{"name":"x","shape":[1],"datatype":"UINT8","data":[300]}]}"#, None, "not a valid UINT8"),
            (br#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}]}"#, None, "only 0 remain"),
            (b"{}", Some(99), "Inference-Header-Content-Length is 99"),
        ];
        for (body, header, want) in cases {
            let e = parse_request(header, body).unwrap_err().to_string();
            assert!(e.contains(want), "{e} should contain {want}");
        }
    }

    #[test]
    fn responses_put_binary_outputs_after_the_json_header() {
        let outs = [
            OutputTensor {
                name: "a".into(),
                dtype: DType::F32,
                shape: vec![1],
                data: 2.5f32.to_ne_bytes().to_vec(),
                binary: false,
            },
            OutputTensor {
                name: "b".into(),
                dtype: DType::I64,
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
