//! Tern's own tensor vocabulary: element types, borrowed views and owned tensors.
//!
//! Data is always dense, row-major, native-endian bytes. Views borrow; nothing here allocates
//! except [`Tensor`] and the explicit `to_*` conversions.

use std::fmt;

use crate::error::{TensorError, TensorResult as Result};

/// Element type of a model input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    I8,
    U8,
    I32,
    I64,
    /// One byte per element, 0 or 1.
    Bool,
}

impl DType {
    pub const ALL: [DType; 7] = [
        DType::F32,
        DType::F16,
        DType::I8,
        DType::U8,
        DType::I32,
        DType::I64,
        DType::Bool,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
            DType::I64 => 8,
        }
    }

    /// Bytes a dense tensor of `shape` takes, or `None` when the product of its non-zero
    /// dimensions (times the element size) is beyond `usize`. Such a shape is refused even when
    /// another dimension is 0: the answer must not depend on the order of the dimensions.
    pub fn byte_len(self, shape: &[usize]) -> Option<usize> {
        let mut bytes = self.size();
        let mut empty = false;
        for &d in shape {
            if d == 0 {
                empty = true;
            } else {
                bytes = bytes.checked_mul(d)?;
            }
        }
        Some(if empty { 0 } else { bytes })
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::I8 => "i8",
            DType::U8 => "u8",
            DType::I32 => "i32",
            DType::I64 => "i64",
            DType::Bool => "bool",
        }
    }

    /// Parses the names printed by [`DType::name`] (and numpy's `float32`-style names).
    pub fn parse(s: &str) -> Option<DType> {
        Some(match s {
            "f32" | "float32" | "FP32" => DType::F32,
            "f16" | "float16" | "FP16" => DType::F16,
            "i8" | "int8" | "INT8" => DType::I8,
            "u8" | "uint8" | "UINT8" => DType::U8,
            "i32" | "int32" | "INT32" => DType::I32,
            "i64" | "int64" | "INT64" => DType::I64,
            "bool" | "BOOL" => DType::Bool,
            _ => return None,
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Rust element types that map onto a [`DType`].
pub trait Element: bytemuck::Pod {
    const DTYPE: DType;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for half::f16 {
    const DTYPE: DType = DType::F16;
}
impl Element for i8 {
    const DTYPE: DType = DType::I8;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}
impl Element for i32 {
    const DTYPE: DType = DType::I32;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}

/// One dimension of a declared shape.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Fixed(usize),
    /// The model's batch dimension: any size (up to the configured maximum).
    Batch(String),
    /// Another symbolic dimension, resolved per request.
    Symbol(String),
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Fixed(d) => write!(f, "{d}"),
            Dim::Batch(s) | Dim::Symbol(s) => f.write_str(s),
        }
    }
}

/// Name, element type and declared shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorInfo {
    /// Index of the batch dimension, if this tensor has one.
    pub fn batch_axis(&self) -> Option<usize> {
        self.shape.iter().position(|d| matches!(d, Dim::Batch(_)))
    }
}

impl fmt::Display for TensorInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ", self.name)?;
        fmt_shape(f, self.shape.iter())?;
        write!(f, " {}", self.dtype)
    }
}

pub(crate) fn fmt_shape<D: fmt::Display>(
    f: &mut impl fmt::Write,
    dims: impl Iterator<Item = D>,
) -> fmt::Result {
    f.write_char('[')?;
    for (i, d) in dims.enumerate() {
        if i > 0 {
            f.write_char(',')?;
        }
        write!(f, "{d}")?;
    }
    f.write_char(']')
}

/// A borrowed tensor: element type, shape and bytes.
#[derive(Clone, Copy, PartialEq)]
pub struct TensorView<'a> {
    dtype: DType,
    shape: &'a [usize],
    data: &'a [u8],
}

impl fmt::Debug for TensorView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut s = String::new();
        fmt_shape(&mut s, self.shape.iter())?;
        write!(
            f,
            "TensorView({s} {}, {} bytes)",
            self.dtype,
            self.data.len()
        )
    }
}

