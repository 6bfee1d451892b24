//! The floor library must really run a model, or its size would measure nothing: the digits
//! model, read as ONNX and as NNEF (written here from the ONNX one), must give onnxruntime's
//! logits.
#![cfg(feature = "onnx")]

use tract_nnef::prelude::*;
use tract_onnx::prelude::InferenceModelExt;

const MODEL: &str = "../../models/digits/1/model.onnx";

fn npy(path: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    (npy.shape().to_vec(), npy.into_vec().unwrap())
}

#[test]
fn the_floor_library_runs_the_digits_model_from_onnx_and_from_nnef() {
    let (xs, x) = npy("../../models/testdata/digits_test_x.npy");
    let (_, reference) = npy("../../models/testdata/digits.ref.npy");
    let shape = [1, 1, 8, 8];
    let per = 64;
    assert_eq!(&xs[1..], &[1, 8, 8]);

    let typed = tract_onnx::onnx()
        .model_for_path(MODEL)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_typed()
        .unwrap()
        .into_decluttered()
        .unwrap();
    let dir = std::env::temp_dir().join(format!("tern-size-floor-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let nnef = dir.join("digits.nnef.tar");
    tract_nnef::nnef()
        .write_to_tar(&typed, std::fs::File::create(&nnef).unwrap())
        .unwrap();

    for path in [MODEL, nnef.to_str().unwrap()] {
        for i in 0..20 {
            let mut out = [0f32; 10];
            let n =
                tern_size_floor::run(path, &shape, &x[i * per..(i + 1) * per], &mut out).unwrap();
            assert_eq!(n, 10);
            for (got, want) in out.iter().zip(&reference[i * 10..(i + 1) * 10]) {
                assert!(
                    (got - want).abs() < 1e-4,
                    "{path} sample {i}: {got} vs {want}"
                );
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
