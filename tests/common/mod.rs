//! Shared by the end-to-end test binaries: the built binaries, a running `ternd`, a Python with
//! stock clients.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn binary(name: &str) -> PathBuf {
    // target/<profile>/deps/e2e-<hash> → target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let path = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(
        path.exists(),
        "{} is not built; run `cargo test --workspace` (or `cargo build --bins`) first",
        path.display()
    );
    path
}

pub fn json_u64(doc: &str, name: &str) -> u64 {
    let key = format!("\"{name}\": ");
    let at = doc
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {doc}"))
        + key.len();
    doc[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// A Python with `tests/python/requirements.txt` (stock `tritonclient[http]`, numpy, pytest…):
/// `$TERN_TEST_PYTHON` if set, else a virtual environment made once under the target directory.
pub fn python() -> PathBuf {
    // Tests run in parallel; one of them builds the environment.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(p) = std::env::var_os("TERN_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let venv = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("tern-e2e-venv");
    let py = venv.join("bin/python");
    let ready = py.exists()
        && Command::new(&py)
            .args([
                "-c",
                "import tritonclient.http, numpy, prometheus_client, paho.mqtt.client, onnx, pytest",
            ])
            .status()
            .is_ok_and(|s| s.success());
    if !ready {
        let ok = Command::new("python3")
            .arg("-m")
            .arg("venv")
            .arg(&venv)
            .status()
            .unwrap()
            .success();
        assert!(ok, "python3 -m venv failed");
        let requirements = repo().join("tests/python/requirements.txt");
        let ok = Command::new(&py)
            .args(["-m", "pip", "install", "-q", "-r"])
            .arg(&requirements)
            .status()
            .unwrap()
            .success();
        assert!(ok, "pip install -r {} failed", requirements.display());
    }
    py
}

/// An ONNX model of about `mib` MiB (`tests/python/make_large_model.py`): x [N, 256] → y.
pub fn generate_model(dir: &Path, mib: u32, seed: &str) -> String {
    let out = dir.join(format!("large-{mib}-{seed}.onnx"));
    let ok = Command::new(python())
        .arg(repo().join("tests/python/make_large_model.py"))
        .args([&mib.to_string(), out.to_str().unwrap(), seed])
        .status()
        .unwrap()
        .success();
    assert!(ok, "generating a {mib} MiB model");
    out.display().to_string()
}

/// A running `ternd` on a port of its choosing, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: std::process::Child,
    pub addr: String,
}

impl Daemon {
    pub fn start(args: &[&str]) -> Daemon {
        use std::io::BufRead;
        let mut child = Command::new(binary("ternd"))
            .args(["--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(if std::env::var_os("TERN_TEST_LOGS").is_some() {
                std::process::Stdio::inherit()
            } else {
                std::process::Stdio::null()
            })
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("ternd listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        let d = Daemon { child, addr };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while d.get("/v2/health/ready").0 != 200 {
            assert!(
                std::time::Instant::now() < deadline,
                "ternd never became ready"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        d
    }

    /// A handle on a daemon another test object owns, for client threads.
    pub fn attach(addr: &str) -> Probe {
        Probe {
            addr: addr.to_string(),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.request("GET", path, "")
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.request("POST", path, body)
    }

    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        Daemon::attach(&self.addr).request(method, path, body)
    }
    pub fn stop(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

/// A KServe v2 JSON request for held-out digit `row`.
pub fn digits_request(row: usize, key: &str) -> String {
    let x = tern_core::npy::read_file(repo().join("models/testdata/digits_test_x.npy")).unwrap();
    let x = x.view().to_vec::<f32>().unwrap();
    let pixels: Vec<String> = x[(row % 450) * 64..][..64]
        .iter()
        .map(|v| v.to_string())
        .collect();
    format!(
        r#"{{"inputs":[{{"name":"input","shape":[1,1,8,8],"datatype":"FP32","data":[{}]}}],"parameters":{{"route_key":"{key}"}}}}"#,
        pixels.join(",")
    )
}

/// The `model_version` of a KServe v2 reply.
pub fn served_version(reply: &str) -> String {
    let at = reply
        .find(r#""model_version":""#)
        .unwrap_or_else(|| panic!("no version in {reply}"))
        + 17;
    reply[at..].split('"').next().unwrap().to_string()
}

/// One raw HTTP/1.1 exchange. `declared_len` overrides Content-Length (a body that never comes
/// in full); the reply is read until the server closes or 10 s pass.
pub fn exchange(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &[u8],
    declared_len: Option<usize>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: {}\r\nConnection: close\r\n",
        declared_len.unwrap_or(body.len())
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server that refuses early may close before the rest is sent; its reply still counts.
    let _ = s.write_all(body);
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = reply
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// An HTTP client of a running daemon.
pub struct Probe {
    addr: String,
}

impl Probe {
    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.request("POST", path, body)
    }

    /// A bare HTTP/1.1 request: status and body.
    pub fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.addr) else {
            return (0, String::new());
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut reply = String::new();
        s.read_to_string(&mut reply).unwrap();
        let status = reply
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            status,
            reply
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }
}
