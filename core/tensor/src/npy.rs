//! Reading and writing `.npy` files as [`Tensor`]s, for the CLI, tests and tools.

use std::io::{Read, Write};

use npyz::WriterBuilder;

use crate::error::{TensorError, TensorResult as Result};
use crate::tensor::{DType, Tensor};

fn npy_err(what: &str, e: impl std::fmt::Display) -> TensorError {
    TensorError::Invalid(format!("{what}: {e}"))
}

/// Deepest bracket nesting a header of a plain array needs: `{'shape': (2, 3)}` is 2, a
/// structured `descr` (a list of tuples) 3.
const MAX_HEADER_NESTING: usize = 3;

/// Reads the preamble and header dictionary, and checks the header's nesting before npyz's
/// parser sees it: that parser takes exponential time on deeply nested brackets (found by the
/// `npy_file` fuzz target: a 200-byte file of `{{{{…` ran for minutes).
fn checked_header(mut r: impl Read) -> Result<(Vec<u8>, impl Read)> {
    let mut head = vec![0u8; 10];
    r.read_exact(&mut head)
        .map_err(|e| npy_err("not a valid .npy file", e))?;
    if &head[..6] != b"\x93NUMPY" {
        return Err(TensorError::Invalid(
            "not a valid .npy file: no \\x93NUMPY magic string".into(),
        ));
    }
    let len = match head[6] {
        1 => u16::from_le_bytes([head[8], head[9]]) as usize,
        2 | 3 => {
            let mut rest = [0u8; 2];
            r.read_exact(&mut rest)
                .map_err(|e| npy_err("not a valid .npy file", e))?;
            head.extend_from_slice(&rest);
            u32::from_le_bytes([head[8], head[9], rest[0], rest[1]]) as usize
        }
        v => {
            return Err(TensorError::Invalid(format!(
                "not a valid .npy file: unknown format version {v}"
            )))
        }
    };
    // Headers of plain arrays are well under a kilobyte; this bounds what a claim can allocate.
    if len > 1 << 16 {
        return Err(TensorError::Invalid(format!(
            "not a valid .npy file: a {len}-byte header"
        )));
    }
    let start = head.len();
    head.resize(start + len, 0);
    r.read_exact(&mut head[start..])
        .map_err(|e| npy_err("not a valid .npy file: header cut short", e))?;
    let mut depth = 0usize;
    for &b in &head[start..] {
        match b {
            b'{' | b'[' | b'(' => {
                depth += 1;
                if depth > MAX_HEADER_NESTING {
                    return Err(TensorError::Invalid(format!(
                        "not a valid .npy file: header nested more than {MAX_HEADER_NESTING} deep"
                    )));
                }
            }
            b'}' | b']' | b')' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    check_shape(&head[start..])?;
    Ok((head, r))
}

/// npyz multiplies the dimensions in u64 unchecked (a panic with overflow checks, a wrong count
/// without), for the element count and for the strides (products from the last axis): a shape
/// whose non-zero dimensions multiply past u64 is refused here first, read with the same parser
/// npyz uses. Zeros are skipped because they end no product npyz computes from the other end.
fn check_shape(header: &[u8]) -> Result<()> {
    let bad = |why: &str| TensorError::Invalid(format!("not a valid .npy file: {why}"));
    let text = std::str::from_utf8(header.strip_suffix(b"\n").unwrap_or(header))
        .map_err(|_| bad("the header is not UTF-8"))?;
    let value: py_literal::Value = text
        .parse()
        .map_err(|e| bad(&format!("the header does not parse: {e}")))?;
    let py_literal::Value::Dict(entries) = value else {
        return Err(bad("the header is not a dictionary"));
    };
    let shape = entries
        .iter()
        .find(|(k, _)| k.as_string().is_some_and(|k| k == "shape"))
        .map(|(_, v)| v)
        .ok_or_else(|| bad("the header has no shape"))?;
    let (py_literal::Value::Tuple(dims) | py_literal::Value::List(dims)) = shape else {
        return Err(bad("the shape is not a tuple"));
    };
    let mut nonzero_product = 1u64;
    for d in dims {
        let py_literal::Value::Integer(d) = d else {
            return Err(bad("a dimension is not an integer"));
        };
        let d = u64::try_from(d).map_err(|_| bad(&format!("dimension {d} is out of range")))?;
        if d != 0 {
            nonzero_product = nonzero_product
                .checked_mul(d)
                .ok_or_else(|| bad("the dimensions multiply to more than 2^64"))?;
        }
    }
    Ok(())
}

/// Reads a C-ordered `.npy` array of a supported element type.
pub fn read(r: impl Read) -> Result<Tensor> {
    let (head, rest) = checked_header(r)?;
    let npy = npyz::NpyFile::new(head.as_slice().chain(rest))
        .map_err(|e| npy_err("not a valid .npy file", e))?;
    if npy.order() != npyz::Order::C {
        return Err(TensorError::Invalid(
            "Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => {
            return Err(TensorError::Invalid(format!(
                "unsupported .npy dtype {other:?}"
            )))
        }
    };
    let little = cfg!(target_endian = "little");
    let native = |c: char| c == '|' || (c == '<') == little;
    let (order, code) = descr.split_at(1);
    if !native(order.chars().next().unwrap_or('|')) {
        return Err(TensorError::Invalid(format!(
            "non-native byte order in .npy dtype {descr}"
        )));
    }
    let read = |e: std::io::Error| npy_err("reading .npy data", e);
    let (dtype, bytes): (DType, Vec<u8>) = match code {
        "f4" => (
            DType::F32,
            bytemuck::cast_slice(&npy.into_vec::<f32>().map_err(read)?).to_vec(),
        ),
        "f2" => (
            DType::F16,
            bytemuck::cast_slice(&npy.into_vec::<half::f16>().map_err(read)?).to_vec(),
        ),
        "i1" => (
            DType::I8,
            bytemuck::cast_slice(&npy.into_vec::<i8>().map_err(read)?).to_vec(),
        ),
        "u1" => (DType::U8, npy.into_vec::<u8>().map_err(read)?),
        "i4" => (
            DType::I32,
            bytemuck::cast_slice(&npy.into_vec::<i32>().map_err(read)?).to_vec(),
        ),
        "i8" => (
            DType::I64,
            bytemuck::cast_slice(&npy.into_vec::<i64>().map_err(read)?).to_vec(),
        ),
        "b1" => (
            DType::Bool,
            npy.into_vec::<bool>()
                .map_err(read)?
                .into_iter()
                .map(u8::from)
                .collect(),
        ),
        _ => {
            return Err(TensorError::Invalid(format!(
                "unsupported .npy dtype {descr} (supported: f4 f2 i1 u1 i4 i8 b1)"
            )))
        }
    };
    Tensor::from_bytes(dtype, shape, bytes)
}

/// Reads a `.npy` file from disk.
pub fn read_file(path: impl AsRef<std::path::Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let f = std::fs::File::open(path).map_err(|source| TensorError::Io {
        path: path.display().to_string(),
        source,
    })?;
    read(std::io::BufReader::new(f)).map_err(|e| match e {
        TensorError::Invalid(m) => TensorError::Invalid(format!("{}: {m}", path.display())),
        other => other,
    })
}

/// Writes a tensor as `.npy`.
pub fn write(w: impl Write, t: &Tensor) -> Result<()> {
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    let v = t.view();
    let werr = |e: std::io::Error| npy_err("writing .npy", e);
    macro_rules! put {
        ($ty:ty, $data:expr) => {{
            let mut out = npyz::WriteOptions::<$ty>::new()
                .default_dtype()
                .shape(&shape)
                .writer(w)
                .begin_nd()
                .map_err(werr)?;
            out.extend($data).map_err(werr)?;
            out.finish().map_err(werr)
        }};
    }
    match t.dtype() {
        DType::F32 => put!(f32, v.to_vec::<f32>()?),
        DType::F16 => put!(half::f16, v.to_vec::<half::f16>()?),
        DType::I8 => put!(i8, v.to_vec::<i8>()?),
        DType::U8 => put!(u8, v.to_vec::<u8>()?),
        DType::I32 => put!(i32, v.to_vec::<i32>()?),
        DType::I64 => put!(i64, v.to_vec::<i64>()?),
        DType::Bool => put!(bool, t.bytes().iter().map(|&b| b != 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_f32_array_survives_a_write_and_read() {
        let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, -2.0, 3.5, 0.0, 7.25, f32::NAN]).unwrap();
        let mut buf = vec![];
        write(&mut buf, &t).unwrap();
        let back = read(&buf[..]).unwrap();
        assert_eq!(back.shape(), &[2, 3]);
        let (a, b) = (
            t.view().to_vec::<f32>().unwrap(),
            back.view().to_vec::<f32>().unwrap(),
        );
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
    }

    /// Found by the `npy_file` fuzz target: npyz's header parser hung on it.
    #[test]
    fn a_deeply_nested_header_is_refused_before_parsing() {
        let mut file = b"\x93NUMPY\x01\x00".to_vec();
        let header = format!("{{'descr': '<f4', 'shape':{} (2,) }}\n", "{".repeat(100));
        file.extend_from_slice(&(header.len() as u16).to_le_bytes());
        file.extend_from_slice(header.as_bytes());
        file.extend_from_slice(&[0; 8]);
        let err = read(&file[..]).unwrap_err().to_string();
        assert!(err.contains("nested more than 3 deep"), "{err}");
    }

    /// Found by the `npy_file` fuzz target: npyz's own element count overflowed; then, in CI, an
    /// empty array (a zero on the first axis) whose other axes overflow npyz's strides.
    #[test]
    fn shapes_that_overflow_npyz_products_are_refused() {
        for shape in ["(4294967296, 4294967296)", "(0, 9593376757802947926, 3)"] {
            let mut file = b"\x93NUMPY\x01\x00".to_vec();
            let header =
                format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}\n");
            file.extend_from_slice(&(header.len() as u16).to_le_bytes());
            file.extend_from_slice(header.as_bytes());
            let err = read(&file[..]).unwrap_err().to_string();
            assert!(err.contains("multiply to more than 2^64"), "{shape}: {err}");
        }
    }

    #[test]
    fn garbage_is_rejected_with_a_message() {
        let err = read(&b"definitely not numpy"[..]).unwrap_err().to_string();
        assert!(err.contains("not a valid .npy"), "{err}");
    }
}
