//! The bad-input catalogue (RELIABILITY.md): the ways a client request or a model file can be
//! wrong, each sent to a real `ternd` over a real socket. Every case checks the status, that the
//! message says what is wrong, and that the daemon still answers a good request afterwards.

mod common;

use std::path::PathBuf;

use common::{digits_request, exchange, repo, Daemon};

/// Body limit and body timeout the catalogue's daemon runs with.
const MAX_BODY: usize = 64 * 1024;
const BODY_TIMEOUT_MS: u64 = 400;

/// A repository with the digits model and four models that cannot load.
fn bad_repository() -> PathBuf {
    let root = std::env::temp_dir().join(format!("tern-catalogue-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let digits = std::fs::read(repo().join("models/digits/1/model.onnx")).unwrap();
    // An operator tract does not know: `Relu` renamed in the serialized graph.
    let mut unsupported = digits.clone();
    let at = unsupported.windows(4).position(|w| w == b"Relu").unwrap();
    unsupported[at..at + 4].copy_from_slice(b"Rulu");
    let absurd = std::fs::read(repo().join("models/testdata/bad/absurd-dims.onnx")).unwrap();
    let models: [(&str, &[u8]); 5] = [
        ("digits", &digits),
        ("unsupported-op", &unsupported),
        ("not-onnx", b"<html>a captive portal's login page</html>"),
        ("truncated", &digits[..digits.len() / 2]),
        // Declares a [1, 3, 100000, 100000] f32 input: 120 GB if anyone allocated it.
        ("absurd-dims", &absurd),
    ];
    for (name, bytes) in models {
        std::fs::create_dir_all(root.join(name).join("1")).unwrap();
        std::fs::write(root.join(name).join("1/model.onnx"), bytes).unwrap();
    }
    root
}

/// A digits input as the binary extension sends it: JSON header, then `bytes` raw.
fn binary_request(binary_data_size: usize, bytes: &[u8]) -> (Vec<(&'static str, String)>, Vec<u8>) {
    let header = format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,1,8,8],"datatype":"FP32","parameters":{{"binary_data_size":{binary_data_size}}}}}]}}"#
    );
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(bytes);
    (
        vec![("Inference-Header-Content-Length", header.len().to_string())],
        body,
    )
}

fn json_input(shape: &str, datatype: &str, data: &str) -> Vec<u8> {
    format!(
        r#"{{"inputs":[{{"name":"input","shape":{shape},"datatype":"{datatype}","data":{data}}}]}}"#
    )
    .into_bytes()
}

fn values(n: usize, v: &str) -> String {
    format!("[{}]", vec![v; n].join(","))
}

struct Case {
    what: &'static str,
    method: &'static str,
    path: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Vec<u8>,
    declared_len: Option<usize>,
    status: u16,
    /// Every one of these must appear in the reply body.
    says: Vec<&'static str>,
}

