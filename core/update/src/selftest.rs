//! Self-test vectors: inputs and the outputs the publisher's own run of the model produced.
//! The manifest carries the vector's sha256, so it is covered by the signature.
//!
//! Layout (SPEC.md): `b"TST1"` then the postcard encoding of [`SelfTest`]; tensors are `.npy`.

use serde::{Deserialize, Serialize};

use crate::UpdateError;

const MAGIC: &[u8; 4] = b"TST1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedTensor {
    pub name: String,
    /// A complete `.npy` file.
    pub npy: Vec<u8>,
}

/// Outputs must satisfy `|got - expected| <= atol + rtol * |expected|` element-wise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SelfTest {
    pub inputs: Vec<NamedTensor>,
    pub expected: Vec<NamedTensor>,
    pub atol: f32,
    pub rtol: f32,
}

impl SelfTest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend(postcard::to_allocvec(self).expect("serialising to memory"));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<SelfTest, UpdateError> {
        let body = bytes
            .strip_prefix(MAGIC)
            .ok_or_else(|| UpdateError::SelfTest("missing TST1 magic".into()))?;
        postcard::from_bytes(body).map_err(|e| UpdateError::SelfTest(format!("malformed: {e}")))
    }

    /// Checks `bytes` are the vector the manifest's digest names, then decodes them.
    pub fn decode_verified(bytes: &[u8], digest: &[u8; 32]) -> Result<SelfTest, UpdateError> {
        if &crate::sha256(bytes) != digest {
            return Err(UpdateError::SelfTest(
                "the vector does not match the digest in the signed manifest".into(),
            ));
        }
        SelfTest::decode(bytes)
    }
}

/// Element-wise closeness; on failure, the first offending index and values.
pub fn compare(got: &[f32], expected: &[f32], atol: f32, rtol: f32) -> Result<(), String> {
    if got.len() != expected.len() {
        return Err(format!("{} values, expected {}", got.len(), expected.len()));
    }
    for (i, (g, e)) in got.iter().zip(expected).enumerate() {
        let ok = (g - e).abs() <= atol + rtol * e.abs() || (g.is_nan() && e.is_nan());
        if !ok {
            return Err(format!("element {i}: got {g}, expected {e}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vector_round_trips_and_is_bound_to_its_digest() {
        let st = SelfTest {
            inputs: vec![NamedTensor {
                name: "x".into(),
                npy: vec![1, 2, 3],
            }],
            expected: vec![],
            atol: 1e-3,
            rtol: 0.0,
        };
        let bytes = st.encode();
        let digest = crate::sha256(&bytes);
        assert_eq!(SelfTest::decode_verified(&bytes, &digest).unwrap(), st);
        let mut other = bytes.clone();
        other[5] ^= 1;
        assert!(SelfTest::decode_verified(&other, &digest).is_err());
        assert!(SelfTest::decode(b"nope").is_err());
    }

    #[test]
    fn closeness_uses_absolute_and_relative_tolerance() {
        assert!(compare(&[1.0, 100.5], &[1.0005, 100.0], 1e-3, 1e-2).is_ok());
        assert!(compare(&[1.1], &[1.0], 1e-3, 1e-2).is_err());
        assert!(compare(&[1.0], &[1.0, 2.0], 1.0, 0.0).is_err());
    }
}
