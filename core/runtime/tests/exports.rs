//! tern-core on the real-export corpus (`models/exports`, made by `models/generate_exports.py`):
//! patterns from PyTorch and PaddlePaddle exports that tract cannot prepare with symbolic
//! shapes. Every case is compared with onnxruntime's stored outputs.

use std::collections::BTreeMap;
use std::path::PathBuf;

use tern_core::{
    npy, Dim, Error, Model, ModelOptions, PinnedInput, PlanKind, PlanMode, Tensor, TensorView,
};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn export(name: &str) -> PathBuf {
    repo().join("models/exports").join(format!("{name}.onnx"))
}

fn data(file: &str) -> Tensor {
    npy::read_file(repo().join("models/testdata/exports").join(file)).unwrap()
}

/// (model, case) for every `<model>.<case>.input.npy` in the corpus.
fn cases() -> Vec<(String, String)> {
    let mut cases = vec![];
    for e in std::fs::read_dir(repo().join("models/testdata/exports")).unwrap() {
        let name = e.unwrap().file_name().into_string().unwrap();
        if let Some(stem) = name.strip_suffix(".input.npy") {
            let (model, case) = stem.rsplit_once('.').unwrap();
            cases.push((model.to_string(), case.to_string()));
        }
    }
    cases.sort();
    cases
}

fn run(model: &Model, input: &Tensor) -> Tensor {
    let mut session = model.session().unwrap();
    let outputs = session.run(&[input.view()]).unwrap();
    outputs.get(0).unwrap().to_tensor()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.shape(), b.shape());
    let a = a.view().to_vec::<f32>().unwrap();
    let b = b.view().to_vec::<f32>().unwrap();
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Share of positions where the largest value along axis 1 (classes, channels) is the same.
fn top1_agreement(a: &Tensor, b: &Tensor) -> f64 {
    let (n, c) = (a.shape()[0], a.shape()[1]);
    let inner: usize = a.shape()[2..].iter().product();
    let a = a.view().to_vec::<f32>().unwrap();
    let b = b.view().to_vec::<f32>().unwrap();
    let argmax = |v: &[f32], base: usize| {
        (0..c)
            .max_by(|&i, &j| v[base + i * inner].total_cmp(&v[base + j * inner]))
            .unwrap()
    };
    let mut same = 0;
    for row in 0..n {
        for k in 0..inner {
            let base = row * c * inner + k;
            same += usize::from(argmax(&a, base) == argmax(&b, base));
        }
    }
    same as f64 / (n * inner) as f64
}

fn plans(mode: PlanMode) -> ModelOptions {
    ModelOptions {
        plans: mode,
        ..Default::default()
    }
}

/// Max abs difference to onnxruntime: f32 models differ by summation order only.
const TOLERANCE: f32 = 1e-4;

/// Every case of the corpus against onnxruntime's outputs; the models and each one's worst
/// difference.
fn check_every_case(options: &ModelOptions) -> (BTreeMap<String, Model>, BTreeMap<String, f32>) {
    let cases = cases();
    assert!(cases.len() >= 14, "corpus missing: {cases:?}");
    let mut models: BTreeMap<String, Model> = BTreeMap::new();
    let mut worst: BTreeMap<String, f32> = BTreeMap::new();
    for (name, case) in &cases {
        let model = models.entry(name.clone()).or_insert_with(|| {
            Model::load(export(name), options).unwrap_or_else(|e| panic!("{name}: {e}"))
        });
        let input = data(&format!("{name}.{case}.input.npy"));
        let expected = data(&format!("{name}.{case}.output.npy"));
        let got = run(model, &input);
        let diff = max_abs_diff(&got, &expected);
        assert!(diff <= TOLERANCE, "{name}.{case}: max abs diff {diff}");
        let agreement = top1_agreement(&got, &expected);
        assert!(
            agreement >= 0.99,
            "{name}.{case}: top-1 agreement {agreement}"
        );
        let w = worst.entry(name.clone()).or_default();
        *w = w.max(diff);
    }
    (models, worst)
}

