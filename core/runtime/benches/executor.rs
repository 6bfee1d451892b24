//! Executor benchmarks, one thread:
//! - Tern's session over raw tract on the same model and input (the layer's overhead);
//! - FP32 vs INT8 (QDQ fused by Tern, QDQ as tract runs it alone, QOperator) at batch 1 and 8;
//! - `int8`: Tern's fused int8 convolution kernels against tract's own quantized lowering and
//!   against FP32, per layer (`models/testdata/ops`) and on a MobileNetV3-style network
//!   (`models/testdata/mobilenet`), at batch 1 and 8.
//!
//! Run: `cargo bench -p tern-core --bench executor` (or `... -- int8` for the last group).

use std::path::PathBuf;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use tern_core::{DType, Dim, Model, ModelOptions, PlanMode, Tensor, TensorView};

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

/// Raw tract's plan of the whole graph, run as a Tern session would be.
fn raw_tract(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    path: &std::path::Path,
    shape: &[usize],
    x: &[f32],
) {
    use tract_onnx::prelude::*;
    let plan = tract_onnx::onnx()
        .model_for_path(path)
        .and_then(|m| m.into_optimized())
        .and_then(|m| m.into_runnable())
        .unwrap();
    let mut state = TypedSimpleState::new(&plan).unwrap();
    let t: TValue = tract_onnx::prelude::Tensor::from_shape(shape, x)
        .unwrap()
        .into_tvalue();
    g.bench_function(BenchmarkId::new("raw-tract", name), |b| {
        b.iter(|| state.run(tvec![t.clone()]).unwrap())
    });
}

fn overhead(c: &mut Criterion) {
    let mut g = c.benchmark_group("overhead");
    for name in ["digits", "resblock"] {
        let x = input(1);
        let shape = [1usize, 1, 8, 8];
        raw_tract(&mut g, name, &model_path(name), &shape, &x);
        // The layer alone: Tern's float kernels would replace the convolutions tract runs
        // here, and this group prices what Tern adds around the same graph.
        let same_graph = ModelOptions {
            float_kernels: false,
            ..Default::default()
        };
        let model = Model::load(model_path(name), &same_graph).unwrap();
        let mut session = model.session().unwrap();
        g.bench_function(BenchmarkId::new("tern", name), |b| {
            b.iter(|| {
                session.run(&[TensorView::new(&shape, &x)]).unwrap();
            })
        });
    }
    // Large enough for Tern to prepare in parts (`prepare/parts.rs`); raw tract runs it whole,
    // so this also prices the hand-over between parts.
    let path = testdata("mobilenet/fp32.onnx");
    let shape = [1usize, 3, 48, 192];
    let x: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| ((i * 7919) % 17) as f32 / 16.0 - 0.5)
        .collect();
    raw_tract(&mut g, "mobilenet", &path, &shape, &x);
    for (label, plans) in [
        ("tern", PlanMode::Symbolic),
        ("tern-concrete", PlanMode::Concrete),
    ] {
        let options = ModelOptions {
            plans,
            ..Default::default()
        };
        let model = Model::load(&path, &options).unwrap();
        let mut session = model.session().unwrap();
        g.bench_function(BenchmarkId::new(label, "mobilenet"), |b| {
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

fn testdata(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/testdata")
        .join(path)
}

/// A deterministic input of the model's own type and shape, `batch` rows.
fn input_for(model: &Model, batch: usize) -> Tensor {
    let info = &model.info().inputs[0];
    let mut shape = vec![batch];
    shape.extend(info.shape[1..].iter().map(|d| match d {
        Dim::Fixed(n) => *n,
        other => panic!("unexpected dimension {other:?}"),
    }));
    let len: usize = shape.iter().product();
    match info.dtype {
        DType::F32 => Tensor::from_vec(
            shape,
            (0..len)
                .map(|i| ((i * 7919) % 61) as f32 / 20.0 - 1.5)
                .collect(),
        ),
        DType::U8 => Tensor::from_vec(shape, (0..len).map(|i| (i * 7919 % 251) as u8).collect()),
        other => panic!("unexpected input type {other:?}"),
    }
    .unwrap()
}

fn int8(c: &mut Criterion) {
    let mut g = c.benchmark_group("int8");
    // Concrete plans for every variant: with a symbolic batch, tract 0.23 picks much slower
    // float convolution paths, which would flatter int8.
    let tern = ModelOptions {
        plans: PlanMode::Concrete,
        ..Default::default()
    };
    let tract = ModelOptions {
        int8_kernels: false,
        ..tern.clone()
    };
    let mut cases = vec![];
    for op in ["stem", "pointwise", "depthwise5", "depthwise3-s2"] {
        cases.push((
            format!("op-{op}/fp32"),
            format!("ops/{op}.fp32.onnx"),
            &tern,
        ));
        cases.push((
            format!("op-{op}/int8-tern"),
            format!("ops/{op}.int8.onnx"),
            &tern,
        ));
        cases.push((
            format!("op-{op}/int8-tract"),
            format!("ops/{op}.int8.onnx"),
            &tract,
        ));
    }
    for (label, file, options) in [
        ("fp32", "fp32", &tern),
        ("int8-qdq-tern", "int8-qdq", &tern),
        ("int8-qdq-tract", "int8-qdq", &tract),
        ("int8-qop-tern", "int8-qop", &tern),
        ("int8-qop-tract", "int8-qop", &tract),
    ] {
        cases.push((
            format!("mobilenet/{label}"),
            format!("mobilenet/{file}.onnx"),
            options,
        ));
    }
    for (label, file, options) in cases {
        let model = Model::load(testdata(&file), options).unwrap();
        let mut session = model.session().unwrap();
        for batch in [1usize, 8] {
            let x = input_for(&model, batch);
            g.bench_function(BenchmarkId::new(&label, batch), |b| {
                b.iter(|| {
                    session.run(&[x.view()]).unwrap();
                })
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2)).sample_size(50);
    targets = overhead, precision, int8
}
criterion_main!(benches);
