//! Tern's fused int8 convolutions and its f32 depthwise kernel against onnxruntime (data from
//! `models/generate_int8_conv.py`): a grid of single `QLinearConv` models, and a
//! MobileNetV3-style network quantized both ways. Run on x86_64 natively and on aarch64 under
//! qemu, so each architecture's kernels are checked.

use std::path::{Path, PathBuf};

use tern_core::{npy, DType, ExecPrecision, Model, ModelOptions, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(model: &Model, input: &Tensor) -> Tensor {
    let mut session = model.session().unwrap();
    let outputs = session.run(&[input.view()]).unwrap();
    outputs.get(0).unwrap().to_tensor()
}

/// Output values as integers, whatever the 8-bit type.
fn ints(t: &Tensor) -> Vec<i32> {
    match t.dtype() {
        DType::U8 => t.bytes().iter().map(|b| *b as i32).collect(),
        DType::I8 => t.bytes().iter().map(|b| *b as i8 as i32).collect(),
        other => panic!("expected an 8-bit output, got {other:?}"),
    }
}

fn grid() -> Vec<PathBuf> {
    let dir = repo().join("models/testdata/qconv");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "onnx"))
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 20,
        "the grid is missing from {}",
        dir.display()
    );
    cases
}

fn companion(model: &Path, suffix: &str) -> Tensor {
    let stem = model.file_stem().unwrap().to_str().unwrap();
    npy::read_file(model.with_file_name(format!("{stem}.{suffix}.npy"))).unwrap()
}

