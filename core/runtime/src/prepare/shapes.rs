//! Pinning inputs to concrete shapes, on the protobuf before tract sees it.
//!
//! Exporters declare output shapes and `value_info` with the same symbols as the inputs
//! (`[N, 10]`). Once an input is pinned, tract would try to unify `N` with the pinned size and
//! fail ("Impossible to unify Val(1) with Sym(N)"); those declarations are dropped instead, and
//! tract re-derives every shape from the pinned inputs.

use tract_onnx::pb;
use tract_onnx::pb::tensor_shape_proto::dimension::Value;

use super::{dims, dims_mut, real_inputs};
use crate::error::{Error, Result};
use crate::model::PinnedInput;

/// Applies the caller's pins. Returns true when anything was pinned.
pub(crate) fn pin(proto: &mut pb::ModelProto, pins: &[PinnedInput]) -> Result<bool> {
    if pins.is_empty() {
        return Ok(false);
    }
    let g = proto.graph.as_mut().expect("checked by decode");
    let inputs: Vec<usize> = real_inputs(g).collect();
    for p in pins {
        let Some(&ix) = inputs.iter().find(|&&ix| g.input[ix].name == p.name) else {
            let known: Vec<String> = inputs
                .iter()
                .map(|&ix| format!("`{}`", g.input[ix].name))
                .collect();
            return Err(Error::InvalidOption(format!(
                "pinned input `{}` is not an input of the model; its inputs are {}",
                p.name,
                known.join(", ")
            )));
        };
        let declared = dims(&g.input[ix]).map(|d| d.len());
        if declared.is_some_and(|r| r != p.shape.len()) {
            return Err(Error::InvalidOption(format!(
                "pinned input `{}` has rank {}, but the model declares rank {}",
                p.name,
                p.shape.len(),
                declared.unwrap_or(0)
            )));
        }
        if declared.is_none() && p.shape.iter().any(Option::is_none) {
            return Err(Error::InvalidOption(format!(
                "input `{}` declares no shape, so every pinned dimension must be a size",
                p.name
            )));
        }
        set_dims(&mut g.input[ix], &p.shape);
    }
    forget_declared(g);
    Ok(true)
}

/// Pins every real input to `shapes` (in input order), for one concrete plan.
pub(crate) fn pin_all(proto: &mut pb::ModelProto, shapes: &[Vec<usize>]) -> Result<()> {
    let g = proto.graph.as_mut().expect("checked by decode");
    let inputs: Vec<usize> = real_inputs(g).collect();
    if inputs.len() != shapes.len() {
        return Err(Error::Internal(format!(
            "{} shapes for {} inputs",
            shapes.len(),
            inputs.len()
        )));
    }
    for (ix, shape) in inputs.into_iter().zip(shapes) {
        let dims: Vec<Option<usize>> = shape.iter().map(|&d| Some(d)).collect();
        set_dims(&mut g.input[ix], &dims);
    }
    forget_declared(g);
    Ok(())
}

fn set_dims(input: &mut pb::ValueInfoProto, shape: &[Option<usize>]) {
    if dims(input).is_none() {
        // No declared shape: give it one of the pinned rank.
        if let Some(pb::type_proto::Value::TensorType(t)) =
            input.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = Some(pb::TensorShapeProto {
                dim: vec![pb::tensor_shape_proto::Dimension::default(); shape.len()],
            });
        }
    }
    if let Some(d) = dims_mut(input) {
        for (dim, pinned) in d.iter_mut().zip(shape) {
            if let Some(n) = pinned {
                dim.value = Some(Value::DimValue(*n as i64));
            }
        }
    }
}

/// Drops declared intermediate and output shapes (types stay): tract derives them again.
fn forget_declared(g: &mut pb::GraphProto) {
    g.value_info.clear();
    for o in &mut g.output {
        if let Some(pb::type_proto::Value::TensorType(t)) =
            o.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(name: &str, dims: &[Value]) -> pb::ValueInfoProto {
        pb::ValueInfoProto {
            name: name.into(),
            r#type: Some(pb::TypeProto {
                value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                    elem_type: 1,
                    shape: Some(pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|v| pb::tensor_shape_proto::Dimension {
                                value: Some(v.clone()),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model() -> pb::ModelProto {
        let n = || Value::DimParam("N".into());
        pb::ModelProto {
            graph: Some(pb::GraphProto {
                input: vec![value("x", &[n(), Value::DimValue(3)])],
                output: vec![value("y", &[n(), Value::DimValue(10)])],
                value_info: vec![value("h", &[n(), Value::DimValue(5)])],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn pins_replace_symbols_and_declared_shapes_are_forgotten() {
        let mut m = model();
        let pinned = pin(
            &mut m,
            &[PinnedInput {
                name: "x".into(),
                shape: vec![Some(2), None],
            }],
        )
        .unwrap();
        assert!(pinned);
        let g = m.graph.unwrap();
        assert_eq!(
            dims(&g.input[0]).unwrap()[0].value,
            Some(Value::DimValue(2))
        );
        assert!(g.value_info.is_empty());
        assert!(dims(&g.output[0]).is_none());
    }

    #[test]
    fn pins_name_unknown_inputs_and_wrong_ranks() {
        let err = pin(
            &mut model(),
            &[PinnedInput {
                name: "image".into(),
                shape: vec![Some(1)],
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("`image`") && err.contains("`x`"), "{err}");
        let err = pin(
            &mut model(),
            &[PinnedInput {
                name: "x".into(),
                shape: vec![Some(1), Some(3), Some(8)],
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("rank 3") && err.contains("rank 2"), "{err}");
    }
}
