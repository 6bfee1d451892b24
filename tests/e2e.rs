//! End to end: the binaries the workspace builds, driven as a user drives them, on the bundled
//! model repository.
//!
//! The binaries come from the workspace's target directory; `cargo test --workspace` builds them
//! (the daemon crate's own integration tests need them).

use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn binary(name: &str) -> PathBuf {
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

/// Every model of the repository, run by `tern run` on the held-out digits, agrees with the
/// onnxruntime outputs stored beside it.
#[test]
fn the_bundled_repository_runs_through_the_cli() {
    let out_root = std::env::temp_dir().join(format!("tern-e2e-{}", std::process::id()));
    let labels =
        tern_core::npy::read_file(repo().join("models/testdata/digits_test_y.npy")).unwrap();
    let labels = labels.view().to_vec::<i64>().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(repo().join("models")).unwrap() {
        let dir = entry.unwrap().path();
        let model = dir.join("1/model.onnx");
        if !model.exists() {
            continue;
        }
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        let out_dir = out_root.join(&name);
        let status = Command::new(binary("tern"))
            .args(["run", model.to_str().unwrap(), "--input"])
            .arg(format!(
                "input={}",
                repo().join("models/testdata/digits_test_x.npy").display()
            ))
            .arg("--output-dir")
            .arg(&out_dir)
            .output()
            .unwrap();
        assert!(
            status.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let got = tern_core::npy::read_file(out_dir.join("logits.npy"))
            .unwrap()
            .view()
            .to_vec::<f32>()
            .unwrap();
        let reference =
            tern_core::npy::read_file(repo().join(format!("models/testdata/{name}.ref.npy")))
                .unwrap()
                .view()
                .to_vec::<f32>()
                .unwrap();
        let argmax = |v: &[f32]| {
            v.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .unwrap()
                .0
        };
        let rows = labels.len();
        let agree = (0..rows)
            .filter(|&i| argmax(&got[i * 10..][..10]) == argmax(&reference[i * 10..][..10]))
            .count();
        let correct = (0..rows)
            .filter(|&i| argmax(&got[i * 10..][..10]) as i64 == labels[i])
            .count();
        assert!(
            agree * 100 >= rows * 99,
            "{name}: top-1 agreement {agree}/{rows}"
        );
        assert!(
            correct * 100 >= rows * 95,
            "{name}: accuracy {correct}/{rows}"
        );
        seen += 1;
    }
    assert!(seen >= 6, "expected the six bundled models, found {seen}");
    std::fs::remove_dir_all(out_root).ok();
}