#[test]
fn every_grid_case_runs_on_tern_kernels_within_one_lsb_of_onnxruntime() {
    let mut failures = vec![];
    let (mut exact, mut total) = (0usize, 0usize);
    for path in grid() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let model = Model::load(&path, &ModelOptions::default()).unwrap();
        let heavy = &model.inspection().heavy;
        let on_tern = heavy.len() == 1
            && heavy[0].precision == ExecPrecision::Int8
            && heavy[0]
                .note
                .as_deref()
                .is_some_and(|n| n.contains("Tern int8"));
        if !on_tern {
            failures.push(format!("{name}: not on a Tern kernel: {heavy:?}"));
            continue;
        }
        let x = companion(&path, "x");
        let expected = companion(&path, "y");
        let got = run(&model, &x);
        assert_eq!(got.shape(), expected.shape(), "{name}");
        assert_eq!(got.dtype(), expected.dtype(), "{name}");
        let (g, e) = (ints(&got), ints(&expected));
        let worst = g.iter().zip(&e).map(|(a, b)| (a - b).abs()).max().unwrap();
        exact += g.iter().zip(&e).filter(|(a, b)| a == b).count();
        total += g.len();
        if worst > 1 {
            failures.push(format!("{name}: off by {worst}"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // Same rounding rule as onnxruntime: nearly every value is identical, not just close.
    let share = exact as f64 / total as f64;
    assert!(share > 0.999, "only {share:.5} of {total} values identical");
}

#[test]
fn the_same_grid_through_tracts_own_lowering_agrees_with_tern() {
    // tract's path is the fallback for anything the kernels do not cover, so it must agree too.
    let tract = ModelOptions {
        int8_kernels: false,
        ..ModelOptions::default()
    };
    for path in grid() {
        let name = path.file_stem().unwrap().to_string_lossy().to_string();
        let x = companion(&path, "x");
        let ours = ints(&run(
            &Model::load(&path, &ModelOptions::default()).unwrap(),
            &x,
        ));
        let model = Model::load(&path, &tract).unwrap();
        assert!(
            model.inspection().heavy.iter().all(|h| !h
                .note
                .as_deref()
                .unwrap_or("")
                .contains("Tern int8")),
            "{name}: int8_kernels off still used them"
        );
        let theirs = ints(&run(&model, &x));
        let worst = ours
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .max()
            .unwrap();
        assert!(worst <= 1, "{name}: tract and Tern differ by {worst}");
    }
}

fn mobilenet(file: &str) -> PathBuf {
    repo().join("models/testdata/mobilenet").join(file)
}

fn floats(t: &Tensor) -> Vec<f32> {
    t.view().to_vec::<f32>().unwrap()
}

fn top1(v: &[f32], classes: usize) -> Vec<usize> {
    v.chunks(classes)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold(
                    (0, f32::MIN),
                    |best, (i, x)| if *x > best.1 { (i, *x) } else { best },
                )
                .0
        })
        .collect()
}

#[test]
fn quantized_mobilenet_runs_every_convolution_on_tern_kernels_and_matches_onnxruntime() {
    let input = npy::read_file(mobilenet("input.npy")).unwrap();
    // Tables: h-swish and h-sigmoid on one input; the residual `Add`s and the
    // squeeze-and-excitation `Mul`s on two. A one-input table that is the only reader of a
    // convolution's output runs inside that convolution.
    for (file, convs, tables) in [
        (
            "int8-qdq",
            54,
            "(28 of one input, 16 of two); 27 applied by the convolution that writes their input",
        ),
        (
            "int8-qop",
            52,
            "(22 of one input, 12 of two); 22 applied by the convolution that writes their input",
        ),
    ] {
        let model =
            Model::load(mobilenet(&format!("{file}.onnx")), &ModelOptions::default()).unwrap();
        let inspection = model.inspection();
        assert!(
            inspection.rewrites.iter().any(|r| r.ends_with(tables)),
            "{file}: {:?}",
            inspection.rewrites
        );
        let tern = inspection
            .heavy
            .iter()
            .filter(|h| h.note.as_deref().unwrap_or("").contains("Tern int8"))
            .count();
        assert_eq!(tern, convs, "{file}: {:#?}", inspection.heavy);
        let got = floats(&run(&model, &input));
        let expected = floats(&npy::read_file(mobilenet(&format!("{file}.out.npy"))).unwrap());
        let classes = 100;
        assert_eq!(got.len(), expected.len());
        // Integer layers are exact; the float islands between them (h-swish, pooling, the
        // float Gemm) may round differently in the last bit.
        let worst = max_diff(&got, &expected);
        eprintln!("{file}: max |diff| from onnxruntime {worst}");
        assert!(worst < 1e-4, "{file}: max |diff| {worst}");
        assert_eq!(top1(&got, classes), top1(&expected, classes), "{file}");
    }
}

/// The MobileNets are large enough to be prepared in parts (`prepare/parts.rs`): in both plan
/// kinds, and for a batch that concrete plans pad (3 of the 4 reference rows run as 4), every
/// row still gets onnxruntime's answer.
#[test]
fn mobilenets_prepared_in_parts_match_onnxruntime_in_both_plan_kinds() {
    use tern_core::{PlanMode, TensorView};
    let input = npy::read_file(mobilenet("input.npy")).unwrap();
    let x = floats(&input);
    let row = 3 * 48 * 192;
    assert_eq!(x.len(), 4 * row);
    for file in ["fp32", "int8-qdq", "int8-qop"] {
        let expected = floats(&npy::read_file(mobilenet(&format!("{file}.out.npy"))).unwrap());
        let classes = expected.len() / 4;
        // One preparing thread takes the parts in turn: the same plans.
        for (plans, prepare_threads) in [
            (PlanMode::Symbolic, None),
            (PlanMode::Concrete, None),
            (PlanMode::Concrete, Some(1)),
        ] {
            let options = ModelOptions {
                plans,
                prepare_threads,
                ..ModelOptions::default()
            };
            let model = Model::load(mobilenet(&format!("{file}.onnx")), &options).unwrap();
            let rewrites = &model.inspection().rewrites;
            assert!(
                rewrites.iter().any(|r| r.starts_with("prepared in ")),
                "{file} {plans:?}: {rewrites:?}"
            );
            let mut session = model.session().unwrap();
            for rows in [4, 3, 1] {
                let out = session
                    .run(&[TensorView::new(&[rows, 3, 48, 192], &x[..rows * row])])
                    .unwrap();
                let got = out.get(0).unwrap().to_vec::<f32>().unwrap();
                assert_eq!(got.len(), rows * classes, "{file} {plans:?}");
                let worst = max_diff(&got, &expected);
                assert!(
                    worst < 1e-4,
                    "{file} {plans:?} {rows} rows: max |diff| {worst}"
                );
            }
        }
    }
}

/// The float MobileNet's 11 depthwise convolutions (group = channels) run on Tern's f32 kernel
/// in both plan kinds, and without it on tract's; so do its 22 pointwise convolutions over 8
/// pixels or more, and its stem, where the pointwise kernel has a vector path (x86-64 with
/// AVX2), and its squeeze-and-excitation blocks everywhere. Every way
/// gives onnxruntime's answers. With tract's axis rewrites (the default) tract may move
/// channels last, where the depthwise kernel does not apply: it does on aarch64 for 8 of them,
/// not on x86_64.
#[test]
fn float_mobilenet_runs_its_depthwise_convolutions_on_terns_kernel() {
    use tern_core::{PlanMode, TensorView};
    let input = npy::read_file(mobilenet("input.npy")).unwrap();
    let x = floats(&input);
    let expected = floats(&npy::read_file(mobilenet("fp32.out.npy")).unwrap());
    let with_axis_rewrites = cfg!(target_arch = "x86_64").then_some(11);
    #[cfg(target_arch = "x86_64")]
    let pointwise = if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        22
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let pointwise = 0;
    for (plans, axis_rewrites, float_kernels, on_kernel) in [
        (PlanMode::Concrete, false, true, Some(11)),
        (PlanMode::Symbolic, false, true, Some(11)),
        (PlanMode::Concrete, true, true, with_axis_rewrites),
        (PlanMode::Concrete, false, false, Some(0)),
    ] {
        let options = ModelOptions {
            plans,
            axis_rewrites,
            float_kernels,
            ..ModelOptions::default()
        };
        let case = format!("{plans:?}, axis rewrites {axis_rewrites}, kernels {float_kernels}");
        let model = Model::load(mobilenet("fp32.onnx"), &options).unwrap();
        let notes_on = |kernel: &str| -> Vec<String> {
            model
                .inspection()
                .heavy
                .iter()
                .filter_map(|h| h.note.clone())
                .filter(|n| n.starts_with(&format!("on the Tern f32 {kernel} kernel")))
                .collect()
        };
        let notes = notes_on("depthwise");
        if let Some(n) = on_kernel {
            assert_eq!(notes.len(), n, "{case}");
        }
        let want = if float_kernels { pointwise } else { 0 };
        assert_eq!(notes_on("pointwise").len(), want, "{case}");
        // Its 9 squeeze-and-excitation blocks, two 1×1 convolutions each, as one op each, on
        // every CPU; with tract's axis rewrites on aarch64, where tract moves channels last for
        // most of them, at least some.
        let blocks = notes_on("squeeze-and-excitation").len();
        match (
            float_kernels,
            axis_rewrites && cfg!(not(target_arch = "x86_64")),
        ) {
            (false, _) => assert_eq!(blocks, 0, "{case}"),
            (true, false) => assert_eq!(blocks, 18, "{case}"),
            (true, true) => assert!(blocks > 0 && blocks <= 18, "{case}: {blocks}"),
        }
        // The stem (3 channels, 3×3, stride 2), unrolled onto the same kernel.
        let want = if float_kernels { pointwise.min(1) } else { 0 };
        assert_eq!(notes_on("unrolled-window").len(), want, "{case}");
        // Each of this network's depthwise convolutions feeds a ReLU or an h-swish, which the
        // kernel applies as it stores.
        for note in &notes {
            assert!(
                note.ends_with(", then h-swish") || note.ends_with(", then clamped to [0, inf]"),
                "{case}: {note}"
            );
        }
        let mut session = model.session().unwrap();
        let out = session
            .run(&[TensorView::new(&[4, 3, 48, 192], &x)])
            .unwrap();
        let got = out.get(0).unwrap().to_vec::<f32>().unwrap();
        assert_eq!(got.len(), expected.len());
        let worst = max_diff(&got, &expected);
        assert!(worst < 1e-4, "{case}: max |diff| {worst}");
    }
}

/// Largest |a - b| over the pairs of two outputs.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}