impl<'a> TensorView<'a> {
    /// A view over raw bytes. Nothing is checked here: sessions validate length, shape and type
    /// against the model and answer with a clear error.
    pub fn from_bytes(dtype: DType, shape: &'a [usize], data: &'a [u8]) -> TensorView<'a> {
        TensorView { dtype, shape, data }
    }

    /// A view over a typed slice.
    pub fn new<T: Element>(shape: &'a [usize], data: &'a [T]) -> TensorView<'a> {
        TensorView {
            dtype: T::DTYPE,
            shape,
            data: bytemuck::cast_slice(data),
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Number of elements the shape declares.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements as a typed slice, without copying.
    ///
    /// Fails when `T` is not the view's type or the bytes are not aligned for `T` (views of
    /// session outputs always are).
    pub fn as_slice<T: Element>(&self) -> Result<&'a [T]> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::Invalid(format!(
                "tensor is {}, not {}",
                self.dtype,
                T::DTYPE
            )));
        }
        bytemuck::try_cast_slice(self.data).map_err(|e| {
            TensorError::Invalid(format!("cannot view tensor bytes as {}: {e}", T::DTYPE))
        })
    }

    /// Copies the elements into a vector, whatever the alignment of the bytes.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(TensorError::Invalid(format!(
                "tensor is {}, not {}",
                self.dtype,
                T::DTYPE
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(self.data))
    }

    pub fn to_tensor(&self) -> Tensor {
        Tensor {
            dtype: self.dtype,
            shape: self.shape.to_vec(),
            data: self.data.to_vec(),
        }
    }
}

/// An owned tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl Tensor {
    /// Builds a tensor, checking that the byte length matches shape and type.
    pub fn from_bytes(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Tensor> {
        // Checked: shapes come from the network and the FFI; a wrapped product could match.
        let expected = dtype.byte_len(&shape);
        if expected != Some(data.len()) {
            let expected =
                expected.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string());
            let mut s = String::new();
            let _ = fmt_shape(&mut s, shape.iter());
            return Err(TensorError::Invalid(format!(
                "tensor {s} {dtype} needs {expected} bytes, got {}",
                data.len()
            )));
        }
        Ok(Tensor { dtype, shape, data })
    }

    pub fn from_vec<T: Element>(shape: Vec<usize>, data: Vec<T>) -> Result<Tensor> {
        Tensor::from_bytes(T::DTYPE, shape, bytemuck::cast_slice(&data).to_vec())
    }

    pub fn view(&self) -> TensorView<'_> {
        TensorView {
            dtype: self.dtype,
            shape: &self.shape,
            data: &self.data,
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_of_typed_slices_round_trip() {
        let data = [1.0f32, 2.0, 3.0, 4.0];
        let v = TensorView::new(&[2, 2], &data);
        assert_eq!(v.dtype(), DType::F32);
        assert_eq!(v.as_slice::<f32>().unwrap(), &data);
        assert_eq!(v.to_tensor().view().to_vec::<f32>().unwrap(), data.to_vec());
    }

    #[test]
    fn a_view_refuses_the_wrong_element_type() {
        let data = [1i64, 2];
        let v = TensorView::new(&[2], &data);
        let err = v.as_slice::<f32>().unwrap_err().to_string();
        assert!(err.contains("i64") && err.contains("f32"), "{err}");
    }

    #[test]
    fn an_owned_tensor_checks_its_byte_length() {
        let err = Tensor::from_bytes(DType::F32, vec![2, 3], vec![0; 20])
            .unwrap_err()
            .to_string();
        assert!(err.contains("24 bytes") && err.contains("got 20"), "{err}");
    }

    #[test]
    fn byte_lengths_do_not_depend_on_the_order_of_dimensions() {
        let huge = usize::MAX / 2 + 1;
        assert_eq!(DType::F32.byte_len(&[2, 3]), Some(24));
        assert_eq!(DType::F32.byte_len(&[]), Some(4));
        assert_eq!(DType::U8.byte_len(&[0, 7]), Some(0));
        assert_eq!(DType::F32.byte_len(&[huge, 0]), None);
        assert_eq!(DType::F32.byte_len(&[0, huge]), None);
        assert_eq!(DType::U8.byte_len(&[huge, 0]), Some(0));
    }

    #[test]
    fn dtype_names_parse_back() {
        for dt in DType::ALL {
            assert_eq!(DType::parse(dt.name()), Some(dt));
        }
    }
}