fn case(
    what: &'static str,
    path: &'static str,
    body: Vec<u8>,
    status: u16,
    says: &[&'static str],
) -> Case {
    Case {
        what,
        method: "POST",
        path,
        headers: vec![],
        body,
        declared_len: None,
        status,
        says: says.to_vec(),
    }
}

const INFER: &str = "/v2/models/digits/infer";

fn catalogue() -> Vec<Case> {
    let pixels = vec![0u8; 256];
    let nan_pixels: Vec<u8> = (0..64).flat_map(|_| f32::NAN.to_ne_bytes()).collect();
    let mut cases = vec![
        case(
            "malformed JSON",
            INFER,
            br#"{"inputs": ["#.to_vec(),
            400,
            &["malformed JSON"],
        ),
        case("empty body", INFER, vec![], 400, &["malformed JSON"]),
        case(
            "JSON that is not an object",
            INFER,
            b"[1,2]".to_vec(),
            400,
            &["must be a JSON object"],
        ),
        case(
            "no inputs",
            INFER,
            br#"{"id":"x"}"#.to_vec(),
            400,
            &["`inputs` must be an array"],
        ),
        case(
            "JSON nested beyond the parser's depth limit",
            INFER,
            format!("{}{}", "[".repeat(5_000), "]".repeat(5_000)).into_bytes(),
            400,
            &["malformed JSON", "recursion limit"],
        ),
        case(
            "an unknown datatype",
            INFER,
            json_input("[1,1,8,8]", "FP64", &values(64, "0")),
            400,
            &["unsupported datatype `FP64`"],
        ),
        case(
            "the wrong datatype for the model",
            INFER,
            json_input("[1,1,8,8]", "INT32", &values(64, "0")),
            400,
            &["input `input`: expected shape [N,1,8,8] f32, got [1,1,8,8] i32"],
        ),
        case(
            "the wrong shape for the model",
            INFER,
            json_input("[1,1,8,7]", "FP32", &values(56, "0")),
            400,
            &[
                "input `input`",
                "expected shape [N,1,8,8] f32, got [1,1,8,7] f32",
            ],
        ),
        case(
            "a batch of zero",
            INFER,
            json_input("[0,1,8,8]", "FP32", "[]"),
            400,
            &["batch size must be at least 1"],
        ),
        case(
            "fewer values than the shape holds",
            INFER,
            json_input("[1,1,8,8]", "FP32", "[1,2,3]"),
            400,
            &["needs 64 values, got 3"],
        ),
        case(
            "a shape claiming 10^18 values",
            INFER,
            json_input("[1000000000,1000000000]", "FP32", "[1]"),
            400,
            &["needs 1000000000000000000 values, got 1"],
        ),
        case(
            "a NaN literal (not JSON)",
            INFER,
            json_input("[1,1,8,8]", "FP32", &values(64, "NaN")),
            400,
            &["malformed JSON"],
        ),
        case(
            "a number beyond FP32's range",
            INFER,
            json_input("[1,1,8,8]", "FP32", &values(64, "1e39")),
            400,
            &["1e+39 is not a valid FP32"],
        ),
        case(
            "a string where a number belongs",
            INFER,
            json_input("[1,1,8,8]", "FP32", &values(64, r#""zero""#)),
            400,
            &["is not a valid FP32"],
        ),
        case(
            "non-finite values, written as JSON strings",
            INFER,
            json_input("[1,1,8,8]", "FP32", &values(64, r#""-Infinity""#)),
            200,
            &[r#""NaN""#],
        ),
        case(
            "an unknown model",
            "/v2/models/nope/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            404,
            &["unknown model `nope`"],
        ),
        case(
            "an unknown version",
            "/v2/models/digits/versions/9/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            404,
            &["has no version 9"],
        ),
        case(
            "a version that is not a number",
            "/v2/models/digits/versions/latest/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            400,
            &["version"],
        ),
        case(
            "path traversal in a model name",
            "/v2/models/..%2F..%2Fetc%2Fpasswd/infer",
            vec![],
            400,
            &["invalid model name `../../etc/passwd`"],
        ),
        case(
            "a dot-dot model name",
            "/v2/models/../infer",
            vec![],
            400,
            &["invalid model name `..`"],
        ),
        case(
            "path traversal in a repository load",
            "/v2/repository/models/..%2Fsecret/load",
            vec![],
            400,
            &["invalid model name `../secret`"],
        ),
        case(
            "a model whose file is not ONNX",
            "/v2/models/not-onnx/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            503,
            &["model `not-onnx` failed to load", "not a valid ONNX model"],
        ),
        case(
            "a truncated model file",
            "/v2/models/truncated/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            503,
            &["model `truncated` failed to load"],
        ),
        case(
            "a model with an unsupported operator",
            "/v2/models/unsupported-op/infer",
            json_input("[1,1,8,8]", "FP32", &values(64, "0")),
            503,
            &["unsupported operator `Rulu`"],
        ),
        case(
            "a model declaring absurd input sizes",
            "/v2/models/absurd-dims/infer",
            json_input("[1]", "FP32", "[0]"),
            503,
            &["model `absurd-dims` failed to load", "1024 MiB"],
        ),
        case(
            "an unknown endpoint",
            "/v2/models/digits/explode",
            vec![],
            404,
            &["no such endpoint"],
        ),
    ];

    let (headers, body) = binary_request(256, &nan_pixels);
    cases.push(Case {
        headers,
        ..case(
            "NaN in binary data (passes; the reply shows NaN)",
            INFER,
            body,
            200,
            &[r#""NaN""#],
        )
    });
    let (headers, body) = binary_request(100, &pixels);
    cases.push(Case {
        headers,
        ..case(
            "binary_data_size that does not match the shape",
            INFER,
            body,
            400,
            &["binary_data_size is 100 bytes but shape [1, 1, 8, 8] FP32 needs 256"],
        )
    });
    let (headers, body) = binary_request(256, &pixels[..200]);
    cases.push(Case {
        headers,
        ..case(
            "binary data cut short",
            INFER,
            body,
            400,
            &["only 200 remain"],
        )
    });
    let (headers, mut body) = binary_request(256, &pixels);
    body.extend_from_slice(b"trailing");
    cases.push(Case {
        headers,
        ..case(
            "bytes no input claims",
            INFER,
            body,
            400,
            &["8 bytes of binary data", "no input claims"],
        )
    });
    let (_, body) = binary_request(256, &pixels);
    cases.push(Case {
        headers: vec![("Inference-Header-Content-Length", "100000".into())],
        ..case(
            "a header length beyond the body",
            INFER,
            body,
            400,
            &["Inference-Header-Content-Length is 100000"],
        )
    });
    cases.push(Case {
        headers: vec![("Inference-Header-Content-Length", "-3".into())],
        ..case(
            "a header length that is not a count",
            INFER,
            vec![],
            400,
            &["must be a byte count"],
        )
    });
    cases.push(Case {
        // Refused on the declared length; nothing of the body is buffered.
        declared_len: Some(MAX_BODY + 1),
        ..case(
            "a body over the limit",
            INFER,
            vec![],
            413,
            &["exceeds the 65536-byte limit"],
        )
    });
    cases.push(Case {
        declared_len: Some(1000),
        ..case(
            "a body that stalls half way",
            INFER,
            br#"{"inputs":[{"name":"input","#.to_vec(),
            408,
            &["did not arrive in full within 400 ms"],
        )
    });
    cases.push(Case {
        method: "GET",
        ..case("the wrong method", INFER, vec![], 405, &[])
    });
    cases
}

#[test]
fn every_bad_input_gets_its_status_and_a_clear_message_and_the_daemon_keeps_serving() {
    let root = bad_repository();
    let d = Daemon::start(&[
        "--repository",
        root.to_str().unwrap(),
        "--max-body-bytes",
        &MAX_BODY.to_string(),
        "--body-timeout-ms",
        &BODY_TIMEOUT_MS.to_string(),
    ]);
    let good = digits_request(0, "k");
    assert_eq!(d.post(INFER, &good).0, 200, "the good request");

    let mut failures = vec![];
    for c in catalogue() {
        let (status, body) = exchange(
            &d.addr,
            c.method,
            c.path,
            &c.headers,
            &c.body,
            c.declared_len,
        );
        let missing: Vec<_> = c.says.iter().filter(|s| !body.contains(*s)).collect();
        if status != c.status || !missing.is_empty() {
            failures.push(format!(
                "{}: got {status} {body:.300}, want {} with {missing:?}",
                c.what, c.status
            ));
        }
        let (after, reply) = d.post(INFER, &good);
        if after != 200 {
            failures.push(format!(
                "after {}: the good request got {after} {reply:.300}",
                c.what
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The models that cannot load are reported, not hidden; the server as a whole is ready.
    assert_eq!(d.get("/v2/health/ready").0, 200);
    let (status, body) = d.get("/v2/models/unsupported-op/ready");
    assert_ne!(status, 200, "{body}");
    assert_eq!(d.get("/v2/models/digits/ready").0, 200);
    let _ = std::fs::remove_dir_all(root);
}