#[test]
fn every_export_matches_onnxruntime_with_default_options() {
    let (models, worst) = check_every_case(&ModelOptions::default());
    eprintln!("max abs diff vs onnxruntime: {worst:?}");
    // What each pattern needs. A shape computed through int32 defeats tract's symbols, and so
    // does the Resize to a run-time size (tract types it once the declared `Ho` is ignored, but
    // its symbolic plan cannot evaluate it): concrete plans. The scaled FPN only needed its
    // declared output shape ignored; the folded Ifs keep their symbols too.
    let kind = |n: &str| models[n].inspection().plan.kind;
    for n in ["reshape-head", "fpn-upsample"] {
        assert_eq!(kind(n), PlanKind::Concrete, "{n}");
    }
    for n in ["const-if", "const-if-init", "fpn-scales", "pointwise"] {
        assert_eq!(kind(n), PlanKind::Symbolic, "{n}");
    }
    // Two of its six 1×1 convolutions are plain matrix products; the strided, grouped and
    // kernel-sharing ones stay convolutions.
    let rewrites = &models["pointwise"].inspection().rewrites;
    assert!(
        rewrites
            .iter()
            .any(|r| r.starts_with("2 1×1 convolutions written as matrix products")),
        "{rewrites:?}"
    );
    let rewrites = &models["fpn-scales"].inspection().rewrites;
    assert!(
        rewrites
            .iter()
            .any(|r| r.contains("declared output shapes")),
        "{rewrites:?}"
    );
    for m in models.values() {
        assert!(!m.inspection().plan.why.is_empty());
    }
    for n in ["const-if", "const-if-init"] {
        let rewrites = &models[n].inspection().rewrites;
        assert!(
            rewrites
                .iter()
                .any(|r| r.contains("If") && r.contains("then")),
            "{n}: {rewrites:?}"
        );
    }
}

