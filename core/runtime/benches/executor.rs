//! Executor benchmarks, one thread:
//! - Tern's session over raw tract on the same model and input (the layer's overhead);
//! - FP32 vs INT8 (QDQ fused by Tern, QDQ as tract runs it alone, QOperator) at batch 1 and 8.
//!
//! Run: `cargo bench -p tern-core --bench executor`

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tern_core::{Model, ModelOptions, TensorView};

fn model_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models")
        .join(name)
        .join("1/model.onnx")
}

fn input(batch: usize) -> Vec<f32> {
    (0..batch * 64)
        .map(|i| ((i * 7919) % 17) as f32 / 16.0)
        .collect()
}

fn overhead(c: &mut Criterion) {
    use tract_onnx::prelude::*;
    let mut g = c.benchmark_group("overhead");
    for name in ["digits", "resblock"] {
        let x = input(1);
        let shape = [1usize, 1, 8, 8];
        let plan = tract_onnx::onnx()
            .model_for_path(model_path(name))
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let mut state = TypedSimpleState::new(&plan).unwrap();
        let t: TValue = tract_onnx::prelude::Tensor::from_shape(&shape, &x)
            .unwrap()
            .into_tvalue();
        g.bench_function(BenchmarkId::new("raw-tract", name), |b| {
            b.iter(|| state.run(tvec![t.clone()]).unwrap())
        });
        let model = Model::load(model_path(name), &ModelOptions::default()).unwrap();
        let mut session = model.session().unwrap();
        g.bench_function(BenchmarkId::new("tern", name), |b| {
            b.iter(|| {
                session.run(&[TensorView::new(&shape, &x)]).unwrap();
            })
        });
    }
    g.finish();
}

fn precision(c: &mut Criterion) {
    let mut g = c.benchmark_group("precision");
    for family in ["digits", "resblock"] {
        let variants = [
            ("fp32", family.to_string(), true),
            ("int8-qdq", format!("{family}-int8-qdq"), true),
            ("int8-qdq-unfused", format!("{family}-int8-qdq"), false),
            ("int8-qop", format!("{family}-int8-qop"), true),
        ];
        for (label, file, fusion) in variants {
            let options = ModelOptions {
                int8_fusion: fusion,
                ..Default::default()
            };
            let model = Model::load(model_path(&file), &options).unwrap();
            let mut session = model.session().unwrap();
            for batch in [1usize, 8] {
                let x = input(batch);
                let shape = [batch, 1, 8, 8];
                g.bench_function(BenchmarkId::new(format!("{family}/{label}"), batch), |b| {
                    b.iter(|| {
                        session.run(&[TensorView::new(&shape, &x)]).unwrap();
                    })
                });
            }
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(50);
    targets = overhead, precision
}
criterion_main!(benches);
