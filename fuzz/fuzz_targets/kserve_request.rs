//! Any bytes as a KServe v2 infer body (HTTP, or MQTT inference requests), JSON or the binary
//! extension. The first two bytes give the `Inference-Header-Content-Length` header (0xFFFF:
//! none). Parsing never panics; what parses is self-consistent, and its tensors, echoed as a
//! response, give JSON that parses back with the same values.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tern_kserve::{encode_response, parse_request, Datatype, OutputTensor};

fuzz_target!(|data: &[u8]| {
    let Some((len, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let header_len = u16::from_le_bytes(*len);
    let header_len = (header_len != u16::MAX).then_some(usize::from(header_len));
    let Ok(request) = parse_request(header_len, body) else {
        return;
    };
    let mut outputs = vec![];
    for (n, input) in request.inputs.iter().enumerate() {
        let elements: usize = input.shape.iter().product();
        assert_eq!(
            input.data.len(),
            elements * input.dtype.size(),
            "{}",
            input.name
        );
        outputs.push(OutputTensor {
            name: input.name.clone(),
            dtype: input.dtype,
            shape: input.shape.clone(),
            data: input.data.clone(),
            binary: n % 2 == 1,
        });
    }
    let (json_len, reply) = encode_response("m", 1, request.id.as_deref(), &outputs);
    let json = &reply[..json_len.unwrap_or(reply.len())];
    let doc: serde_json::Value = serde_json::from_slice(json).expect("a response is JSON");
    let echoed = doc["outputs"].as_array().expect("outputs");
    assert_eq!(echoed.len(), outputs.len());
    for (o, e) in outputs.iter().zip(echoed) {
        if o.binary || o.dtype != Datatype::Fp32 {
            continue;
        }
        let values = e["data"].as_array().expect("JSON data");
        for (v, want) in values.iter().zip(o.data.chunks_exact(4)) {
            let want = f32::from_ne_bytes(want.try_into().expect("4 bytes"));
            let got = match v {
                Value::String(s) => s.parse::<f32>().expect("a non-finite float's name"),
                v => v.as_f64().expect("a number") as f32,
            };
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{want} came back as {v}"
            );
        }
    }
});