#[test]
fn concrete_plans_pad_the_batch_and_cut_the_padding_off() {
    let model = Model::load(export("reshape-head"), &ModelOptions::default()).unwrap();
    let info = model.info();
    assert!(matches!(info.inputs[0].shape[0], Dim::Batch(_)));
    assert!(matches!(info.outputs[0].shape[0], Dim::Batch(_)));
    assert_eq!(model.inspection().plan.batch_sizes, [1, 2, 4, 8]);
    // Batch 3 runs as 4; the caller sees 3 rows, equal to onnxruntime's.
    let input = data("reshape-head.b3.input.npy");
    let expected = data("reshape-head.b3.output.npy");
    let mut session = model.session().unwrap();
    let outputs = session.run(&[input.view()]).unwrap();
    let y = outputs.get(0).unwrap();
    assert_eq!(y.shape(), [3, 10]);
    assert!(max_abs_diff(&y.to_tensor(), &expected) <= TOLERANCE);
    // Row by row gives the same rows: padding rows never leak into real ones.
    let per_row = input.bytes().len() / 3;
    for r in 0..3 {
        let shape = [1, 3, 16, 16];
        let row = TensorView::from_bytes(
            input.dtype(),
            &shape,
            &input.bytes()[r * per_row..(r + 1) * per_row],
        );
        let out = session
            .run(&[row])
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec::<f32>()
            .unwrap();
        let want = &expected.view().to_vec::<f32>().unwrap()[r * 10..(r + 1) * 10];
        let diff = out
            .iter()
            .zip(want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(diff <= TOLERANCE, "row {r}: {diff}");
    }
}

#[test]
fn a_bounded_cache_keeps_the_most_recent_shapes() {
    let options = ModelOptions {
        plans: PlanMode::Concrete,
        plan_cache: 2,
        ..Default::default()
    };
    let model = Model::load(export("fpn-upsample"), &options).unwrap();
    // Spatial sizes are symbolic: nothing is planned before a request says which.
    assert_eq!(model.concrete_plans(), Some(0));
    assert!(matches!(model.info().outputs[0].shape[2], Dim::Symbol(_)));
    let mut session = model.session().unwrap();
    // Three spatial sizes through a cache of two: each still answers correctly.
    for case in ["16x16", "24x40", "17x23", "16x16"] {
        let input = data(&format!("fpn-upsample.{case}.input.npy"));
        let expected = data(&format!("fpn-upsample.{case}.output.npy"));
        let got = run(&model, &input);
        assert!(max_abs_diff(&got, &expected) <= TOLERANCE, "{case}");
        let got = session
            .run(&[input.view()])
            .unwrap()
            .get(0)
            .unwrap()
            .to_tensor();
        assert!(max_abs_diff(&got, &expected) <= TOLERANCE, "{case}");
        assert!(model.concrete_plans().unwrap() <= 2);
    }
}

#[test]
fn a_shape_the_model_cannot_take_fails_clearly_and_the_model_keeps_serving() {
    let options = plans(PlanMode::Concrete);
    let model = Model::load(export("fpn-scales"), &options).unwrap();
    let mut session = model.session().unwrap();
    // 18 is not a multiple of 4: the up-sampled branch is 10 high, the skip 9.
    let bad = Tensor::from_vec(vec![1, 3, 18, 16], vec![0f32; 3 * 18 * 16]).unwrap();
    // tract plans it (every shape is concrete), and the Add refuses it when it runs.
    for _ in 0..2 {
        let err = session.run(&[bad.view()]).unwrap_err().to_string();
        assert!(
            err.contains("merge") && err.contains("broadcast 10 against 9"),
            "{err}"
        );
    }
    let input = data("fpn-scales.32x48.input.npy");
    let expected = data("fpn-scales.32x48.output.npy");
    let got = session
        .run(&[input.view()])
        .unwrap()
        .get(0)
        .unwrap()
        .to_tensor();
    assert!(max_abs_diff(&got, &expected) <= TOLERANCE);
}

#[test]
fn pinned_inputs_ignore_the_declared_symbolic_shapes() {
    // The model declares value_info and outputs with `N`; pinned to 1 they no longer unify.
    let options = ModelOptions {
        pinned: vec!["x=1,3,16,16".parse::<PinnedInput>().unwrap()],
        plans: PlanMode::Symbolic,
        ..Default::default()
    };
    let model = Model::load(export("reshape-head"), &options).unwrap();
    assert_eq!(model.info().batch, None);
    assert_eq!(
        model.info().inputs[0].shape,
        [Dim::Fixed(1), Dim::Fixed(3), Dim::Fixed(16), Dim::Fixed(16)]
    );
    let input = data("reshape-head.b1.input.npy");
    let expected = data("reshape-head.b1.output.npy");
    assert!(max_abs_diff(&run(&model, &input), &expected) <= TOLERANCE);
    // A pin that keeps the batch symbolic pins only the rest.
    let pin: PinnedInput = "x=N,3,16,16".parse().unwrap();
    assert_eq!(pin.shape, [None, Some(3), Some(16), Some(16)]);
    for bad in ["x", "=1,2", "x=1,a b", "x=1,,2"] {
        assert!(bad.parse::<PinnedInput>().is_err(), "{bad}");
    }
    let wrong = ModelOptions {
        pinned: vec!["image=1,3,16,16".parse().unwrap()],
        ..Default::default()
    };
    let err = Model::load(export("reshape-head"), &wrong)
        .unwrap_err()
        .to_string();
    assert!(err.contains("`image`") && err.contains("`x`"), "{err}");
}

#[test]
fn symbolic_only_fails_naming_the_node_and_the_fix() {
    let options = plans(PlanMode::Symbolic);
    let err = Model::load(export("reshape-head"), &options).unwrap_err();
    assert!(matches!(err, Error::Prepare(_)), "{err}");
    let msg = err.to_string();
    for part in [
        "slice.reshape",
        "Reshape",
        "shape input is variable",
        "plans `auto`",
    ] {
        assert!(msg.contains(part), "{part}: {msg}");
    }
}

#[test]
fn fastest_measures_both_and_says_which_won() {
    let options = plans(PlanMode::Fastest);
    let model = Model::load(repo().join("models/digits/1/model.onnx"), &options).unwrap();
    let why = &model.inspection().plan.why;
    assert!(why.contains("faster than"), "{why}");
    // Whichever won serves any batch.
    let x = npy::read_file(repo().join("models/testdata/digits_test_x.npy")).unwrap();
    let per_row = x.bytes().len() / x.shape()[0];
    let shape = [5, 1, 8, 8];
    let five = TensorView::from_bytes(x.dtype(), &shape, &x.bytes()[..5 * per_row]);
    let mut session = model.session().unwrap();
    assert_eq!(
        session.run(&[five]).unwrap().get(0).unwrap().shape(),
        [5, 10]
    );
}

#[test]
fn plan_decisions_kept_on_disk_are_reused_and_change_no_result() {
    let dir = std::env::temp_dir().join(format!("tern-exports-decisions-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let reused = |m: &Model| {
        m.inspection()
            .plan
            .why
            .contains("decided at an earlier load")
    };
    for mode in [PlanMode::Auto, PlanMode::Fastest] {
        let options = ModelOptions {
            cache_dir: Some(dir.clone()),
            ..plans(mode)
        };
        // Each load is checked against onnxruntime: the first decides, the second reuses.
        let (first, _) = check_every_case(&options);
        let (second, _) = check_every_case(&options);
        for (name, m) in &first {
            let again = &second[name];
            assert!(!reused(m), "{mode} {name}: {}", m.inspection().plan.why);
            assert!(
                reused(again),
                "{mode} {name}: {}",
                again.inspection().plan.why
            );
            assert_eq!(
                again.inspection().plan.kind,
                m.inspection().plan.kind,
                "{mode} {name}"
            );
        }
    }
    // A damaged entry is decided again and written anew.
    let entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    // One entry per model and mode.
    let models: std::collections::BTreeSet<String> = cases().into_iter().map(|c| c.0).collect();
    assert_eq!(entries.len(), 2 * models.len(), "{entries:?}");
    for e in &entries {
        std::fs::write(e, b"\x00 not a decision").unwrap();
    }
    let options = ModelOptions {
        cache_dir: Some(dir.clone()),
        ..plans(PlanMode::Fastest)
    };
    let (models, _) = check_every_case(&options);
    assert!(models.values().all(|m| !reused(m)));
    let (models, _) = check_every_case(&options);
    assert!(models.values().all(reused));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn warm_up_prepares_every_planned_batch_size() {
    let options = ModelOptions {
        plans: PlanMode::Concrete,
        batch_sizes: vec![1, 3],
        ..Default::default()
    };
    let model = Model::load(repo().join("models/digits/1/model.onnx"), &options).unwrap();
    assert_eq!(model.inspection().plan.kind, PlanKind::Concrete);
    assert_eq!(model.inspection().plan.why, "concrete plans were asked for");
    model.session().unwrap().warm_up().unwrap();
    assert_eq!(model.concrete_plans(), Some(2));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_in_a_build_without_the_feature_is_a_clear_error() {
    let options = ModelOptions {
        device: tern_core::Device::Cuda,
        ..Default::default()
    };
    let err = Model::load(repo().join("models/digits/1/model.onnx"), &options).unwrap_err();
    assert!(matches!(err, Error::InvalidOption(_)), "{err}");
    assert!(err.to_string().contains("--features cuda"), "{err}");
}

/// Built with `--features cuda` on a machine without a GPU: the model runs on the CPU and its
/// inspection says why. (With a GPU the same test checks it really runs there.)
#[cfg(feature = "cuda")]
#[test]
fn cuda_runs_on_the_gpu_or_falls_back_to_the_cpu_saying_why() {
    let options = ModelOptions {
        device: tern_core::Device::Cuda,
        ..Default::default()
    };
    let model = Model::load(repo().join("models/digits/1/model.onnx"), &options).unwrap();
    let insp = model.inspection();
    match insp.device {
        tern_core::Device::Cuda => assert!(insp.device_note.is_none()),
        tern_core::Device::Cpu => {
            let note = insp.device_note.as_deref().unwrap();
            assert!(note.contains("running on the CPU"), "{note}");
        }
    }
    let x = npy::read_file(repo().join("models/testdata/digits_test_x.npy")).unwrap();
    let reference = npy::read_file(repo().join("models/testdata/digits.ref.npy")).unwrap();
    let got = run(&model, &x);
    let diff = max_abs_diff(&got, &reference);
    // TF32 on the GPU (see `cuda_tolerance` in tests/core.rs): 7.2e-3 measured on an H200.
    let bound = match insp.device {
        tern_core::Device::Cuda => 5e-2,
        tern_core::Device::Cpu => 1e-3,
    };
    assert!(diff <= bound, "max abs diff {diff} on {:?}", got.shape());
}

#[test]
fn a_model_declaring_absurd_sizes_is_refused_at_warm_up_not_allocated() {
    // Declares x: [1, 3, 100000, 100000] f32, 120 GB.
    let path = repo().join("models/testdata/bad/absurd-dims.onnx");
    let model = Model::load(path, &ModelOptions::default()).unwrap();
    let err = model.session().unwrap().warm_up().unwrap_err().to_string();
    assert!(
        err.contains("input `x`") && err.contains("1024 MiB"),
        "{err}"
    );
}

/// The fast-preparing option (no axis rewrites) on every export: the same answers.
#[test]
fn every_export_matches_onnxruntime_without_axis_rewrites() {
    check_every_case(&ModelOptions {
        axis_rewrites: false,
        ..Default::default()
    });
}

/// The squeeze-and-excitation export: with its spatial size known (the input pinned, the
/// batch left symbolic or planned), its Sigmoid-gated and HardSigmoid-gated blocks run as one
/// op each, the block whose gate is read twice stays with tract, and every case matches
/// onnxruntime. With symbolic H and W the pool's scale is not a constant and the blocks stay
/// with tract, with the same answers.
#[test]
fn squeeze_and_excitation_exports_run_as_one_op_each() {
    let on_loop = |m: &Model| {
        m.inspection()
            .heavy
            .iter()
            .filter(|h| {
                h.note
                    .as_ref()
                    .is_some_and(|n| n.starts_with("on the Tern f32 squeeze-and-excitation kernel"))
            })
            .map(|h| h.name.clone())
            .collect::<Vec<_>>()
    };
    let check = |model: &Model, case: &str| {
        let input = data(&format!("excite.{case}.input.npy"));
        let expected = data(&format!("excite.{case}.output.npy"));
        let diff = max_abs_diff(&run(model, &input), &expected);
        assert!(diff <= TOLERANCE, "{case}: max abs diff {diff}");
    };
    for (pin, case) in [("x=N,3,12,20", "b1-12x20"), ("x=N,3,9,9", "b2-9x9")] {
        for mode in [PlanMode::Symbolic, PlanMode::Concrete] {
            let options = ModelOptions {
                pinned: vec![pin.parse::<PinnedInput>().unwrap()],
                ..plans(mode)
            };
            let model = Model::load(export("excite"), &options).unwrap();
            assert_eq!(on_loop(&model), ["a1", "a2", "b1", "b2"], "{pin} {mode}");
            check(&model, case);
        }
    }
    let model = Model::load(export("excite"), &plans(PlanMode::Symbolic)).unwrap();
    assert!(on_loop(&model).is_empty());
    for case in ["b1-12x20", "b2-9x9"] {
        check(&model, case);
    }
}
