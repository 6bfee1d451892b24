//! Reading and writing `.npy` files as [`Tensor`]s, for the CLI, tests and tools.

use std::io::{Read, Write};

use npyz::WriterBuilder;

use crate::error::{Error, Result};
use crate::tensor::{DType, Tensor};

fn npy_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::InvalidInput(format!("{what}: {e}"))
}

/// Reads a C-ordered `.npy` array of a supported element type.
pub fn read(r: impl Read) -> Result<Tensor> {
    let npy = npyz::NpyFile::new(r).map_err(|e| npy_err("not a valid .npy file", e))?;
    if npy.order() != npyz::Order::C {
        return Err(Error::InvalidInput(
            "Fortran-ordered .npy arrays are not supported; save with np.ascontiguousarray".into(),
        ));
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = match npy.dtype() {
        npyz::DType::Plain(ts) => ts.to_string(),
        other => {
            return Err(Error::InvalidInput(format!(
                "unsupported .npy dtype {other:?}"
            )))
        }
    };
    let little = cfg!(target_endian = "little");
    let native = |c: char| c == '|' || (c == '<') == little;
    let (order, code) = descr.split_at(1);
    if !native(order.chars().next().unwrap_or('|')) {
        return Err(Error::InvalidInput(format!(
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
            return Err(Error::InvalidInput(format!(
                "unsupported .npy dtype {descr} (supported: f4 f2 i1 u1 i4 i8 b1)"
            )))
        }
    };
    Tensor::from_bytes(dtype, shape, bytes)
}

/// Reads a `.npy` file from disk.
pub fn read_file(path: impl AsRef<std::path::Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let f = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.display().to_string(),
        source,
    })?;
    read(std::io::BufReader::new(f)).map_err(|e| match e {
        Error::InvalidInput(m) => Error::InvalidInput(format!("{}: {m}", path.display())),
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

    #[test]
    fn garbage_is_rejected_with_a_message() {
        let err = read(&b"definitely not numpy"[..]).unwrap_err().to_string();
        assert!(err.contains("not a valid .npy"), "{err}");
    }
}
