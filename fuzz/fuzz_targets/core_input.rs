//! Any declared model inputs against any request tensors: `check_inputs` (what tern-core runs
//! before every forward pass) never panics, and its verdict equals a second, independent
//! reading of the rules — sizes computed in u128 instead of checked usize products. A tensor it
//! passes is exactly what the model declared.
#![no_main]

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use tern_tensor::{check_inputs, DType, Dim, TensorError, TensorInfo, TensorView};

struct Given {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn dtype(u: &mut Unstructured) -> Result<DType> {
    Ok(*u.choose(&DType::ALL)?)
}

/// Mostly small sizes, sometimes ones whose product overflows.
fn size(u: &mut Unstructured) -> Result<usize> {
    Ok(match u.int_in_range(0u8..=9)? {
        0 => usize::MAX - u.int_in_range(0..=3usize)?,
        1 => 1usize << u.int_in_range(16..=63u32)?.min(usize::BITS - 1),
        _ => u.int_in_range(0..=6usize)?,
    })
}

fn declared(u: &mut Unstructured) -> Result<Vec<TensorInfo>> {
    let n = u.int_in_range(0..=3usize)?;
    (0..n)
        .map(|i| {
            let rank = u.int_in_range(0..=4usize)?;
            let shape = (0..rank)
                .map(|_| {
                    Ok(match u.int_in_range(0u8..=3)? {
                        0 => Dim::Batch("N".into()),
                        1 => Dim::Symbol("S".into()),
                        _ => Dim::Fixed(u.int_in_range(0..=6usize)?),
                    })
                })
                .collect::<Result<_>>()?;
            Ok(TensorInfo {
                name: format!("in{i}"),
                dtype: dtype(u)?,
                shape,
            })
        })
        .collect()
}

fn given(u: &mut Unstructured) -> Result<Vec<Given>> {
    let n = u.int_in_range(0..=3usize)?;
    (0..n)
        .map(|_| {
            let dtype = dtype(u)?;
            let rank = u.int_in_range(0..=4usize)?;
            let shape: Vec<usize> = (0..rank).map(|_| size(u)).collect::<Result<_>>()?;
            // Usually the right length for the shape, so the later rules get exercised too.
            let want = dtype.byte_len(&shape).filter(|&b| b <= 4096);
            let len = match want {
                Some(b) if u.ratio(7u8, 8)? => b,
                _ => u.int_in_range(0..=64usize)?,
            };
            let mut bytes = vec![0u8; len];
            for b in bytes.iter_mut() {
                *b = if dtype == DType::Bool {
                    u8::from(u.ratio(1u8, 2)?) + u8::from(u.ratio(1u8, 200)?)
                } else {
                    u.arbitrary()?
                };
            }
            Ok(Given {
                dtype,
                shape,
                bytes,
            })
        })
        .collect()
}

#[derive(Debug, PartialEq)]
enum Verdict {
    Rows(usize),
    TooLarge { got: usize, max: usize },
    Invalid,
}

/// The rules again, written apart from the implementation.
fn reference(declared: &[TensorInfo], max: Option<usize>, given: &[Given]) -> Verdict {
    if declared.len() != given.len() {
        return Verdict::Invalid;
    }
    let mut rows: Option<usize> = None;
    for (d, g) in declared.iter().zip(given) {
        if d.dtype != g.dtype || d.shape.len() != g.shape.len() {
            return Verdict::Invalid;
        }
        for (dim, &got) in d.shape.iter().zip(&g.shape) {
            match dim {
                Dim::Fixed(n) if *n != got => return Verdict::Invalid,
                Dim::Batch(_) if got == 0 => return Verdict::Invalid,
                Dim::Batch(_) if max.is_some_and(|m| got > m) => {
                    return Verdict::TooLarge {
                        got,
                        max: max.unwrap_or_default(),
                    }
                }
                Dim::Batch(_) if rows.is_some_and(|r| r != got) => return Verdict::Invalid,
                Dim::Batch(_) => rows = Some(got),
                _ => {}
            }
        }
        // Zero dimensions make the tensor empty, but the others must still be addressable.
        let span = g
            .shape
            .iter()
            .fold(d.dtype.size() as u128, |a, &d| a.saturating_mul(d.max(1) as u128));
        let need = if g.shape.contains(&0) { 0 } else { span };
        if span > usize::MAX as u128 || need != g.bytes.len() as u128 {
            return Verdict::Invalid;
        }
        if d.dtype == DType::Bool && g.bytes.iter().any(|&b| b > 1) {
            return Verdict::Invalid;
        }
    }
    Verdict::Rows(rows.unwrap_or(1))
}

fn one(u: &mut Unstructured) -> Result<()> {
    let declared = declared(u)?;
    let max = if u.arbitrary()? {
        Some(u.int_in_range(0..=8usize)?)
    } else {
        None
    };
    let given = given(u)?;
    let views: Vec<TensorView> = given
        .iter()
        .map(|g| TensorView::from_bytes(g.dtype, &g.shape, &g.bytes))
        .collect();
    let got = match check_inputs(&declared, max, &views) {
        Ok(rows) => Verdict::Rows(rows),
        Err(TensorError::BatchTooLarge { got, max }) => Verdict::TooLarge { got, max },
        Err(TensorError::Invalid(m)) => {
            assert!(!m.is_empty(), "an empty message");
            Verdict::Invalid
        }
        Err(e) => panic!("an error input checks cannot give: {e}"),
    };
    assert_eq!(got, reference(&declared, max, &given), "{declared:?} max {max:?}");
    Ok(())
}

fuzz_target!(|data: &[u8]| {
    let _ = one(&mut Unstructured::new(data));
});
